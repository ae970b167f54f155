#!/usr/bin/env bash
# Train on one machine with all its accelerators (or CPU) in one process.
#
#   launch/single_host.sh CONFIG WORKDIR [--config.x=y ...]
#   launch/single_host.sh configs/adatad_thumos_s.py workdirs/thumos_s \
#       --config.data.annotations=/data/thumos/thumos14.json --config.data.videos=/data/thumos/videos
#
# One process drives every local device; the mesh comes from config.mesh (default: the batch over
# all devices; THUMOS configs: the chunks of each video over all devices). Re-running the same
# command resumes from WORKDIR's latest checkpoint. Set CUDA_VISIBLE_DEVICES to use fewer GPUs.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,10p' "$0"; exit 2
fi
CONFIG=$1; WORKDIR=$2; shift 2
cd "$(dirname "$0")/.."
# Let XLA take GPU memory as needed instead of preallocating 75% (friendlier to shared machines).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec python -m tadjax.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
