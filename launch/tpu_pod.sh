#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: the same command on every worker, one process per host.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#   launch/tpu_pod.sh my-v5p-32 us-east5-a configs/adatad_thumos_g_1536_224.py \
#       gs://my-bucket/runs/g1536 --config.data.annotations=... --config.data.videos=...
#
# Requirements: the repository checked out at the same path (REPO, default ~/tadjax) on every
# worker with its dependencies installed (`pip install -e .` and jax[tpu]), data readable from
# every worker (a bucket mounted with gcsfuse, or a copy per host), and WORKDIR on storage all
# workers share (a gs:// path or a shared file system): orbax writes one checkpoint collectively.
# --distributed makes each worker call jax.distributed.initialize(), which finds the other
# workers through the TPU metadata server. Each process reads its own share of the videos.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,14p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO=${REPO:-'~/tadjax'}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd $REPO && python -m tadjax.main --distributed --config $(printf '%q' "$CONFIG") \
      --workdir $(printf '%q' "$WORKDIR")$ARGS 2>&1 | tee -a /tmp/tadjax_train.log"
