#!/usr/bin/env bash
# The prepared one-call GPU benchmark: fused-kernel check on the GPU first, then bf16 GPT-2 small width at
# T = 1024 and 4096 (training step, decoding, peak memory, every solver and GPT-2), memory scaling to T = 8192, the
# kernels against the PyTorch path. About 8 minutes on one H100; writes benchmarks/results-gpu.md and benchmarks/gpu/.
# Usage: bash benchmarks/gpu.sh [--budget_s 480] [--repeats 5]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET  # compiled kernels on the GPU, not the interpreter
PYTHON="${PYTHON:-python}"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "benchmarks/gpu.sh: no CUDA device visible to torch (or torch missing); this script measures the GPU table only." >&2
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# The package is installed editable where the suite runs; on a bare machine install it without touching dependencies.
"$PYTHON" -c "import energy_gpt" 2>/dev/null || "$PYTHON" -m pip install --no-deps --no-build-isolation -q -e .
exec "$PYTHON" -m benchmarks.gpu "$@"
