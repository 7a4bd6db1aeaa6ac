#!/usr/bin/env bash
# What a GPU call carries to run ComfyUI 0.33.0 at its main.py defaults there (issue #18, item 5; bench/NOTES.md,
# "ComfyUI 0.33 on the GPU"): .data/h33/comfyui-0.33.0.tar.gz (the source snapshot) and .data/h33/site, the packages
# 0.33 adds that the GPU image lacks, for its Python 3.12: comfy-aimdo (dynamic VRAM), comfy-kitchen without its
# CUDA and ROCm extensions (168 + 56 MiB; it falls back to its eager and triton kernels, as where they fail to load),
# blake3, simpleeval, torchaudio 2.11.0 (2.11.1 does not load beside the image's torch 2.11.0), and, as wheels in
# .data/h33/whl, SQLAlchemy, alembic and pydantic with their dependencies (main.py imports the asset database and its
# routes; SQLAlchemy is 3 MB zipped, 14 MB unpacked).
# Run it here (it needs the registry), then name .data/h33 and .data/whl_small (scripts/gpu_carry.sh) in the carry.
set -euo pipefail
cd "$(dirname "$0")/.."
hosts=${RAPM_HOSTS_DIR:-../shared/hosts}
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
.venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$wheels" \
    comfy-aimdo==0.4.13 comfy-kitchen==0.2.31 blake3==1.0.11 simpleeval==1.0.8 torchaudio==2.11.0 \
    "SQLAlchemy>=2.0,<2.1" alembic Mako MarkupSafe "pydantic~=2.0" pydantic-core annotated-types typing-inspection \
    "typing-extensions>=4.16" \
    2> >(grep -v "^WARNING: Location" >&2)
rm -rf .data/h33
mkdir -p .data/h33/site
cp "$hosts/comfyui-0.33.0.tar.gz" .data/h33/
mkdir -p .data/h33/whl
for w in "$wheels"/*.whl; do
    case $(basename "$w") in
        sqlalchemy-*|alembic-*|mako-*|markupsafe-*|pydantic*|annotated_types-*|typing_inspection-*|typing_extensions-*)
            cp "$w" .data/h33/whl/ ;;  # scripts/gpu_check_033.sh pip-installs them on the device
        *) .venv/bin/python -m zipfile -e "$w" .data/h33/site ;;
    esac
done
rm -f .data/h33/site/comfy_kitchen/backends/cuda/_C*.so .data/h33/site/comfy_kitchen/backends/hip/_C*.so \
    .data/h33/site/comfy_aimdo/aimdo_rocm.so
du -sh .data/h33
