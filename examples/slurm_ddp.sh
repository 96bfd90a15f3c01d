#!/usr/bin/env bash
# Distributed data-parallel training of a cxrlab model on SLURM: N nodes x G GPUs, one torchrun per node.
#
#   sbatch examples/slurm_ddp.sh /data/chest_xray runs/resnet18-ddp
#
# Adjust --nodes, --gres/--gpus-per-node, --cpus-per-task, the partition and the environment lines to
# your cluster. --batch-size is the GLOBAL batch: it stays 64 whatever the number of GPUs (each GPU
# runs 64 / (nodes * gpus) images per step), so results are comparable across allocations.
# Resubmitting the same script after a time-out continues the run (--resume when last.pt exists).
#
#SBATCH --job-name=cxrlab-ddp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1            # one torchrun launcher per node; it starts one process per GPU
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

DATA=${1:?usage: sbatch slurm_ddp.sh DATA_DIR RUN_DIR}
OUT=${2:?usage: sbatch slurm_ddp.sh DATA_DIR RUN_DIR}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-4}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}     # "a100:4" -> "4"

# source ~/venvs/cxrlab/bin/activate  # or: module load ...; conda activate cxrlab

# The first node of the allocation hosts the c10d rendezvous.
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}
RESUME=()
[ -f "$OUT/last.pt" ] && RESUME=(--resume)

export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / GPUS_PER_NODE ))
# export NCCL_SOCKET_IFNAME=ib0        # pick the network interface if NCCL chooses a wrong one
# export NCCL_DEBUG=WARN

# Decoded images are cached (default ~/.cache/cxrlab, or --cache-dir): rank 0 fills the cache while
# the other ranks wait, then they read it. On a shared home the other nodes find it filled; with a
# node-local --cache-dir each node's ranks decode once more themselves.

srun --kill-on-bad-exit=1 torchrun \
  --nnodes="$SLURM_NNODES" --nproc-per-node="$GPUS_PER_NODE" \
  --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$HEAD:$PORT" \
  -m cxrlab train \
    --data "$DATA" --out "$OUT" \
    --model resnet18 --img-size 224 --epochs 30 \
    --batch-size 64 --lr 1e-3 --sync-bn \
    --quiet "${RESUME[@]}"
