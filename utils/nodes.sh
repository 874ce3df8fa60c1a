# Shared by run_train.sh and run_generate.sh (sourced): one error line and exit 1; the node checks.
bad() { echo "error: $1" >&2; exit 1; }
count() { case "$1" in ''|*[!0-9]*) return 1 ;; esac; [ "$1" -ge "$2" ]; }  # an integer >= $2
# check_nodes: NNODES a positive integer; with NNODES > 1, NODE_RANK in 0..NNODES-1
check_nodes() {
  count "$NNODES" 1 || bad "NNODES=$NNODES is not allowed; use a positive integer (the number of nodes)"
  [ "$NNODES" -eq 1 ] || { count "$NODE_RANK" 0 && [ "$NODE_RANK" -lt "$NNODES" ]; } ||
    bad "NODE_RANK=${NODE_RANK:-(unset)} is not allowed; use 0..$((NNODES - 1)) (this node's rank of NNODES=$NNODES)"
}
