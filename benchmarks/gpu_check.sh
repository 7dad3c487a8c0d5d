#!/usr/bin/env bash
# The GPU check: on a CUDA machine with only this repository, install what is missing, run the compiled-Triton tests
# (tests/test_cuda.py), the kernel benchmarks at the real shapes (benchmarks/kernels.py on CUDA runs B=4, T=1024,
# H=4096, V=32k and 128k in bf16, among others) and the K-answer target (benchmarks/listwise.py --target), and write
# everything to one folder.
#
#   bash benchmarks/gpu_check.sh                 # results in $OUT when set, else benchmarks/gpu-check-<time>/
#   GPU_CHECK_QUICK=1 bash benchmarks/gpu_check.sh   # benchmarks with --quick (fewer sizes)
#
# Installing: packages already importable are used as they are (a CUDA image brings its own torch and triton; this
# script never replaces them). Missing ones come from the wheels in $WHEELS (default: .whl/ in the repository) when
# that folder exists, for machines without a network, else from the package index with pip. dpalogic itself runs
# from the checkout (PYTHONPATH), so nothing is built.
#
# Budget: under 8 minutes on one H200. Each stage has its own time limit, so a hang in one still leaves the others'
# results; the summary (summary.txt) says which stage ended how.
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
STAMP="$(date -u +%Y%m%d-%H%M%S)"
RESULTS="${OUT:-$REPO/benchmarks/gpu-check-$STAMP}"
WHEELS="${WHEELS:-$REPO/.whl}"
TEST_LIMIT="${GPU_CHECK_TEST_LIMIT:-200}"    # seconds for tests/test_cuda.py
BENCH_LIMIT="${GPU_CHECK_BENCH_LIMIT:-240}"  # seconds for benchmarks/kernels.py
mkdir -p "$RESULTS"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
SUMMARY="$RESULTS/summary.txt"
: >"$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

say "dpalogic GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
say "results: $RESULTS"

# --- 1. what is missing, and install it -----------------------------------------------------------------------
# import name -> pip requirement (the project's own pins for the test anchors)
REQUIREMENTS=(
  "lark:lark>=1.1" "sympy:sympy>=1.12" "rich:rich>=13" "networkx:networkx>=3" "yaml:pyyaml"
  "safetensors:safetensors" "hypothesis:hypothesis>=6.100" "pytest:pytest>=8" "mpmath:mpmath"
  "triton:triton>=3.0" "transformers:transformers>=4.46" "liger_kernel:liger-kernel==0.8.5" "trl:trl==1.16.0"
)
missing=()
for pair in "${REQUIREMENTS[@]}"; do
  mod="${pair%%:*}"
  req="${pair#*:}"
  "$PY" -c "import $mod" >/dev/null 2>&1 || missing+=("$req")
done
if ((${#missing[@]})); then
  say "installing: ${missing[*]}"
  if [ -d "$WHEELS" ]; then
    # offline: every wheel in the folder (the folder holds the missing packages and their own missing needs)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$RESULTS/.site" "$WHEELS"/*.whl \
      >"$RESULTS/install.log" 2>&1
    export PYTHONPATH="$PYTHONPATH:$RESULTS/.site"
  else
    "$PY" -m pip install -q "${missing[@]}" >"$RESULTS/install.log" 2>&1
  fi
  status=$?
  say "install: exit $status (log: install.log)"
fi

# --- 2. the machine ---------------------------------------------------------------------------------------------
{
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$PY" - <<'EOF'
import importlib, platform, sys
import torch
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
for name in ("triton", "transformers", "trl", "liger_kernel", "sympy", "lark"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as e:  # a missing anchor is reported, and its columns read n/a
        print(name, "unavailable:", type(e).__name__, e)
EOF
} >"$RESULTS/machine.txt" 2>&1
tee -a "$SUMMARY" <"$RESULTS/machine.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no CUDA device: this check needs a GPU (machine.txt says what was found)"
  [ "${GPU_CHECK_ALLOW_CPU:-0}" = "1" ] || exit 2
  say "GPU_CHECK_ALLOW_CPU=1: going on with the CPU (a smoke run of this script, not a GPU result)"
fi

# --- 3. the compiled-Triton tests -------------------------------------------------------------------------------
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
start=$(date +%s)
timeout "$TEST_LIMIT" "$PY" -m pytest -p no:cacheprovider -o addopts="" -q -rs tests/test_cuda.py \
  --junitxml="$RESULTS/test_cuda.xml" >"$RESULTS/test_cuda.log" 2>&1
status=$?
say "tests/test_cuda.py: exit $status in $(($(date +%s) - start)) s ($(tail -n 1 "$RESULTS/test_cuda.log"))"

# --- 4. the kernel benchmarks -----------------------------------------------------------------------------------
start=$(date +%s)
quick=()
[ "${GPU_CHECK_QUICK:-0}" = "1" ] && quick=(--quick)
timeout "$BENCH_LIMIT" "$PY" benchmarks/kernels.py "${quick[@]}" >"$RESULTS/kernels.txt" 2>&1
status=$?
say "benchmarks/kernels.py ${quick[*]}: exit $status in $(($(date +%s) - start)) s (tables: kernels.txt)"

# --- 5. the K-answer target (issue #12): top-1 ExactlyOne, K = 64, B = 4096, against a softmax, on the GPU ----------
start=$(date +%s)
timeout "${GPU_CHECK_LISTWISE_LIMIT:-60}" "$PY" benchmarks/listwise.py --target >"$RESULTS/listwise.txt" 2>&1
status=$?
say "benchmarks/listwise.py --target: exit $status in $(($(date +%s) - start)) s (table: listwise.txt)"
say "done"
