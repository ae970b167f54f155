r"""AdaTAD, VideoMAEv2-g, THUMOS14, 1,536 frames (768 positions x 2) at 224 px; TIA on blocks 20-39.

  python -m tadjax.main --config configs/adatad_thumos_g_1536_224.py --workdir workdirs/g1536 \
      --config.data.annotations=PATH/thumos14.json --config.data.videos=PATH/videos
"""
from tadjax.config import adatad_thumos


def get_config(arg=None):
    return adatad_thumos("g", frames=1536, img_size=224, arg=arg)
