"""How closely a student follows the teacher's trajectories: on the trajectories it was trained on, on
new noise for the same prompts, and on held-out prompts.

Why: the quality benchmark's students stop at the teacher's own 4-step DDIM level (FD and paired
distance). If a student fits the trajectories it trained on much better than new ones, it memorised
its 1K noise→image pairs; if it fits neither better than DDIM, the training does not reach the
teacher's positions at all.

    python bench/quality/trajectory_fit.py --data .data/quality --teacher demo/rapm_emoji_teacher.safetensors \\
        --lora rapm4=WORK/run_rapm4/lora_18699.safetensors --work /tmp/fit --out fit.json

For each set (`seen`: the first --count training trajectories, seeds 0…, exactly those of
run_benchmark.py's N=4 set; `new_noise`: the same prompts, other seeds; `heldout`: up to --count held-out
prompts, 825 in the full set)
and each model (the teacher's own N-step DDIM with the trajectories' CFG, then every --lora at CFG 1):

- `chain_rmse[k]`: the model's own N-step chain from z̃_N vs the teacher's position at knot k
  (t = timesteps[k+1]); the last entry is the end point;
- `step_rmse[k]`: one step from the teacher's position z̃ at knot k-1 (z̃_N for k=0) vs the teacher's
  position at knot k: each slot's accuracy without the chain's accumulated error.

RMSE per image in [0, 1] pixel units (VP positions / 2), averaged over images. `end_rmse_uint8` is the
table's paired distance (clamped uint8 images) between the chain's end and the teacher's end.
The trajectories come from the product's code (run_benchmark.trajectory_set), the steps from the
product's DDIM inside ComfyUI's sampling context (host.run_with_denoiser)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
for p in (str(HERE), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402


def walk(model, positive, negative, positions: torch.Tensor, timesteps: list[int], cfg: float):
    """(chain, steps), each (B, N, C, H, W) VP: the model's chain from positions[:, 0], and one step from
    each of the teacher's positions positions[:, k] to the next knot."""
    from comfy_rapm import host, schedule, solver

    def body(denoiser):
        ms = denoiser.model_sampling
        sig = schedule.sigma_at(ms, timesteps).to(denoiser.device)
        teacher = positions.to(denoiser.device)

        def denoise(x, s):
            return denoiser(x, s, cfg=cfg)

        x = schedule.from_vp(teacher[:, 0], sig[0], ms)
        chain, steps = [], []
        for k in range(len(timesteps) - 1):
            x = solver.ddim_step(denoise, x, sig[k], sig[k + 1])
            chain.append(schedule.to_vp(x, sig[k + 1], ms))
            start = schedule.from_vp(teacher[:, k], sig[k], ms)
            steps.append(schedule.to_vp(solver.ddim_step(denoise, start, sig[k], sig[k + 1]), sig[k + 1], ms))
        return torch.stack(chain, 1).float().cpu(), torch.stack(steps, 1).float().cpu()

    with torch.inference_mode():
        return host.run_with_denoiser(model, positive, negative, positions[:, 0].shape, body)


def fit(model, positive, negative, positions, timesteps, cfg) -> dict:
    import eval as E
    import teacher as T
    from comfy_rapm import host, schedule
    chain, steps = walk(model, positive, negative, positions, timesteps, cfg)
    target = positions[:, 1:]
    ms = host.model_sampling(model)
    sigma_end = schedule.sigma_at(ms, timesteps[-1:])

    def image(z):
        return T.images(model, schedule.from_vp(z, sigma_end, ms))
    def rmse(a, b):  # VP positions in [-1, 1] → pixel units in [0, 1]
        return E.paired_distance(a / 2, b / 2)["rmse"]
    return {"chain_rmse": [rmse(chain[:, k], target[:, k]) for k in range(target.shape[1])],
            "step_rmse": [rmse(steps[:, k], target[:, k]) for k in range(target.shape[1])],
            "end_rmse_uint8": float(E.paired_distance(image(chain[:, -1]), image(target[:, -1]))["rmse"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--lora", action="append", default=[], help="NAME=FILE, a student LoRA (repeatable)")
    ap.add_argument("--work", type=Path, required=True, help="trajectory sets are made (or reused) here")
    ap.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--fine-steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    import teacher as T
    from dataset import load_dataset
    use_cuda = torch.cuda.is_available() and not args.cpu
    T.comfy_init(cpu=not use_cuda)
    from comfy_rapm import host
    from run_benchmark import trajectory_rows, trajectory_set
    from safetensors.torch import load_file

    data = load_dataset(args.data)
    mp, _ = T.load_teacher(args.teacher)
    train = trajectory_rows(data["split"], args.count)
    heldout = torch.nonzero(data["split"] > 0).flatten()[:args.count]
    negative = T.empty_conditioning(data)
    sets = {}
    for set_name, (rows, seed) in {"seen": (train, 0), "new_noise": (train, 10**6), "heldout": (heldout, 2 * 10**6)}.items():
        tset = trajectory_set(args.work / f"{set_name}_N{args.steps}", mp, data, rows, args.steps, args.fine_steps,
                              args.cfg, batch_size=args.batch_size, seed=seed)
        trajs = tset.load()
        sets[set_name] = dict(seed=seed, timesteps=tset.timesteps, positions=torch.stack([t.positions for t in trajs]).float(),
                              positive=[[torch.cat([t.positive[0][0] for t in trajs]), {}]],
                              negative=[[negative[0][0].repeat(len(trajs), 1, 1), {}]])
    models = {f"teacher {args.steps}-step DDIM": (mp, args.cfg)}  # students only after every set is made
    models.update({name: (host.apply_lora(mp, load_file(path)), 1.0)
                   for name, path in (item.split("=", 1) for item in args.lora)})
    report = {"command": "python bench/quality/trajectory_fit.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "card": torch.cuda.get_device_name(0) if use_cuda else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loras": args.lora, "sets": {}}
    for set_name, s in sets.items():
        report["sets"][set_name] = {
            "count": len(s["positions"]), "seed": s["seed"], "timesteps": s["timesteps"],
            "models": {name: fit(model, s["positive"], s["negative"], s["positions"], s["timesteps"], cfg)
                       for name, (model, cfg) in models.items()}}
        for name, r in report["sets"][set_name]["models"].items():
            print(f"{set_name:9s} {name:24s} chain " + " ".join(f"{v:.4f}" for v in r["chain_rmse"])
                  + "  step " + " ".join(f"{v:.4f}" for v in r["step_rmse"]) + f"  end(uint8) {r['end_rmse_uint8']:.4f}",
                  flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
