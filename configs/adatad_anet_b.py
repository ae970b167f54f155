r"""AdaTAD, VideoMAE-B with TIA adapters, ActivityNet-1.3, 192 positions x 4 frames at 160 px.

  python -m tadjax.main --config configs/adatad_anet_b.py --workdir workdirs/adatad_anet_b \
      --config.data.annotations=PATH/activity_net.v1-3.min.json --config.data.videos=PATH/videos \
      --config.eval.classifier=PATH/cuhk_val_simp_7.json
"""
from tadjax.config import adatad_anet


def get_config(arg=None):
    return adatad_anet("B", img_size=160, arg=arg)
