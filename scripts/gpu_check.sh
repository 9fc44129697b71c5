#!/usr/bin/env bash
# One-call GPU check of minivit's cupy backend, for a machine with an NVIDIA GPU, CuPy and
# PyTorch already installed and no internet (the lent H100/H200 machines: python3 there is
# Python 3.12 with torch, cupy-cuda13x, numpy, scipy, pytest, hypothesis, safetensors, tqdm).
#
#   bash scripts/gpu_check.sh          # from anywhere; the log goes to $OUT/gpu_check.log
#
# Steps (each under its own `timeout`; the limits add up to 14.5 minutes, 16 with dist-nccl; an
# H100 took under 2.5 before the half-precision steps; a failed step does not stop the ones after it, and the summary at the end
# gives every step's exit status):
#   environment   GPU, driver, Python, NumPy, CuPy, PyTorch versions
#   cuda-tests    pytest -k "cuda or cupy or half" (-n 12 with pytest-xdist):
#                 tests/test_cuda_{without_gpu,kernels,runtime,graphs}.py (fused kernels
#                 against NumPy, gradcheck on cupy, AdamW kernel, training run,
#                 TF32, CUDA graphs of ViT/BEiT/Swin steps), tests/test_cuda_attention.py
#                 (self-attention with a bias: relative bias, masks; Swin, BEiT on cupy),
#                 tests/test_cuda_position.py (relative bias backward kernel, in a graph),
#                 tests/test_half.py (bf16/fp16 GEMMs within the formats' bounds, fp16 loss
#                 scaling, half-precision CUDA graphs), tests/test_swin.py's cupy test and
#                 every backend-parametrised test's cupy case (tests/test_ops_*.py...)
#   bench-cifar   minivit bench --backend cupy --against torch --config cifar --profile
#   bench-cifar-graph  cifar again with --cuda-graph: whole-step CUDA graphs, replayed
#   bench-vit-s16 minivit bench ... --config vit_s16 --tf32 (5 steps x 2 rounds, to fit)
#   bench-{bf16,fp16}-{s16,b16}  vit_s16 / vit_b16 at batch 64 with --precision bf16 / fp16
#                 against PyTorch autocast (+ GradScaler for fp16), 5 steps x 2 rounds
#   train-graph   minivit train on the digits, 3 epochs, eager then --cuda-graph: images/s
#                 per epoch from each run's metrics.jsonl
#   dist-nccl     tests/test_distributed.py -k cupy: 1 rank (NCCL) and 2 ranks (NCCL with a GPU
#                 each, MPI over host copies on one GPU) train the weights of one process (train,
#                 and pretrain DINO with its synchronised head batch norm); only
#                 with mpi4py installed or its wheels in $DIST_WHEELS (default shared/dist-wheels,
#                 for Python 3.12: see the README's data-parallel section), else skipped
#   kernel-profile scripts/gpu_kernel_profile.py: GPU kernel times of both frameworks' steps
# The device has no internet: for dist-nccl, fetch the wheels on the VM first (14 MB; shared/
# travels with the working tree, and must not be committed):
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --platform manylinux1_x86_64 'mpi4py>=4.1' 'mpich>=5.0' -d shared/dist-wheels
# ONLY="name name ..." runs just those steps: the whole list takes longer than one 10-minute
# device call allows, so run it in two, e.g. the half-precision issue's:
#   ONLY="environment cuda-tests bench-cifar bench-bf16-s16 bench-fp16-s16 bench-bf16-b16
#         bench-fp16-b16" bash scripts/gpu_check.sh                     (limits: 565 s)
# minivit runs from this checkout through PYTHONPATH (python -m minivit.cli), so nothing is
# installed; PYTHON=... picks another interpreter.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-default}"
: >"$LOG"
SUMMARY=()
FAILED=0

