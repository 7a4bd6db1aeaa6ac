"""In-slot solvers for Teacher Trajectories (issue #17, item 3): how close each option's trajectory positions come to
a reference solution, through the node's own code (comfy_rapm.session.teacher_positions, host.slot_solver).

    python bench/slot_solvers.py --teacher demo --out bench/results/perf.json          # CPU: the built-in emoji teacher
    python bench/slot_solvers.py --teacher sd15 --cfg 7.5 --out $OUT/slot_solvers.json  # GPU: random-weight SD1.5

Each option (solver, M steps per slot) makes the N+1 positions z̃_N … z̃_0 of the same noises and prompts, each
slot solved on its own from the last slot's end point, exactly as a trajectory set stores them. The reference visits
every timestep of the discrete schedule (999 → 0: 999 steps) with ComfyUI's dpmpp_2m (second order); its check is the
same solver on every other timestep (~500 steps): for a second-order method the reference's own error is about a
third of that gap.
Errors are relative RMS in the VP space the trainer reads: ‖z̃_n − z_n^ref‖ / ‖z_n^ref‖ per slot end point
n = N-1 … 0, over the whole batch. An option can replace M=25 DDIM (the node's default) only where every slot's end
point is at least as close as DDIM-25's. Results merge into --out under "in_slot_solvers" (other keys are kept)."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

DEMO_PROMPTS = ["grinning face, twitter style", "red apple, google style", "smiling face with sunglasses, fluent 3d style",
                "cat face, twitter style", "thumbs up, google style", "sun, twitter style", "rocket, google style",
                "red heart, fluent 3d style"]
DEFAULT_OPTIONS = "ddim:10,ddim:25,ddim:50,dpmpp_2m:5,dpmpp_2m:8,dpmpp_2m:10,dpmpp_2m:12,uni_pc:5,uni_pc:8,uni_pc:10,uni_pc:12"
BASELINE = ("ddim", 25)


def every_timestep_slots(steps: int, num_timesteps: int = 1000, stride: int = 1) -> list[list[int]]:
    """Slots on every `stride`-th timestep of the discrete schedule between the coarse trailing timesteps
    (999 → 749 → … → 0; each slot keeps its two ends)."""
    from comfy_rapm import schedule
    coarse = schedule.trailing_timesteps(steps, num_timesteps)
    slots = []
    for i in range(steps):
        grid = list(range(coarse[i], coarse[i + 1], -stride))
        slots.append(grid + [coarse[i + 1]])
    return slots


def load_teacher(kind: str, count: int, seed: int):
    """(model, positive, negative, noise, description) for `count` trajectories."""
    from bench import perf
    from comfy_rapm import conditioning, host
    if kind == "demo":
        from comfy_rapm import emoji, storage
        info = storage.read_json(REPO / "demo" / emoji.TEACHER_JSON)
        model, clip, _ = emoji.load_teacher(REPO / "demo")
        prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(count)]
        with torch.inference_mode():
            positive = conditioning.stack([host.encode_text(clip, p) for p in prompts])
            negative = conditioning.stack([host.encode_text(clip, "")] * count)
        shape = (3, 32, 32)
        what = f"the built-in emoji demo teacher ({info['parameters'] / 1e6:.1f}M parameters, 32x32 pixels, MiniLM text)"
    else:
        model, dtype, params = perf.build_model(kind)
        positive, negative = perf.conditioning(kind, count, 1), perf.conditioning(kind, count, 2)
        latent = perf.RESOLUTION[kind] // 8
        shape = (4, latent, latent)
        what = f"random-weight {kind} UNet ({params / 1e6:.0f}M parameters, {dtype}), random text embeddings"
    noise = torch.cat([host.prepare_noise(torch.zeros((1,) + shape), seed + i) for i in range(count)])
    return model, positive, negative, noise, what


def relative_errors(positions: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """Per slot end point n = N-1 … 0 (positions[:, 1:]): ‖z − z_ref‖ / ‖z_ref‖ over the batch."""
    out = []
    for n in range(1, positions.shape[1]):
        a, b = positions[:, n].double(), reference[:, n].double()
        out.append(float((a - b).norm() / b.norm()))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="demo", choices=["demo", "sd15", "sdxl", "tiny"])
    p.add_argument("--cfg", default=None, help="comma-separated; default 3,7.5 for demo (its workflow's and SD1.5's), 7.5 otherwise")
    p.add_argument("--steps", type=int, default=4, help="N, the student's steps (slots)")
    p.add_argument("--count", type=int, default=4, help="trajectories (one batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--options", default=DEFAULT_OPTIONS, help="solver:M, comma-separated")
    p.add_argument("--reference-solvers", default="dpmpp_2m,dpmpp_2m/2",
                   help="the reference (on every timestep), then its checks as solver or solver/stride (every stride-th timestep)")
    p.add_argument("--comfyui", default=None)
    p.add_argument("--out", default=None, help="JSON to merge the result into (key in_slot_solvers)")
    args = p.parse_args(argv)
    from bench import perf
    perf.import_host(args.comfyui)
    from comfy_rapm import schedule, session
    cfgs = [float(c) for c in (args.cfg or ("3,7.5" if args.teacher == "demo" else "7.5")).split(",")]
    options = [(o.split(":")[0], int(o.split(":")[1])) for o in args.options.split(",") if o]
    if BASELINE not in options:
        options.insert(0, BASELINE)
    started = time.perf_counter()
    model, positive, negative, noise, what = load_teacher(args.teacher, args.count, args.seed)
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or "cpu") + " (CPU)"
    result = {"command": "python bench/slot_solvers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "card": card, "torch": torch.__version__,
              "teacher": what, "steps": args.steps, "count": args.count,
              "metric": "relative RMS error of each slot's end point z_n (n = N-1 ... 0, VP space, whole batch) against "
                        "the reference; the reference visits every timestep (999 steps) with reference_solver",
              "reference_solver": args.reference_solvers.split(",")[0], "cfg": {}}
    ref_slots = every_timestep_slots(args.steps)

    rows = []  # UNet rows evaluated (cond and uncond rows of a CFG call both count)
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda module, a: rows.append(a[0].shape[0]))

    def positions(solver, slots, cfg):
        rows.clear()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = session.teacher_positions(model, positive, negative, noise, slots, cfg, solver=solver)
        return out, time.perf_counter() - t0

    for cfg in cfgs:
        entry = result["cfg"][str(cfg)] = {"options": {}}
        reference, seconds = positions(result["reference_solver"], ref_slots, cfg)
        print(f"cfg {cfg}: reference ({result['reference_solver']} on every timestep) in {seconds:.0f} s", flush=True)
        entry["reference_check"] = {}
        for name in args.reference_solvers.split(",")[1:]:
            solver_name, _, stride = name.partition("/")
            check, seconds = positions(solver_name, every_timestep_slots(args.steps, stride=int(stride or 1)), cfg)
            entry["reference_check"][f"{name}_vs_reference"] = relative_errors(check, reference)
            print(f"cfg {cfg}: check {name}: {entry['reference_check'][f'{name}_vs_reference']} ({seconds:.0f} s)", flush=True)
        for solver, m in options:
            out, seconds = positions(solver, schedule.slot_timesteps(args.steps, m), cfg)
            errors = relative_errors(out, reference)
            entry["options"][f"{solver}:{m}"] = {"solver": solver, "fine_steps": m, "model_evaluations_per_trajectory":
                                                  sum(rows) / args.count, "errors": errors, "end_point_error": errors[-1],
                                                  "max_error": max(errors), "seconds": seconds}
            print(f"cfg {cfg}: {solver}:{m} errors {[f'{e:.2e}' for e in errors]} ({seconds:.1f} s)", flush=True)
        base = entry["options"][f"{BASELINE[0]}:{BASELINE[1]}"]["errors"]
        for key, o in entry["options"].items():
            o["at_least_as_close_as_ddim25"] = all(e <= b for e, b in zip(o["errors"], base))
        entry["fewest_steps_at_least_as_close_as_ddim25"] = {
            solver: min([o["fine_steps"] for o in entry["options"].values() if o["solver"] == solver and o["at_least_as_close_as_ddim25"]],
                        default=None) for solver in sorted({s for s, _ in options})}
    handle.remove()
    result["seconds"] = time.perf_counter() - started
    device = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0).replace(" ", "_")
    key = f"{args.teacher}_{device}_{args.count}traj_cfg{'+'.join(f'{c:g}' for c in cfgs)}"
    if args.out:
        path = Path(args.out)
        report = json.loads(path.read_text()) if path.is_file() else {}
        report.setdefault("in_slot_solvers", {})[key] = result
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{what}; {card}; N={args.steps}, {args.count} trajectories; errors against {result['reference_solver']} on every timestep")
    for cfg, entry in result["cfg"].items():
        print(f"cfg {cfg}: reference check {({k: f'{max(v):.1e}' for k, v in entry['reference_check'].items()})}")
        print(f"  {'option':14} {'evals':>6} {'end point':>10} {'max slot':>10}  <= ddim:25")
        for name, o in entry["options"].items():
            print(f"  {name:14} {o['model_evaluations_per_trajectory']:6.0f} {o['end_point_error']:10.2e} {o['max_error']:10.2e}  "
                  f"{'yes' if o['at_least_as_close_as_ddim25'] else 'no'}")
        print(f"  fewest steps at least as close as ddim:25: {entry['fewest_steps_at_least_as_close_as_ddim25']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
