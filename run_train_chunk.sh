#!/bin/sh
# LLM-QAT straight from the generation shards, no merge: sh run_train_chunk.sh W A KV [train.py args]
# Reads GEN_DIR/gen.chunk.*.jsonl (GEN_DIR default gen_data); shards still being written are fine
# (an unfinished last line is skipped). Everything else as run_train.sh.
cd "$(dirname "$0")"
GEN_DIR=${GEN_DIR:-gen_data}
if ! ls "$GEN_DIR"/gen.chunk.*.jsonl >/dev/null 2>&1; then
  echo "error: no shards $GEN_DIR/gen.chunk.*.jsonl; run generate_data.py first (or set GEN_DIR)" >&2
  exit 1
fi
TRAIN_DATA="$GEN_DIR/gen.chunk.*.jsonl" exec sh run_train.sh "$@"
