r"""AdaTAD, VideoMAE-H with TIA adapters, THUMOS14, 768 frames x 1 at 160 px.

  python -m tadjax.main --config configs/adatad_thumos_h.py --workdir workdirs/adatad_thumos_h \
      --config.data.annotations=PATH/thumos14.json --config.data.videos=PATH/videos
"""
from tadjax.config import adatad_thumos


def get_config(arg=None):
    return adatad_thumos("H", frames=768, img_size=160, arg=arg)
