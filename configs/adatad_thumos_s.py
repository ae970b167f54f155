r"""AdaTAD, VideoMAE-S with TIA adapters, THUMOS14, 768 frames x 1 at 160 px.

  python -m tadjax.main --config configs/adatad_thumos_s.py --workdir workdirs/adatad_thumos_s \
      --config.data.annotations=PATH/thumos14.json --config.data.videos=PATH/videos
"""
from tadjax.config import adatad_thumos


def get_config(arg=None):
    return adatad_thumos("S", frames=768, img_size=160, arg=arg)
