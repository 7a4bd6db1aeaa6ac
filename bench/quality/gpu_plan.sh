#!/usr/bin/env bash
# The quality benchmark's GPU plan, one device call each (bench/quality/README.md, "The GPU plan"). From the repo root:
#   bash bench/quality/gpu_plan.sh 1    carry .data/carry: unpack, then the teacher (~8 min)
#   bash bench/quality/gpu_plan.sh 2    carry .whl: headroom check, free-sampler rows, trajectories, students (~9 min)
#   bash bench/quality/gpu_plan.sh 3    carry .whl: students until the scoring reserve, then every score (~9 min)
#   bash bench/quality/gpu_plan.sh 0    carry .data/carry: only unpack (a new machine, when the teacher already exists)
#   bash bench/quality/gpu_plan.sh N ARG…   extra run_benchmark.py arguments (stage_carry.py --verify adds --cpu-smoke)
# TEACHER=path (a teacher.safetensors carried in .data/teacher/) skips the training and scores that teacher;
# DATA=folder: its data when it is not the 64-px set (a teacher_sweep.py candidate: TEACHER=/tmp/q/sweep/eps32/teacher
# DATA=/tmp/q/data32).
# One WORK folder ($Q/work) for all calls: each call continues the last (the warm machine keeps /tmp and .data/).
# Results in $OUT/q (quality.json, quality.md, quality_grid.png; call 1: teacher/), the log in $OUT/callN.log.
# Exit status: run_benchmark.py's (3: the teacher needs another call, 4: no headroom: see the log), 2: carry missing.
set -uo pipefail
call=${1:?give the call number: 1, 2 or 3}
shift
Q=${Q:-/tmp/q}
PY=${PYTHON:-python3}
: "${OUT:?set OUT to the folder for the results (the device sets it)}"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
mkdir -p "$Q" "$OUT/q"

if [ ! -f "$Q/data/dataset.safetensors" ] || [ ! -d "$Q/ComfyUI/comfy" ]; then
    if [ ! -f .data/carry/dataset.safetensors.xz ]; then
        echo "[plan] this machine has no data: carry .data/carry in this call (a new machine? see README 'If the machine is lost')"
        exit 2
    fi
    mkdir -p "$Q/data"
    "$PY" -c "import lzma, shutil, sys
for name in ('dataset.safetensors', 'dataset.json'):
    with lzma.open('.data/carry/' + name + '.xz') as src, open(sys.argv[1] + '/' + name + '.tmp', 'wb') as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
import os
for name in ('dataset.safetensors', 'dataset.json'):
    os.replace(sys.argv[1] + '/' + name + '.tmp', sys.argv[1] + '/' + name)" "$Q/data" || exit 2
    rm -rf "$Q/ComfyUI" && tar -xJf .data/carry/comfyui.tar.xz -C "$Q" || exit 2
    echo "[plan] unpacked the data and the ComfyUI tree into $Q"
fi
wheels=$(ls .data/carry/whl/*.whl .whl/*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$Q/site" $wheels \
        --disable-pip-version-check 2>&1 | grep -v "^WARNING: Target directory" || true
fi
export PYTHONPATH="$Q/site${QUALITY_IMPORT_GUARD:+:$ROOT/bench/quality/gpu_guard}" COMFYUI_PATH="$Q/ComfyUI" \
    PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# The students: RAPM 4 and 2 steps at RAPMTrain's defaults, and two settings candidates for RAPM 4 ranked on
# training prompts only (the ablations follow at the winner: README). Calls 2 and 3 must name the same.
STUDENTS=(--runs rapm_4,rapm_2 --search "lr5e-5:learning_rate=5e-5;lr1e-4_scale1:learning_rate=1e-4,lora_alpha=64")
COMMON=(--data "${DATA:-$Q/data}" --work "$Q/work" --out "$OUT/q")
[ -n "${TEACHER:-}" ] && COMMON+=(--teacher "$TEACHER")
# Budgets: ~26 min of commands and a machine start fit the session's 30 (README: the estimates).
case "$call" in
    0) echo "[plan] unpacked; nothing else to do"; exit 0 ;;
    1) args=(--budget-seconds 520 --until teacher) ;;
    2) args=(--budget-seconds 540 "${STUDENTS[@]}") ;;
    3) args=(--budget-seconds 500 "${STUDENTS[@]}" --finish) ;;
    *) echo "[plan] unknown call $call (0, 1, 2 or 3)"; exit 2 ;;
esac
echo "[plan] call $call: $PY bench/quality/run_benchmark.py ${COMMON[*]} ${args[*]} $*"
"$PY" bench/quality/run_benchmark.py "${COMMON[@]}" "${args[@]}" "$@" 2>&1 | tee "$OUT/call$call.log"
