#!/usr/bin/env bash
# The GPU checks the CPU cannot do, in one run: the CUDA tests (placement, a memory offloaded to pinned CPU memory,
# int8 moved as int8) and the segment-forward benchmark on the GPU, with the memory on the GPU and offloaded.
#
#   bash tools/gpu_check.sh [OUT]          # logs and tables into OUT (default ./gpu_check)
#
# Needs PyTorch with CUDA, transformers, safetensors, tokenizers, tqdm and pytest; nothing is installed, the
# repository is put on PYTHONPATH. Settings (environment): PYTHON (python3), DEVICE (cuda), SIZES (memory tokens,
# 0,8192,65536,1048576), RETRIEVERS (exact,torch-ivf), RECALL_DATA (prepared data for real memories; '' = random
# keys, which time the exact path fairly but not an IVF: benchmarks/segment_forward.py). Rehearsed on CPU with
# DEVICE=cpu SIZES=0,8192 (the CUDA tests skip there).
set -uo pipefail
OUT=${1:-gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SIZES=${SIZES:-0,8192,65536,1048576}
RETRIEVERS=${RETRIEVERS:-exact,torch-ivf}
RECALL_DATA=${RECALL_DATA:-}
status=0
step() {  # step NAME COMMAND...: run, log to OUT/NAME.txt, remember a failure, go on
    local name=$1; shift
    echo "== $name: $*" | tee "$OUT/$name.txt"
    local t0=$SECONDS
    "$@" 2>&1 | tee -a "$OUT/$name.txt" || status=1
    echo "== $name: $((SECONDS - t0)) s" | tee -a "$OUT/$name.txt"
}
step env "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
step tests "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_retrieval_offload.py
step resident "$PY" benchmarks/segment_forward.py --device "$DEVICE" --memory-sizes "$SIZES" \
    --retrievers "$RETRIEVERS" --recall-data "$RECALL_DATA" --no-parts
step offloaded "$PY" benchmarks/segment_forward.py --device "$DEVICE" --memory-sizes "$SIZES" \
    --retrievers "$RETRIEVERS" --recall-data "$RECALL_DATA" --no-parts --offload
exit $status
