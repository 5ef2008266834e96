#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run of about 10 minutes on one H100/H200:
#
#   OUT=gpu-results bash benchmarks/gpu_checks.sh
#
# 1. the CUDA tests (tests/test_cuda.py: GPU equals CPU, half precision, no host
#    synchronisation, torch.compile, blockwise attention, a bfloat16 Llama);
# 2. the text benchmark's GPU row (a 1B-parameter-shaped Llama, 4096 tokens, bfloat16);
# 3. the explanation benchmark on the GPU (VGG16 and ResNet-50 at batch 1, 8 and 32; DeepLabV3
#    and Faster R-CNN at 400 px);
# 4. the data-set pipeline on the GPU, 200 and 1000 images, and under torchrun with one process
#    per GPU (NCCL).
#
# Runs from the repository root with the python3 that has torch (PYTHON= to choose another);
# lrpx itself is taken from this checkout. Each step has its own time limit and writes its output
# to $OUT/<step>.txt; a step that fails or runs out of time does not stop the others.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    tail -n 40 "$OUT/$name.txt"
}

step environment 60 bash -c "nvidia-smi -L; $PY -c 'import torch, lrpx; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.device_count(), \"GPUs\")'"
step cuda-tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
step text 100 "$PY" benchmarks/bench_text.py --device cuda --dtype bfloat16 --layers 16 --hidden 2048 --tokens 4096 --repeat 5
step explain 120 "$PY" benchmarks/bench_explain.py --device cuda --models vgg16 resnet50 --batch 1 8 32 --repeat 10 --threads 8
step dense 90 "$PY" benchmarks/bench_explain.py --device cuda --models --segmentation deeplabv3_resnet50 --detection fasterrcnn_resnet50_fpn --batch 1 --size 400 --repeat 10 --threads 8 --no-peers
step dataset 150 "$PY" benchmarks/bench_dataset.py --device cuda --images 200 1000 --workers 0 4 --threads 8 --repeat 3
