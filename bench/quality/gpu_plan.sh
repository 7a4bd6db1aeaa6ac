#!/usr/bin/env bash
# The quality benchmark's GPU plan, one device call each (bench/quality/README.md, "The GPU plan"). From the repo root:
#   bash bench/quality/gpu_plan.sh 2    carry .data/carry and .whl (a fresh machine: both fit, 61.7 MiB with the tree):
#                                       unpack, teacher rows, trajectories, then the students until the budget
#   bash bench/quality/gpu_plan.sh 3    carry nothing: the students go on until the budget (as often as time allows)
#   bash bench/quality/gpu_plan.sh 4    carry nothing: the students until the scoring reserve, every score, trajectory_fit.py
#   bash bench/quality/gpu_plan.sh 0    carry .data/carry: unpack only (before call 1)
#   bash bench/quality/gpu_plan.sh 1    carry .data/carry, TEACHER=train only: unpack, then train a new teacher (~8 min)
#   bash bench/quality/gpu_plan.sh N ARG…   extra run_benchmark.py arguments (stage_carry.py --verify adds --cpu-smoke)
# Calls 3 and 4 need the machine call 2 warmed (it goes back 30 s after a call): issue each as soon as the last returns.
# The teacher is the committed one (bench/quality/weights/, 32 px, sha256 cf81d7ba…) unless TEACHER names another
# (a folder with teacher.json, or its .safetensors) or is `train` (the recipe, trained in $Q/work/teacher by call 1).
# DATA=folder: the data when it is not the carried set.
# One WORK folder ($Q/work) for all calls: each call continues the last (the warm machine keeps /tmp and .data/).
# Results in $OUT/q (quality.json, quality.md, quality_grid.png; call 1: teacher/), the log in $OUT/callN.log.
# Exit status: run_benchmark.py's (3: the teacher needs another call, 4: no headroom: see the log), 2: carry missing.
set -uo pipefail
call=${1:?give the call number: 0, 1, 2, 3 or 4}
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

# The students: RAPM 4 and 2 steps and the three ablations, all at RAPMTrain's defaults (the learning rates searched
# on 2026-12-02 did no better on training prompts: bench/quality/README.md), and one more candidate for RAPM 4, a
# stronger adversarial term, ranked on training prompts only. RUNS and SEARCH replace them (SEARCH= for none; the
# long run: RUNS=rapm_4,absolute_only_4 SEARCH=). Every call of a session must name the same.
STUDENTS=(--runs "${RUNS:-rapm_4,rapm_2,absolute_only_4,relative_only_4,huber_only_4}")
SEARCH=${SEARCH-adv0.3:adversarial_weight=0.3}
[ -n "$SEARCH" ] && STUDENTS+=(--search "$SEARCH")
COMMON=(--data "${DATA:-$Q/data}" --work "$Q/work" --out "$OUT/q")
TEACHER=${TEACHER:-$ROOT/bench/quality/weights}
[ "$TEACHER" != train ] && COMMON+=(--teacher "$TEACHER")
# Budgets: ~27 min of commands and a machine start fit the session's 30 (README: the estimates).
case "$call" in
    0) echo "[plan] unpacked; nothing else to do"; exit 0 ;;
    1) if [ "$TEACHER" != train ]; then echo "[plan] the teacher is $TEACHER: nothing to train (TEACHER=train trains one)"; exit 0; fi
       args=(--budget-seconds 520 --until teacher) ;;
    2|3) args=(--budget-seconds 540 "${STUDENTS[@]}") ;;
    4) args=(--budget-seconds "$([ "${FIT:-1}" = 1 ] && echo 360 || echo 480)" "${STUDENTS[@]}" --finish) ;;
    *) echo "[plan] unknown call $call (0, 1, 2, 3 or 4)"; exit 2 ;;
esac
echo "[plan] call $call: $PY bench/quality/run_benchmark.py ${COMMON[*]} ${args[*]} $*"
"$PY" bench/quality/run_benchmark.py "${COMMON[@]}" "${args[@]}" "$@" 2>&1 | tee "$OUT/call$call.log"
rc=${PIPESTATUS[0]}
# Call 4 ends with trajectory_fit.py on the 4-step rows' last LoRAs (FIT=0: not; ~2 min at FIT_COUNT=500): seen
# trajectories vs new noise vs held-out prompts says whether a student memorised its trajectories or cannot follow them.
if [ "$call" = 4 ] && [ "${FIT:-1}" = 1 ] && [ "$rc" = 0 ]; then
    loras=()
    for dir in "$Q"/work/students/*/; do
        case $(basename "$dir") in rapm_2*|search_*) continue ;; esac  # 4-step rows only; no held-out number for a search run
        last=$(ls "$dir" | sed -n 's/^lora_\([0-9]*\)\.safetensors$/\1/p' | sort -n | tail -1)
        [ -n "$last" ] && loras+=(--lora "$(basename "$dir")@$last=${dir}lora_$last.safetensors")
    done
    cfg=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["cfg"])' "$Q/work/headroom.json")  # the trajectories'
    fit=(--data "${DATA:-$Q/data}" --teacher "$([ "$TEACHER" = train ] && echo "$Q/work/teacher" || echo "$TEACHER")"
         --cfg "$cfg" --count "${FIT_COUNT:-500}" --work "$Q/fit_cfg$cfg" --out "$OUT/q/trajectory_fit.json" "${loras[@]}")
    echo "[plan] $PY bench/quality/trajectory_fit.py ${fit[*]}" | tee -a "$OUT/call$call.log"
    "$PY" bench/quality/trajectory_fit.py "${fit[@]}" 2>&1 | tee -a "$OUT/call$call.log"
    rc=${PIPESTATUS[0]}
fi
exit "$rc"
