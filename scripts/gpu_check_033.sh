#!/usr/bin/env bash
# ComfyUI 0.33.0 at its main.py defaults on a GPU (issue #18, item 5; bench/NOTES.md "ComfyUI 0.33 on the GPU"): the
# SD1.5 workflow through the real server, where 0.33 makes ModelPatcherDynamic the default model patcher.
#   on the device, carry [".data/h33", ".data/whl_small"] (scripts/gpu_carry_033.sh, scripts/gpu_carry.sh):
#       bash scripts/gpu_check_033.sh
#   here, the same imports under the GPU image's package list (bench/quality/gpu_guard), on the CPU, tiny model:
#       bash scripts/gpu_check_033.sh --here
# Writes $OUT/server33.json, server33_run.log, server33.log (the server's own log); prints the lines that answer it.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --here ]; then
    carried="$(ls .data/h33/site | grep -v dist-info | sed 's/\.py$//') $(ls .data/h33/whl .data/whl_small | sed -n 's/^\([A-Za-z_]*\)-.*\.whl$/\1/p' | tr 'A-Z' 'a-z')"
    host=.comfyui/hosts/0.33.0
    [ -d "$host/ComfyUI" ] || bash scripts/setup.sh --host 0.33.0 >/dev/null || exit 2
    OUT=${OUT:-$(mktemp -d)}
    work=$OUT/work; rm -rf "$work"
    # av and the front end are stood in by server_perf on the GPU; here they are installed, so allow them
    QUALITY_IMPORT_GUARD=1 QUALITY_IMPORT_GUARD_ALLOW="$carried av comfyui_frontend_package" COMFYUI_PATH=$PWD/$host/ComfyUI \
    PYTHONPATH=$PWD/bench/quality/gpu_guard:$PWD/$host/site OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} \
        .venv/bin/python bench/server_perf.py --model tiny --cpu --count 2 --iterations 4 --skip-iterations 1 \
        --set 2.batch_size=1 --comfyui "$host/ComfyUI" --work "$work" --out "$OUT/server33.json" > "$OUT/server33_run.log" 2>&1
    rc=$?
    echo "rc=$rc (the CPU under the GPU image's imports; results in $OUT)"
    tail -4 "$OUT/server33_run.log"
    grep -aE "ModuleNotFoundError|Traceback" "$work/server.log" | grep -v "kornia\|spandrel" | sort | uniq -c | head
    exit $rc
fi
: "${OUT:?set OUT (the device sets it)}"
mkdir -p /tmp/h33 && tar -xzf .data/h33/comfyui-0.33.0.tar.gz -C /tmp/h33 || exit 2
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/h33/site .data/whl_small/*.whl .data/h33/whl/*.whl \
    --disable-pip-version-check 2>&1 | grep -v "^WARNING: Target directory"
rm -rf /tmp/h33/work
PYTHONPATH=/tmp/h33/site:$PWD/.data/h33/site PYTHONUNBUFFERED=1 timeout "${TIMEOUT:-280}" python3 bench/server_perf.py \
    --model sd15 --count 8 --iterations 12 --skip-iterations 4 --perf off --comfyui /tmp/h33/ComfyUI --work /tmp/h33/work \
    --out "$OUT/server33.json" > "$OUT/server33_run.log" 2>&1
rc=$?
cp /tmp/h33/work/server.log "$OUT/server33.log" 2>/dev/null
echo "rc=$rc"
tail -6 "$OUT/server33_run.log"
grep -aE "DynamicVRAM|non-dynamic|Traceback|Error" "$OUT/server33.log" | head
exit $rc
