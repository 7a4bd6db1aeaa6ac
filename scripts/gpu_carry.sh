#!/usr/bin/env bash
# What a GPU call carries for the benchmarks in bench/ (the GPU machine has no registry and no ComfyUI host):
#   .data/gpu/ComfyUI  the host tree without its tests, its custom_nodes and the tokenizer files of models these
#                      benchmarks never load (~8 MB; main.py and the server included, for bench/server_perf.py)
#   .data/whl_small    torchsde and trampoline: the packages ComfyUI imports that the GPU image lacks
# Run it here, then name .data in the call's carry; the commands in bench/NOTES.md ("GPU session plan") start with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .data/whl_small/*.whl
#   export PYTHONPATH=/tmp/site COMFYUI_PATH=$PWD/.data/gpu/ComfyUI
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
rm -rf .data/gpu/ComfyUI .data/whl_small
mkdir -p .data/gpu .data/whl_small
tar -C .comfyui -cf - --exclude=ComfyUI/tests --exclude=ComfyUI/tests-unit --exclude='ComfyUI/custom_nodes/*' \
    --exclude='ComfyUI/output/*' --exclude='ComfyUI/input/*' --exclude='__pycache__' \
    --exclude=ComfyUI/comfy/text_encoders/llama_tokenizer/tokenizer.json \
    --exclude=ComfyUI/comfy/text_encoders/t5_tokenizer/tokenizer.json \
    --exclude=ComfyUI/comfy/text_encoders/qwen25_tokenizer/vocab.json \
    --exclude=ComfyUI/comfy/text_encoders/qwen25_tokenizer/merges.txt ComfyUI | tar -C .data/gpu -xf -
.venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 -d .data/whl_small torchsde==0.2.6 trampoline==0.1.2 \
    2> >(grep -v "^WARNING: Location" >&2)
du -sh .data/gpu/ComfyUI .data/whl_small
echo "carry: .data   (with the tracked tree: $(git ls-files -z | du -ch --files0-from=- 2>/dev/null | tail -1 | cut -f1))"
