#!/bin/sh
# The paper's table at small scale on the embedded model: generate data, train every setting with KD,
# evaluate every row, write results/tiny_table.{md,json,png}.
#   sh reproduce_tiny.sh            # the committed full run, ~1 h on 2 CPU cores; rerun to resume
#   sh reproduce_tiny.sh --quick    # the same files in a few minutes (results/quick/)
# Flags: --out_dir DIR, --work_dir DIR (python -m utils.reproduce --help). Environment: PYTHON.
set -e
cd "$(dirname "$0")"
exec ${PYTHON:-python} -c "from utils.startup import imports_without_gc
with imports_without_gc():
    from utils.allocator import tune_cpu_allocator; tune_cpu_allocator(); from utils.errors import cli; from utils.reproduce import main
cli(main)" "$@"
