"""Look at a quality-benchmark teacher on the CPU, without the GPU benchmark (bench/quality/README.md, "Teacher trials").

    python bench/quality/inspect_teacher.py steps --teacher .data/teacher_v --data .data/quality64 --out steps.png
    python bench/quality/inspect_teacher.py x0 --teacher .data/teacher --data .data/quality64 --out x0.png

`steps`: real images, then the teacher's DDIM samples at each of --steps (trailing grid, --cfg) from the same noise, on
--count prompts of --split (1: held-out concepts); ~2 min on two CPU cores for 8 prompts at 4, 16 and 100 steps.
`x0`: real training images, then the clean image ComfyUI's denoiser predicts from them noised to each of --timesteps
(one draw of noise); prints the prediction's RMSE per timestep. A good denoiser's prediction is blurry at large t; one
that is grainy there leaves the grain in every many-step sample."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE), str(HERE.parent.parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import eval as E  # noqa: E402
import teacher as T  # noqa: E402
from dataset import load_dataset  # noqa: E402


def pick(split: torch.Tensor, which: int, count: int, seed: int = 0) -> torch.Tensor:
    rows = torch.nonzero(split == which).flatten()
    return rows[torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(seed))[:count]]


def steps_grid(mp, data, rows, steps: list[int], cfg: float) -> list[torch.Tensor]:
    cond = T.conditioning(data["hidden"][rows], data["attention_mask"][rows])
    noise = T.make_noise(len(rows), seed=1234, shape=T.latent_shape(mp.model.teacher_config))
    out = []
    for n in steps:
        t0 = time.perf_counter()
        x = T.sample(mp, cond, T.empty_conditioning(data), noise, T.trailing_sigmas(mp, n), cfg)
        out.append(T.images(mp, x))
        print(f"{n} steps: {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def x0_grid(mp, data, rows, timesteps: list[int]) -> list[torch.Tensor]:
    """The denoised image ComfyUI's model computes (apply_model) at each timestep, for noised real images."""
    patch = T.patch_of(mp)
    x0 = T.to_model_space(data["images"][rows], patch)
    cond = T.context(data["hidden"][rows], data["attention_mask"][rows])
    sigmas = mp.model.model_sampling.sigmas
    gen = torch.Generator().manual_seed(0)
    out = []
    for t in timesteps:
        sigma = sigmas[t].expand(len(rows))
        with torch.no_grad():
            x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
            denoised = mp.model.apply_model(x, sigma, c_crossattn=cond).clamp(-1, 1)
        print(f"t {t}: RMSE of the predicted clean image {float(((denoised - x0) ** 2).mean().sqrt()):.4f}", flush=True)
        out.append(T.to_uint8(denoised, patch))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["steps", "x0"])
    p.add_argument("--teacher", required=True, help="folder with teacher.safetensors + teacher.json")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="PNG grid")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--split", type=int, default=None, help="0 train, 1 held-out concepts, 2 held-out pairs "
                                                            "(default: 1 for steps, 0 for x0)")
    p.add_argument("--steps", default="4,16,100")
    p.add_argument("--cfg", type=float, default=6.0)
    p.add_argument("--timesteps", default="50,200,400,600,800,950")
    args = p.parse_args(argv)
    T.comfy_init(cpu=True)
    data = load_dataset(args.data, device="cpu")
    mp, _ = T.load_teacher(args.teacher, dtype=torch.float32)
    split = args.split if args.split is not None else (1 if args.mode == "steps" else 0)
    rows = pick(data["split"], split, args.count)
    if args.mode == "steps":
        grid = steps_grid(mp, data, rows, [int(s) for s in args.steps.split(",")], args.cfg)
    else:
        grid = x0_grid(mp, data, rows, [int(t) for t in args.timesteps.split(",")])
    E.sample_grid(torch.cat([data["images"][rows].cpu()] + grid), args.out, nrow=args.count)
    print(f"wrote {args.out}: real images, then one row per " + ("step count" if args.mode == "steps" else "timestep"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
