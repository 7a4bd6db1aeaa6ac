#!/usr/bin/env bash
# Issue #19 item 7: the training speed before and after the restructuring, in one GPU call on one card.
#   here:        bash scripts/gpu_before_after.sh --stage [REV]   (REV: 86a3adc, the tree before #19; writes .data/before)
#   on the GPU:  carry [".data/before", ".data/gpu", ".data/whl_small"] (scripts/gpu_carry.sh makes the last two), then
#                bash scripts/gpu_before_after.sh
# Alternates before, after, before, after (ROUNDS pairs, default 2), each `bench/perf.py --models sd15 --variants
# checkpointing --skip-trajectories --skip-equivalence` in its own process under the native allocator (the figure the
# 2026-12-01 table has; MODEL=tiny PYTHON=.venv/bin/python COMFYUI_PATH=$PWD/.comfyui/ComfyUI: a CPU miniature), so the spread between rounds says what "noise" is on that machine.
# Writes $OUT/before_after.json ({"before": [s/it…], "after": [s/it…], medians, ratio}) beside each run's json/log.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --stage ]; then
    rev=${2:-86a3adc}
    rm -rf .data/before && mkdir -p .data/before
    git archive "$rev" comfy_rapm bench/perf.py bench/reference_rapm.py bench/__init__.py headless nodes.py __init__.py \
        | tar -x -C .data/before || exit 2
    echo "$rev $(git rev-parse "$rev")" > .data/before/REVISION
    du -sh .data/before
    exit 0
fi
: "${OUT:?set OUT (the device sets it)}"
[ -f .data/before/REVISION ] || { echo "carry .data/before (bash scripts/gpu_before_after.sh --stage)"; exit 2; }
if [ -z "${COMFYUI_PATH:-}" ]; then  # the device: the carried tree and wheels (here: COMFYUI_PATH=$PWD/.comfyui/ComfyUI)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .data/whl_small/*.whl 2>&1 | grep -v "already exists"
    export PYTHONPATH=/tmp/site COMFYUI_PATH=$PWD/.data/gpu/ComfyUI
fi
export PYTHONUNBUFFERED=1
unset PYTORCH_CUDA_ALLOC_CONF
args=(--models "${MODEL:-sd15}" --variants checkpointing --skip-trajectories --skip-equivalence --warmup 2 --iterations 8)
for round in $(seq 1 "${ROUNDS:-2}"); do
    for side in before after; do
        dir=$([ $side = before ] && echo .data/before || echo .)
        (cd "$dir" && timeout "${UNIT_TIMEOUT:-150}" "${PYTHON:-python3}" bench/perf.py "${args[@]}" --out "$OUT/${side}_$round.json") \
            > "$OUT/${side}_$round.log" 2>&1
        echo "$side round $round: rc=$? $(tail -1 "$OUT/${side}_$round.log")"
    done
done
"${PYTHON:-python3}" - "$OUT" "$(cat .data/before/REVISION)" "${MODEL:-sd15}" <<'EOF'
import json, pathlib, statistics, sys
out, revision, model = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
doc = {"revision_before": revision, "command": "bash scripts/gpu_before_after.sh", "before": [], "after": []}
for f in sorted(out.glob("*_[0-9]*.json")):
    side = f.stem.split("_")[0]
    run = json.loads(f.read_text())
    doc.setdefault("card", run.get("card"))
    doc[side].append(run["models"][model]["training"]["checkpointing"]["seconds_per_iteration"])
for side in ("before", "after"):
    doc[side + "_median"] = statistics.median(doc[side]) if doc[side] else None
if doc["before_median"] and doc["after_median"]:
    doc["after_over_before"] = doc["after_median"] / doc["before_median"]
(out / "before_after.json").write_text(json.dumps(doc, indent=1))
print(json.dumps({k: v for k, v in doc.items() if k != "command"}, indent=1))
EOF
