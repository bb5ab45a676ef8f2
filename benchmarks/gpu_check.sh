#!/usr/bin/env bash
# One GPU check of fedscore: the CUDA tests, then the throughput benchmark (fp32 vs bf16 for
# the tiny / small / paper U-Nets, engine strategies, federated round vs its centralised
# floor, K agents vs one model). Logs and JSON go under $OUT (default benchmarks/out/gpu-check):
#   env.txt  cuda-tests.log  throughput.log  throughput.json  summary.txt
# Budget: under 8 minutes on one H200 (tests <= 3 min, benchmark <= 5 min, each with a
# timeout, so a hang still leaves the other's results).
#
# The GPU machine reaches no package registry. Its python3 holds torch (CUDA), numpy, scipy,
# scikit-learn, typer, pyyaml, safetensors, tqdm, pytest...; what fedscore needs beyond that
# travels as wheels in .whl/ (git-ignored), fetched beforehand on a machine that has pip:
#
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --fetch-wheels   # here, once
#   bash benchmarks/gpu_check.sh                  # there, from the repo root, .whl carried
#   bash benchmarks/gpu_check.sh --no-install     # anywhere: use the python as it is
#
# Without a CUDA device the CUDA tests skip and the benchmark is a CPU smoke run.
set -uo pipefail

MODE=check
INSTALL=1
for arg in "$@"; do
  case "$arg" in
    --fetch-wheels) MODE=fetch ;;
    --no-install) INSTALL=0 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.." || exit 1

# fedscore's dependencies the GPU image lacks (pydantic and Flower's import-time needs; not
# Ray, not Flower's SuperLink stack: the Flower checks there call the ClientApp in-process),
# pinned to the versions of the local venv; grpcio / protobuf too, as flwr's generated code
# must match them.
WHEELS="pydantic pydantic-core annotated-types typing-inspection flwr cryptography cffi
pycparser pycryptodome iterators grpcio grpcio-health-checking protobuf tomli tomli-w"

if [ "$MODE" = fetch ]; then
  PY=${PYTHON:-.venv/bin/python}
  mkdir -p .whl
  pins=()
  for name in $WHEELS; do
    v=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    [ -n "$v" ] || { echo "$name is not installed in $PY" >&2; exit 1; }
    pins+=("$name==$v")
  done
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_24_x86_64 -d .whl "${pins[@]}" \
    || exit 1
  du -sh .whl
  echo "carry .whl with the device run: run(command='bash benchmarks/gpu_check.sh', carry=['.whl'])"
  exit 0
fi

OUT=${OUT:-benchmarks/out/gpu-check}
mkdir -p "$OUT"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
if [ "$INSTALL" = 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fedscore-site .whl/*.whl || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/fedscore-site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FLWR_TELEMETRY_ENABLED=0

{
  date -u; nvidia-smi 2>&1 | head -15; echo "python: $PY"
  "$PY" -c "import torch, fedscore.runtime as r; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '',
'devices', r.available_devices(), 'bf16 native', r.bf16_supported(r.resolve().device))"
  "$PY" -c "import flwr, pydantic; print('flwr', flwr.__version__, 'pydantic', pydantic.VERSION)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
TESTS="tests/federated/test_engine.py::test_a_round_on_cuda_equals_the_cpu_loop
tests/test_cuda_runtime.py tests/flower/test_cuda_clientapp.py tests/test_runtime.py
tests/flower/test_client_device.py"
t0=$(date +%s)
# shellcheck disable=SC2086
timeout 180 "$PY" -m pytest -q -rs -p no:cacheprovider -o addopts="" \
  --continue-on-collection-errors $TESTS \
  2>&1 | tee "$OUT/cuda-tests.log"
tests_rc=${PIPESTATUS[0]}
t1=$(date +%s)

# BENCH_ARGS overrides the benchmark's flags (e.g. "--device cuda --models tiny small")
if [ -n "${BENCH_ARGS:-}" ]; then read -r -a BENCH <<<"$BENCH_ARGS"
elif [ "$CUDA" = 1 ]; then BENCH=(--device cuda)
else BENCH=(--device cpu --quick --models tiny --batch 8 --steps 1); fi  # a smoke run
timeout 300 "$PY" benchmarks/throughput.py "${BENCH[@]}" --out "$OUT/throughput.json" \
  2>&1 | tee "$OUT/throughput.log"
bench_rc=${PIPESTATUS[0]}
t2=$(date +%s)

{
  echo "cuda available: $CUDA"
  echo "CUDA tests: exit $tests_rc in $((t1 - t0)) s: $(tail -n 1 "$OUT/cuda-tests.log")"
  echo "throughput: exit $bench_rc in $((t2 - t1)) s (124: timed out)"
  sed -n '/^| model/,$p' "$OUT/throughput.log"
} | tee "$OUT/summary.txt"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
