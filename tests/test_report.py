"""tools.report: parameter counts of the AdaTAD configurations from abstract shapes."""
import pytest

from conftest import REPO, load_config_file
from tadjax.tools import report

# ViT parameter counts published for VideoMAE S/B/L/H and VideoMAEv2-g (without adapters), and
# the TIA totals of spec §3.4 (adapters after every block).
EXPECTED = {"s": (21.9e6, 1.01e6), "b": (86.2e6, 4.00e6), "l": (304e6, 14.2e6),
            "h": (632e6, 29.6e6), "g": (1.01e9, 44.7e6)}


@pytest.mark.parametrize("size", sorted(EXPECTED))
def test_parameter_counts_match_published_sizes(size):
    config = load_config_file(REPO / "configs" / f"adatad_thumos_{size}.py")
    out = report.report(config, compile_step=False)
    vit, tia = EXPECTED[size]
    assert abs(out["params_backbone_vit"] - vit) / vit < 0.005, out
    assert abs(out["params_backbone_adapters"] - tia) / tia < 0.005, out
    # Adapter variant: only the TIAs and the head train.
    assert out["params_trainable"] == out["params_backbone_adapters"] + out["params_head"]
    assert out["params_total"] == out["params_backbone"] + out["params_head"]
