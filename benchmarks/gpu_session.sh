#!/usr/bin/env bash
# What a lent GPU session runs (the `device` tool): install with the CUDA kernels compiled for the GPU
# there, run the GPU tests, then the benchmark sets named on the command line.
#   bash benchmarks/gpu_session.sh OUTDIR all      (tests, probe, model on cifar56: each under its own time limit,
#        under 8 minutes together after the build; what a session with one call to spare runs)
#   bash benchmarks/gpu_session.sh OUTDIR tests
#   bash benchmarks/gpu_session.sh OUTDIR bench NAME [pytest-benchmark args...]   (results in OUTDIR/NAME/)
#   bash benchmarks/gpu_session.sh OUTDIR probe    (cuDNN's fused conv graphs: support and timings)
#   bash benchmarks/gpu_session.sh OUTDIR model [--sets cifar56 --dtypes bf16,fp16 ...]   (a whole training
#        step every way, images/s, peak memory, kernel profile: benchmarks/model_step.py)
# The device machine reaches no package index: the cudnn-frontend headers travel with the working tree.
# Run `bash benchmarks/fetch_cudnn_frontend.sh` here first and pass carry=[".cudnn_frontend"] to the device
# tool; without them the build leaves the cuDNN fused graphs out (the rest is unchanged).
set -uo pipefail
OUT=${1:?output folder}
STEP=${2:?all, tests, probe, model or bench}
shift 2
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
if [ -f .cudnn_frontend/include/cudnn_frontend.h ]; then export CUDNN_FRONTEND_INCLUDE=$PWD/.cudnn_frontend/include; fi
mkdir -p "$OUT"
if ! python3 -P -c "import pnnh_kernels._C" 2>/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
  start=$(date +%s)
  if ! python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    echo "build failed; again without the cuDNN fused graphs" | tee -a "$OUT/device.txt"
    PNNH_NO_CUDNN_FRONTEND=1 python3 -m pip install --no-build-isolation --no-deps -q . > "$OUT/build2.log" 2>&1 \
      || { tail -40 "$OUT/build2.log"; exit 1; }
  fi
  echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/device.txt"
fi
case "$STEP" in
  all)  # a part that runs out of time is cut, and the next one still runs
    timeout 200 bash "$0" "$OUT" tests
    timeout 60 bash "$0" "$OUT" probe
    timeout 200 bash "$0" "$OUT" model --sets cifar56 --dtypes bf16,fp16 --steps 10
    ;;
  tests)  # one tile configuration per kernel: correctness needs no autotuning, and compiling is the cost
    # the linear file first: it is short, and the conv one is long enough to run past a device call's limit
    # the cuda backend and cuDNN's graphs first: they compile nothing at run time
    PNNH_TRITON_AUTOTUNE=0 python3 -P -m pytest -q -p no:cacheprovider tests/backends/test_cuda_conv.py \
      tests/backends/test_cudnn_fused.py tests/backends/test_triton_linear.py tests/backends/test_triton_conv.py \
      tests/backends/test_triton_kernels.py tests/backends/test_contract.py tests/backends/test_graph_safety.py \
      tests/backends/test_cuda_sources.py tests/backends/test_huge_activations.py tests/train/test_cuda_graphs.py \
      --maxfail=10 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
    ;;
  model)
    python3 -P benchmarks/model_step.py "$OUT" --profile "$@" 2>&1 | tail -40
    ;;
  probe)
    python3 -P -c "import pnnh_kernels._C as c; print('cudnn-frontend graphs built:', c.with_cudnn_frontend)" | tee -a "$OUT/device.txt"
    python3 -P benchmarks/cudnn_probe.py "$OUT" 2>&1 | tail -30
    ;;
  bench)
    NAME=${1:?name}
    shift
    python3 -P -m pytest -q -p no:cacheprovider benchmarks/ --bench-results "$OUT/$NAME" "$@" 2>&1 | tail -8
    ;;
esac
