"""Several teacher candidates at once on one GPU: each trained, then headroom-checked, by run_benchmark.py in its own
process and WORK folder (bench/quality/README.md, "Teacher trials"). The processes take turns on the card, so plan by
the candidates' total steps (~5 a second for the recipe on an H200, alone); what side by side buys is that every
candidate moves in every call and none waits for a slot of its own.

    bash bench/quality/gpu_plan.sh 0                                          # unpack the carried data (call 1)
    python3 bench/quality/teacher_sweep.py train    --q /tmp/q --out $OUT     # every candidate, until --budget-seconds
    python3 bench/quality/teacher_sweep.py headroom --q /tmp/q --out $OUT     # finish any, then DDIM-100 vs DDIM-4
    python3 bench/quality/teacher_sweep.py weights NAME --q /tmp/q --out $OUT # one candidate's weights, to keep

Each call writes $OUT/sweep.json (per candidate: exit status, steps, checksum, the headroom tried) and
$OUT/sweep_<stage>.log; `train` adds NAME_preview.png, `headroom` NAME_grid.png (real, DDIM-100, DDIM-4 from the same
noise). Runs resume where the last call stopped (the same WORK folders under $Q/sweep/). Candidates other than
64 px read a copy of the data made here by downsample_data.py."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> image size of its data, train_teacher --config, extra train_teacher arguments
CANDIDATES = {
    "eps64_long": {"size": 64, "config": {"image_size": 64, "patch": 2}, "args": ["--max-steps", "3300"]},
    "v64_lowt": {"size": 64, "config": {"image_size": 64, "patch": 2, "prediction": "v"},
                 "args": ["--low-t-fraction", "0.5"]},
    "eps32": {"size": 32, "config": {"image_size": 32, "patch": 1}, "args": []},
}
DEFAULT = ("eps32", "eps64_long")  # the EPS candidates: SD1.5 is one (bench/quality/README.md, "Teacher trials")
STAGES = {"train": "teacher", "headroom": "headroom"}
GRACE_SECONDS = 20  # past --budget-seconds before a run that overran is stopped
EXPECTED_EXITS = (0, 3, 4, None)  # run_benchmark.py: done, teacher unfinished, no headroom; None: stopped at the budget
# what comes back per candidate: the file in its OUT folder, and its name's suffix in $OUT
PICTURES = {"train": ("teacher/preview.png", "preview"), "headroom": ("quality_grid.png", "grid")}


def data_folder(q: Path, size: int, base_size: int) -> Path:
    base = q / "data"
    if size == base_size:
        return base
    folder = q / f"data{size}"
    if not (folder / "dataset.json").exists():
        subprocess.run([sys.executable, str(HERE / "downsample_data.py"), "--data", str(base), "--out", str(folder),
                        "--size", str(size)], check=True)
    return folder


def command(name: str, spec: dict, data: Path, q: Path, stage: str, budget: float, extra: list[str]) -> list[str]:
    work = q / "sweep" / name
    return [sys.executable, str(HERE / "run_benchmark.py"), "--data", str(data), "--work", str(work),
            "--out", str(work / "out"), "--budget-seconds", f"{budget:.0f}", "--until", STAGES[stage],
            "--teacher-config", json.dumps(spec["config"]), "--teacher-args", shlex.join(spec["args"] + extra)]


def wait_all(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, int | None]:
    """Exit status per run; a run still going at `deadline` (monotonic) is stopped (None), so the report is always
    written inside the device call."""
    codes = {}
    for name, proc in procs.items():
        try:
            codes[name] = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            print(f"[sweep] {name}: still running at the budget's end, stopped", flush=True)
            codes[name] = None
    return codes


def summary(name: str, q: Path, code: int | None) -> dict:
    work = q / "sweep" / name
    doc = {"exit": code}
    teacher = work / "teacher" / "teacher.json"
    state = work / "teacher" / "train_state.json"
    if teacher.exists() and not state.exists():
        t = json.loads(teacher.read_text())
        doc.update(finished=True, steps=t["info"]["steps"], sha256=t["sha256"], final_loss=t["info"].get("final_loss"))
    elif state.exists():
        doc.update(finished=False, steps=json.loads(state.read_text()).get("step"))
    if (work / "headroom.json").exists():
        doc["headroom"] = json.loads((work / "headroom.json").read_text())
    return doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=[*STAGES, "weights"])
    p.add_argument("name", nargs="?", help="weights: the candidate whose weights to return")
    p.add_argument("--q", type=Path, default=Path("/tmp/q"), help="gpu_plan.sh's folder: data/, ComfyUI/, site/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-seconds", type=float, default=540)
    p.add_argument("--only", default=None, help="comma-separated candidate names (default: DEFAULT)")
    p.add_argument("--candidates", default=None, help="JSON object replacing CANDIDATES (the CPU test's)")
    p.add_argument("--teacher-args", default="", help="appended to every candidate's train_teacher arguments")
    p.add_argument("--benchmark-args", default="", help="appended to every run_benchmark.py command")
    args = p.parse_args(argv)
    candidates = json.loads(args.candidates) if args.candidates else CANDIDATES
    names = args.only.split(",") if args.only else [n for n in DEFAULT if n in candidates] or list(candidates)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.stage == "weights":
        if args.name not in candidates:
            raise SystemExit(f"weights: name one of {sorted(candidates)}")
        published = args.q / "sweep" / args.name / "out" / "teacher"
        for f in sorted(published.glob("teacher.*")) + [published / "preview.png"]:
            if f.exists():
                shutil.copyfile(f, args.out / f"{args.name}_{f.name}")
        return 0

    base_size = json.loads((args.q / "data" / "dataset.json").read_text())["size"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # gpu_plan.sh's packages and ComfyUI tree, where it unpacked them
    if (args.q / "site").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.q / "site"), os.environ.get("PYTHONPATH")]))
    if (args.q / "ComfyUI" / "comfy").is_dir():
        env.setdefault("COMFYUI_PATH", str(args.q / "ComfyUI"))
    started = time.monotonic()
    procs, logs = {}, {}
    for name in names:
        spec = candidates[name]
        data = data_folder(args.q, int(spec["size"]), int(base_size))
        budget = args.budget_seconds - (time.monotonic() - started)
        cmd = command(name, spec, data, args.q, args.stage, budget, shlex.split(args.teacher_args))
        cmd += shlex.split(args.benchmark_args)
        (args.q / "sweep" / name).mkdir(parents=True, exist_ok=True)
        logs[name] = args.q / "sweep" / name / f"{args.stage}.log"
        with open(logs[name], "a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        print(f"[sweep] {name}: started", flush=True)
    codes = wait_all(procs, started + args.budget_seconds + GRACE_SECONDS)

    report = {"stage": args.stage, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "seconds": round(time.monotonic() - started, 1), "candidates": {}}
    with open(args.out / f"sweep_{args.stage}.log", "w") as out_log:
        for name in names:
            report["candidates"][name] = dict(summary(name, args.q, codes[name]), spec=candidates[name])
            out_log.write(f"===== {name} (exit {codes[name]})\n" + logs[name].read_text())
            picture, suffix = PICTURES[args.stage]
            picture = args.q / "sweep" / name / "out" / picture
            if picture.exists():
                shutil.copyfile(picture, args.out / f"{name}_{suffix}.png")
            print(f"[sweep] {name}: exit {codes[name]}, {json.dumps(report['candidates'][name].get('headroom', {}).get('tried'))}",
                  flush=True)
    (args.out / "sweep.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0 if all(code in EXPECTED_EXITS for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
