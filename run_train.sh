#!/bin/sh
# LLM-QAT: sh run_train.sh W A KV [extra train.py args]     e.g. sh run_train.sh 4 8 4 --max_steps 20
# Environment: MODEL (HF model dir, or a packaged model's name: smollm2), TRAIN_DATA, EVAL_DATA (jsonl, glob or comma list), NPROC (CPU processes
# when no GPU is visible; default 1), OUTPUT (default output), PYTHON (default python).
# Several nodes (torchrun's static rendezvous; run this on every node): NNODES (default 1: --standalone),
# NODE_RANK (0..NNODES-1), MASTER_ADDR (node 0's address), MASTER_PORT (default 29500). run_train_slurm.sh sets them.
# With GPUs: one process per visible GPU, bf16, FSDP full_shard auto_wrap on the decoder layer class.
set -e
cd "$(dirname "$0")"
usage="usage: sh $0 W A KV [train.py args]   (bits: 1-8, 16 or 32; W 0: ternary, with --w_quantizer seq)"
[ $# -ge 3 ] || { echo "$usage" >&2; exit 1; }
W=$1 A=$2 KV=$3; shift 3

. utils/nodes.sh
NNODES=${NNODES:-1}
check_nodes
[ -z "$NPROC" ] || count "$NPROC" 1 || bad "NPROC=$NPROC is not allowed; use a positive integer (processes per node)"
if [ "$NNODES" -gt 1 ]; then
  [ -n "$MASTER_ADDR" ] || bad "MASTER_ADDR is unset; with NNODES=$NNODES set it to node 0's address on every node"
  MASTER_PORT=${MASTER_PORT:-29500}
  { count "$MASTER_PORT" 1 && [ "$MASTER_PORT" -le 65535 ]; } || bad "MASTER_PORT=$MASTER_PORT is not allowed; use 1-65535"
fi

PYTHON=${PYTHON:-python}
EMBEDDED=assets/tiny_llama
MODEL=${MODEL:-$EMBEDDED}
if [ ! -e "$MODEL" ] && $PYTHON -c "import sys; from utils.model_zoo import MODELS; sys.exit(sys.argv[1] not in MODELS)" "$MODEL" 2>/dev/null; then
  MODEL=$($PYTHON tools/get_model.py "$MODEL" | tail -n 1) || exit 1  # a packaged model's name, e.g. smollm2
fi
[ -f "$MODEL/config.json" ] || { echo "error: MODEL=$MODEL is not a local Hugging Face model directory (no config.json)" >&2; exit 1; }
OUTPUT=${OUTPUT:-output}
if [ -z "$TRAIN_DATA" ]; then
  TRAIN_DATA=gen_data/all_gen.jsonl
  if [ ! -f "$TRAIN_DATA" ] && [ "$MODEL" = "$EMBEDDED" ]; then
    echo "note: no $TRAIN_DATA yet (generate_data.py + merge_gen_data.py): training on real text instead"
    TRAIN_DATA=assets/data/shakespeare_train_small.jsonl
  fi
fi
if [ -z "$EVAL_DATA" ]; then
  if [ "$MODEL" = "$EMBEDDED" ]; then EVAL_DATA=assets/data/shakespeare_eval.jsonl; else EVAL_DATA=wiki2.jsonl; fi
fi
EVAL="--do_eval True --eval_data_local_path $EVAL_DATA"
[ -e "$EVAL_DATA" ] || { EVAL=""; echo "note: no eval data $EVAL_DATA: skipping perplexity (set EVAL_DATA)"; }

# The bits (with --w_quantizer, if given: ternary w_bits 0 needs seq) are checked by QuantSetting (one rule, one
# message); then the devices and whether bf16 pays.
WQ=absmax PREV=
for ARG in "$@"; do
  case "$PREV" in --w_quantizer) WQ=$ARG ;; esac
  case "$ARG" in --w_quantizer=*) WQ=${ARG#*=} ;; esac
  PREV=$ARG
done
# (light modules only: the check takes torch's import time, not transformers')
CHECK=$($PYTHON -c "import sys, torch; from models.dtypes import bf16_pays
from models.config_file import config_json, text_hidden_size; from models.setting import QuantSetting
from utils.errors import cli
cli(lambda: QuantSetting.of(*sys.argv[1:4], w_quantizer=sys.argv[5]))
print(torch.cuda.device_count(), int(bf16_pays(text_hidden_size(cli(lambda: config_json(sys.argv[4]))))))" \
  "$W" "$A" "$KV" "$MODEL" "$WQ") || exit 1
read -r NGPU BF16 <<EOT
$CHECK
EOT
[ -n "$NGPU" ] || { echo "error: $PYTHON cannot import torch; pip install -r requirements.txt" >&2; exit 1; }
if [ "$NGPU" -gt 0 ]; then
  NPROC=$NGPU
  DEVICE="--gradient_checkpointing True"
  [ "$BF16" = 1 ] && DEVICE="$DEVICE --bf16 True" || echo "note: this GPU has no bf16: training in fp32"
else
  NPROC=${NPROC:-1}
  # bf16 autocast with fp32 master weights where the CPU multiplies bf16 natively and the model is wide enough
  # for it to pay (1.7x the fp32 step rate on SmolLM2 here; the embedded model stays fp32); --bf16 False: fp32
  DEVICE="--use_cpu True --bf16 $([ "$BF16" = 1 ] && echo True || echo False) --dataloader_pin_memory False"
fi
FSDP=""
[ $((NPROC * NNODES)) -gt 1 ] && FSDP="full_shard auto_wrap"
# The paper's recipe; the embedded model (256-token training context) takes shorter blocks, 4 per batch.
RECIPE=""
[ "$MODEL" = "$EMBEDDED" ] && RECIPE="--model_max_length 256 --per_device_train_batch_size 4"

if [ "$NNODES" -gt 1 ]; then
  LAUNCH="$PYTHON -m torch.distributed.run --nnodes $NNODES --node_rank $NODE_RANK --master_addr $MASTER_ADDR"
  LAUNCH="$LAUNCH --master_port $MASTER_PORT --nproc_per_node $NPROC"
elif [ "$NPROC" -gt 1 ]; then
  LAUNCH="$PYTHON -m torch.distributed.run --standalone --nproc_per_node $NPROC"
else
  LAUNCH="$PYTHON"
fi
NODES=""
[ "$NNODES" -gt 1 ] && NODES=" on each of $NNODES nodes (this is node $NODE_RANK, rendezvous $MASTER_ADDR:$MASTER_PORT)"
echo "W$W A$A KV$KV on $MODEL: $NPROC process(es)$NODES, train $TRAIN_DATA"
# The paper's recipe is train.py's defaults (utils/process_args.py: lr 2e-5, cosine, no warmup or weight decay, one
# epoch, batch 1 x 2048 tokens, KD with scale 1, checkpoints every 2000 steps); this passes what it decides.
exec $LAUNCH train.py \
  --input_model_filename "$MODEL" \
  --train_data_local_path "$TRAIN_DATA" \
  --local_dir "$OUTPUT" \
  $EVAL \
  --qat True --w_bits "$W" --a_bits "$A" --kv_bits "$KV" \
  $RECIPE $DEVICE ${FSDP:+--fsdp} ${FSDP:+"$FSDP"} \
  "$@"
