#!/usr/bin/env bash
# The cudnn-frontend headers into ./.cudnn_frontend/include (git-ignored), for a GPU machine that reaches
# no package index: pass carry=[".cudnn_frontend"] to the device tool (benchmarks/gpu_session.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps nvidia-cudnn-frontend -d "$tmp"
rm -rf .cudnn_frontend && mkdir -p .cudnn_frontend
python3 -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); [z.extract(n, '.cudnn_frontend') for n in z.namelist() if n.startswith('include/')]" "$tmp"/nvidia_cudnn_frontend-*.whl
du -sh .cudnn_frontend
