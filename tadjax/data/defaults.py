"""`config.data`'s defaults, in a module of their own: reading a config file imports no data
stack (grain, TFDS, decord) and no JAX."""
from __future__ import annotations

import ml_collections


def default_data_config() -> ml_collections.ConfigDict:
    """`config.data` with AdaTAD's THUMOS14 settings at 160 px (768 x 1 frames)."""
    c = ml_collections.ConfigDict()
    # Where the data is. annotations="synthetic" uses tadjax.data.synthetic.default_dataset().
    c.annotations = "synthetic"
    c.videos = ""                   # directory of video files (ignored for "synthetic")
    c.tfds_dir = ""                 # built datasets; "" = $TADJAX_CACHE/tfds or ~/.cache/tadjax/tfds
    c.name = "synthetic"            # dataset name, part of the TFDS config name
    c.store_video = "bytes"         # "bytes": encoded videos inside the dataset; "path": file paths
    c.train_subset = "training"
    c.eval_subset = "validation"
    # None (sorted labels of the file), a list of names or a class-list file.
    c.classes = ml_collections.FieldReference(None, field_type=object)
    c.blocked = ml_collections.FieldReference((), field_type=object)  # video ids, or a block-list file
    c.class_agnostic = False
    c.thumos_conventions = ml_collections.FieldReference(None, field_type=bool)
    c.skip_bad_videos = False
    # Sampling.
    c.mode = "window"               # "window" (THUMOS: snippets, sliding test windows) | "resize" (ANet)
    c.window = 768                  # T in window mode: grid positions per window
    c.snippet_stride = 4            # raw frames per grid position (window mode)
    c.scale_factor = 1              # frames per grid position fed to the backbone
    c.resize_length = 192           # T in resize mode
    c.trunc_thresh = 0.75           # a training window must keep >= this of one instance
    c.crop_ratio = (0.9, 1.0)       # random crop of videos shorter than a window
    c.test_overlap = 0.5            # sliding test windows
    c.min_relative_length = 0.0     # resize mode, training: drop GT with duration/video <= this (ANet: 0.01)
    c.max_gt = 128                  # M: GT slots per window (THUMOS14 train: up to 68); extra ones dropped with a warning
    # Images.
    c.img_size = 160
    c.train_short_side = 182
    c.eval_short_side = 160
    c.rrc_scale = (0.08, 1.0)       # random resized crop area range
    c.flip = True
    c.color_jitter = True
    # Batching.
    c.batch_size = 2                # global, over all processes
    c.num_workers = 0               # worker processes for decoding (0: in this process)
    c.seed = 0
    return c
