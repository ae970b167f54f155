"""tadjax: end-to-end temporal action detection in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="tadjax",
    version="0.1.0",
    description="End-to-end temporal action detection (AdaTAD, ETAD, Progressive Block Drop) in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["tadjax", "tadjax.*"]),
    # The demo's pre-trained backbone (orbax files + tadjax_import.json).
    package_data={"tadjax": ["assets/*/*.json", "assets/*/params/*", "assets/*/params/*/*",
                             "assets/*/params/*/*/*"]},
    install_requires=[
        "jax[cpu]==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "ml-collections==1.1.0",
        "grain==0.2.18",
        "tensorflow-datasets==4.9.10",
        "clu==0.0.12",
        # TensorBoard event files without TensorFlow: clu's own TensorBoard writer imports
        # tensorflow (hundreds of MB); tensorboardX writes the same event format.
        "tensorboardX==2.6.5",
        "decord==0.6.0",
        "av>=14",
        "numpy",
        "absl-py",
        "matplotlib",
    ],
    extras_require={
        # Reference implementations for parity tests and PyTorch checkpoint import.
        # torch 2.13.0 is the CPU build available from this machine's disk.
        "test": ["pytest", "torch==2.13.0", "transformers==4.57.6", "scikit-video"],
        "torch": ["torch==2.13.0", "transformers==4.57.6"],
    },
)