step() {  # step NAME SECONDS COMMAND... : run it under timeout, tee its output to the log
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  if [ -n "${ONLY:-}" ] && [[ " $(echo $ONLY) " != *" $name "* ]]; then return 0; fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo "=== $name: TIMED OUT after ${limit}s" | tee -a "$LOG"
  [ "$rc" -ne 0 ] && FAILED=1
  SUMMARY+=("$(printf '%-14s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - start))")")
}

step environment 40 bash -c "
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv || true
  $PY -c 'import sys, numpy, scipy, cupy
print(sys.version.split()[0], sys.executable)
print(\"numpy\", numpy.__version__, \"scipy\", scipy.__version__, \"cupy\", cupy.__version__)
print(\"CUDA runtime\", cupy.cuda.runtime.runtimeGetVersion(), \"GPUs\", cupy.cuda.runtime.getDeviceCount())'
  $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.cuda.is_available())' || true"

# pytest-xdist (there on the lent machines) spreads the tests over 12 processes when present
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 12)
step cuda-tests 180 "$PY" -m pytest tests -q -k "cuda or cupy or half" --maxfail=40 -p no:cacheprovider \
  --tb=short -o addopts="-ra" "${XDIST[@]}"

step bench-cifar 75 "$PY" -m minivit.cli bench --backend cupy --against torch --config cifar \
  --profile

step bench-cifar-graph 60 "$PY" -m minivit.cli bench --backend cupy --against torch \
  --config cifar --cuda-graph

step bench-vit-s16 90 "$PY" -m minivit.cli bench --backend cupy --against torch --config vit_s16 \
  --steps 5 --rounds 2 --tf32

for model in s16 b16; do  # half precision against PyTorch autocast, batch 64
  for half in bf16 fp16; do
    step "bench-$half-$model" "$([ $model = s16 ] && echo 60 || echo 75)" "$PY" -m minivit.cli \
      bench --backend cupy --against torch --config "vit_$model" --batch 64 --precision "$half" \
      --steps 5 --rounds 2
  done
done

train_both() {  # eager, then with CUDA graphs; a run folder each under a temporary folder
  local runs
  runs=$(mktemp -d)
  for flag in "" --cuda-graph; do
    echo "--- minivit train --backend cupy --epochs 3 $flag"
    "$PY" -m minivit.cli train --backend cupy --epochs 3 $flag --out "$runs/run$flag" --quiet &&
      "$PY" -c 'import json, sys
for record in map(json.loads, open(sys.argv[1])):
    if record["split"] == "train":
        print("epoch", record["epoch"], "train", round(record["images_per_s"]), "images/s")' \
        "$runs/run$flag/metrics.jsonl" || return 1
  done
}
export -f train_both
export PY
step train-graph 60 bash -c train_both

dist_nccl() {  # data parallel on the GPU: needs mpi4py + mpich, from $DIST_WHEELS when missing
  if ! "$PY" -c "import mpi4py" 2>/dev/null; then
    [ -d "$DIST_WHEELS" ] || { echo "skipped: no mpi4py and no wheels in $DIST_WHEELS"; return 0; }
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --quiet --no-index --find-links "$DIST_WHEELS" mpi4py mpich || return 1
  fi
  "$PY" -c 'from cupy.cuda import nccl; print("NCCL", nccl.get_version(), "available", getattr(nccl, "available", True))' ||
    echo "cupy.cuda.nccl does not load: the ranks use MPI over host copies"
  "$PY" -m pytest tests/test_distributed.py -q -s -k cupy -p no:cacheprovider -o addopts="-rs"
}
export -f dist_nccl
export DIST_WHEELS="${DIST_WHEELS:-$PWD/shared/dist-wheels}"
step dist-nccl 90 bash -c dist_nccl

step kernel-profile 60 "$PY" scripts/gpu_kernel_profile.py --config vit_s16 --tf32

{
  echo "=== summary (log: $LOG)"
  printf '%s\n' "${SUMMARY[@]}"
} | tee -a "$LOG"
exit "$FAILED"
