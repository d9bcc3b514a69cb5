#!/usr/bin/env bash
# The -m gpu suite on the GPU machine, in four shards run side by side (the builds are
# CPU-bound: 16 cores), each file's tests named in its log; a crash ends only its shard.
#
#   OUT=/tmp/gpu LIMIT=400 bash benchmarks/gpu_suite.sh
#
# Logs: $OUT/shard-{1,2,3,4}.log; a summary of each shard's last line in $OUT/summary.txt.
# test_serve.py needs Ray (benchmarks/serve_gpu_bundle.sh brings it) and is left out here.
set -u
OUT=${OUT:-/tmp/gpu-suite}
LIMIT=${LIMIT:-400}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
heavy1="tests/test_zoo_engines.py tests/test_tune.py"
heavy2="tests/test_zoo_families.py tests/test_vocabulary.py tests/test_kernel_catalog.py tests/test_attention_bias.py tests/test_rowwise.py"
ignore=""
for f in $heavy1 $heavy2 tests/test_serve.py; do ignore="$ignore --ignore=$f"; done
args="-m gpu -v -rfE --tb=short -p no:cacheprovider"
run() {  # shard number, then what pytest collects
    local n=$1; shift
    timeout -s INT -k 30 "$LIMIT" python3 -m pytest $args "$@" >"$OUT/shard-$n.log" 2>&1
    echo "shard $n (rc $?): $(tail -n 1 "$OUT/shard-$n.log")" >>"$OUT/summary.txt"
}
run 1 tests/test_zoo_engines.py -k fp16 &
run 4 $heavy1 -k "not fp16" &
run 2 $heavy2 &
run 3 tests $ignore &
wait
cat "$OUT/summary.txt"
grep -h -E "^(FAILED|ERROR) " "$OUT"/shard-*.log || true
