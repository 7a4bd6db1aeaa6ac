"""`make demo`: the whole RAPM pipeline (trajectories → training → LoRA file → teacher-vs-student
images) from example_workflows/rapm-1-demo-emoji-teacher-no-downloads.json, run headless through ComfyUI's own executor on the built-in
emoji teacher (demo/rapm_emoji_teacher.safetensors). Outputs go to out/demo/."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "out" / "demo"), help="where models and outputs go (default out/demo)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="passed to headless/run.py --set")
    p.add_argument("--workflow", default=str(REPO / "example_workflows" / "rapm-1-demo-emoji-teacher-no-downloads.json"))
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    models, output = out / "models", out / "output"
    (models / "loras").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    from headless import run
    argv_run = [args.workflow, "--models", str(models), "--output-directory", str(output)]
    for s in args.sets:
        argv_run += ["--set", s]
    code = run.main(argv_run)
    if code != 0:
        return code
    loras = sorted((models / "loras").rglob("*.safetensors"), key=os.path.getmtime)
    images = sorted((p for p in output.rglob("*.png") if p.stat().st_mtime >= t0), key=os.path.getmtime)  # this run's
    print("\n[demo] summary")
    print(f"  total time        {time.time() - t0:.0f} s")
    print(f"  trajectories      {output / 'rapm_trajectories' / 'demo'}")
    print(f"  training run      {output / 'rapm_runs' / 'demo'} (rerun resumes; delete it to retrain)")
    if loras:
        print(f"  LoRA              {loras[-1]}")
    for image in images:
        print(f"  {'loss graph' if image.parent.name == 'temp' else 'image':<18}{image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
