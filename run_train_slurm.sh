#!/bin/sh
# LLM-QAT on several nodes under SLURM: one torchrun per node (run_train.sh with NNODES, NODE_RANK, MASTER_ADDR,
# MASTER_PORT from the allocation), each with one process per visible GPU.
#   sbatch --nodes 2 --gpus-per-node 8 run_train_slurm.sh 4 8 4 [train.py args]
#   ENTRY=run_train_chunk.sh sbatch --nodes 2 ... : train straight from the generation shards
# Environment as run_train.sh (MODEL, TRAIN_DATA, OUTPUT on a filesystem every node sees; PYTHON); MASTER_PORT
# defaults to one derived from the job id.
#SBATCH --job-name=llm-qat
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=llm-qat-%j.out
set -e
# sbatch runs a copy of this file from its spool directory: the repository is where the job was submitted
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")}"
[ -n "$SLURM_JOB_NODELIST" ] || { echo "error: no SLURM allocation (SLURM_JOB_NODELIST unset); submit with sbatch" >&2; exit 1; }
ENTRY=${ENTRY:-run_train.sh}
case "$ENTRY" in run_train.sh|run_train_chunk.sh) ;; *)
  echo "error: ENTRY=$ENTRY is not allowed; use run_train.sh or run_train_chunk.sh" >&2; exit 1 ;; esac
NNODES=${SLURM_JOB_NUM_NODES:-$SLURM_NNODES}
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
export NNODES MASTER_ADDR MASTER_PORT
echo "$NNODES node(s), rendezvous $MASTER_ADDR:$MASTER_PORT, $ENTRY $*"
# one task per node; SLURM_NODEID is that node's index in the allocation, 0 on MASTER_ADDR's node
exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 sh -c 'NODE_RANK=$SLURM_NODEID exec sh "$0" "$@"' "$ENTRY" "$@"
