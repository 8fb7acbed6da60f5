#!/usr/bin/env bash
# What a lent GPU session runs (the `device` tool): install with the CUDA kernels compiled for the GPU
# there, run the GPU tests, then the benchmark sets named on the command line.
#   bash benchmarks/gpu_session.sh OUTDIR tests
#   bash benchmarks/gpu_session.sh OUTDIR bench NAME [pytest-benchmark args...]   (results in OUTDIR/NAME/)
set -uo pipefail
OUT=${1:?output folder}
STEP=${2:?tests or bench}
shift 2
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if ! python3 -P -c "import pnnh_kernels._C" 2>/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
  start=$(date +%s)
  python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/device.txt"
fi
case "$STEP" in
  tests)  # one tile configuration per kernel: correctness needs no autotuning, and compiling is the cost
    # the linear file first: it is short, and the conv one is long enough to run past a device call's limit
    PNNH_TRITON_AUTOTUNE=0 python3 -P -m pytest -q -p no:cacheprovider tests/backends/test_cuda_conv.py \
      tests/backends/test_triton_linear.py tests/backends/test_triton_conv.py tests/backends/test_triton_kernels.py \
      tests/backends/test_contract.py tests/backends/test_graph_safety.py tests/backends/test_cuda_sources.py \
      tests/train/test_cuda_graphs.py --maxfail=10 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
    ;;
  bench)
    NAME=${1:?name}
    shift
    python3 -P -m pytest -q -p no:cacheprovider benchmarks/ --bench-results "$OUT/$NAME" "$@" 2>&1 | tail -8
    ;;
esac
