r"""Progressive Block Drop, AdaTAD VideoMAE-S on THUMOS14 at 768 frames x 160 px: 12 -> 9 blocks,
with the reference's settings (spec blockdrop §4.5: LoRA rank 96, 60 epochs per round on a
65-epoch cosine with 5 warm-up epochs, lr 1e-4 for LoRA/norms/patch embedding and the head,
T = 3.5, all loss weights 1, EMA 0.999, selection by training-split mAP).

  python -m tadjax.main --config configs/blockdrop_thumos_s.py --mode compress \
      --workdir workdirs/blockdrop_thumos_s --config.compress.teacher=workdirs/adatad_thumos_s \
      --config.data.annotations=PATH/thumos14.json --config.data.videos=PATH/videos

The `model`, `data` and `train` sections are configs/adatad_thumos_s.py's, so the teacher is the
workdir of that training run. The reference evaluates with the test split inside each round to
keep its best checkpoint; this loop never looks at the test split before a round is finished.
"""
from tadjax.compress import compress_config
from tadjax.config import adatad_thumos


def get_config(arg=None):
    c = adatad_thumos("S", frames=768, img_size=160, arg=arg)
    with c.unlocked():
        c.compress = compress_config(teacher="workdirs/adatad_thumos_s", target="blocks:9",
                                     lora_rank=96, epochs=60, warmup_epochs=5, horizon_epochs=65,
                                     backbone_lr=1e-4, head_lr=1e-4)
    c.lock()
    return c
