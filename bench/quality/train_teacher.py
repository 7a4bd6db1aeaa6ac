"""Train the quality benchmark's teacher (bench/quality/teacher.py) on the TRAIN split of the emoji set.

    python bench/quality/train_teacher.py --data .data/quality --out out/teacher            # GPU, 12 min
    python bench/quality/train_teacher.py --data /tmp/q --out /tmp/t --cpu-smoke             # a few CPU steps

Standard EPS objective on ComfyUI's discrete schedule: t ~ U{0..999}, z_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε
(x0 the image in [-1, 1]), loss = mean (ε̂(z_t, t, caption) - ε)². The UNet is called exactly as
ComfyUI's BaseModel.apply_model calls it (teacher.eps_prediction; the test checks the two agree), so
the saved teacher samples correctly through ComfyUI's own samplers.

- only split == 0 (train) rows; no flips (emoji are not symmetric);
- caption dropout (default 10%): the caption's token states are replaced by the empty caption's, so
  classifier-free guidance works;
- AdamW, linear warm-up then cosine decay to `--min-lr-ratio` (or constant) over the run, where
  progress is max(step / max_steps, elapsed / budget): the schedule ends when the run does;
- bf16 autocast on CUDA (weights and optimizer in float32); EMA of the weights (the saved teacher);
- writes <out>/teacher.safetensors (EMA, float16) + teacher.json (architecture, training settings,
  loss log) and, unless --no-preview, preview.png: a few train and held-out captions sampled through
  ComfyUI (trailing DDIM, --preview-steps, --preview-cfg).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import teacher as T  # noqa: E402
from dataset import SPLIT_TRAIN, load_dataset  # noqa: E402


def lr_factor(progress: float, step: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Warm-up (linear over `warmup` steps) times constant or cosine decay over progress in [0, 1]."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    if schedule == "constant":
        return warm
    p = min(1.0, max(0.0, progress))
    return warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


class EMA:
    """Exponential moving average of parameters (float32), with the usual warm-up of the decay."""

    def __init__(self, params, decay: float):
        self.params = [p for p in params]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - d)

    def state_dict(self, module: torch.nn.Module) -> dict:
        by_id = {id(p): s for p, s in zip(self.params, self.shadow)}
        sd = {}
        for name, p in module.named_parameters():
            sd[name] = by_id[id(p)]
        for name, b in module.named_buffers():
            sd[name] = b.detach()
        return sd


def train_rows(data: dict, limit: int | None) -> torch.Tensor:
    idx = torch.nonzero(data["split"] == SPLIT_TRAIN).flatten()
    if limit:
        idx = idx[:limit]
    if idx.numel() == 0:
        raise SystemExit("no train rows (split == 0) in the dataset")
    return idx


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(".data/quality"), help="folder with dataset.safetensors")
    ap.add_argument("--out", type=Path, required=True, help="folder for teacher.safetensors + teacher.json")
    ap.add_argument("--minutes", type=float, default=12.0, help="training-loop time budget (default 12)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    ap.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    ap.add_argument("--warmup", type=int, default=300, help="warm-up steps")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay")
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N train rows")
    ap.add_argument("--config", type=str, default=None,
                    help="JSON object overriding teacher.DEFAULT_CONFIG, e.g. '{\"model_channels\": 96}'")
    ap.add_argument("--save-dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="CPU, 64-channel default model, 3 steps, batch 8, preview 2 images x 2 steps")
    ap.add_argument("--no-preview", action="store_true")
    ap.add_argument("--preview-steps", type=int, default=25)
    ap.add_argument("--preview-cfg", type=float, default=3.0)
    args = ap.parse_args(argv)

    if args.cpu_smoke:
        args.cpu = True
        args.max_steps = args.max_steps or 3
        args.batch_size = min(args.batch_size, 8)
        args.warmup = 1
        args.log_every = 1
        args.preview_steps = 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    use_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    T.comfy_init(cpu=not use_cuda)
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    t_setup = time.perf_counter()
    torch.manual_seed(args.seed)
    data = load_dataset(args.data, device=device)
    rows = train_rows(data, args.limit).to(device)
    images = data["images"][rows]                                           # uint8 on device
    ctx_all = T.context(data["hidden"][rows], data["attention_mask"][rows]).to(device)
    null_ctx = T.context(data["null_hidden"], data["null_attention_mask"]).to(device)   # (1, 16, 384)
    n = rows.numel()

    config = json.loads(args.config) if args.config else {}
    mp = T.build_teacher(config, dtype=torch.float32)
    base = mp.model
    unet = base.diffusion_model
    unet.to(device).train()
    for p in unet.parameters():
        p.requires_grad_(True)
    ab = T.alphas_cumprod(mp).float().to(device)
    n_params = T.parameter_count(unet)
    print(f"[teacher] {T.describe(base.teacher_config)}; {n_params:,} parameters; {n} train images; "
          f"device {device}", flush=True)

    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                            fused=use_cuda)
    ema = EMA(unet.parameters(), args.ema)
    forward = torch.compile(unet) if (args.compile and use_cuda) else unet
    gen = torch.Generator(device=device).manual_seed(args.seed)
    budget = args.minutes * 60.0
    log = []
    running, running_n = 0.0, 0
    step = 0
    setup_s = time.perf_counter() - t_setup
    t0 = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - t0
        if (args.max_steps is not None and step >= args.max_steps) or elapsed >= budget:
            break
        progress = max(step / args.max_steps if args.max_steps else 0.0, elapsed / budget)
        lr = args.lr * lr_factor(progress, step, args.warmup, args.lr_schedule, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr

        idx = torch.randint(0, n, (args.batch_size,), device=device, generator=gen)
        x0 = T.to_model_space(images[idx])
        ctx = ctx_all[idx]
        drop = torch.rand(args.batch_size, device=device, generator=gen) < args.caption_dropout
        ctx = torch.where(drop[:, None, None], null_ctx.expand_as(ctx), ctx)
        t = torch.randint(0, ab.shape[0], (args.batch_size,), device=device, generator=gen)
        eps = torch.randn(x0.shape, device=device, generator=gen)
        a = ab[t].view(-1, 1, 1, 1)
        z = a.sqrt() * x0 + (1 - a).sqrt() * eps
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_cuda):
            pred = forward(z, t.float(), context=ctx)
        loss = torch.nn.functional.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), args.grad_clip)
        opt.step()
        ema.update(step)
        step += 1

        running += float(loss.detach()) if (step % 10 == 0 or not use_cuda) else 0.0
        running_n += 1 if (step % 10 == 0 or not use_cuda) else 0
        if step % args.log_every == 0:
            el = time.perf_counter() - t0
            mean = running / max(1, running_n)
            log.append({"step": step, "loss": round(mean, 5), "lr": lr, "seconds": round(el, 1)})
            print(f"[teacher] step {step} loss {mean:.4f} lr {lr:.2e} {step / el:.2f} it/s {el:.0f}s", flush=True)
            running, running_n = 0.0, 0
            if not math.isfinite(mean):
                raise SystemExit(f"loss is {mean} at step {step}: stopping")
    train_s = time.perf_counter() - t0
    print(f"[teacher] {step} steps in {train_s:.1f}s ({step / max(train_s, 1e-9):.2f} it/s), "
          f"{step * args.batch_size / n:.1f} epochs; setup {setup_s:.1f}s", flush=True)

    unet.eval()
    save_dtype = getattr(torch, args.save_dtype)
    info = {
        "data": {"path": str(args.data), "train_images": n, "sha256": (data.get("meta") or {}).get("dataset_safetensors_sha256")},
        "training": {k: v for k, v in vars(args).items() if k not in ("data", "out")},
        "steps": step, "seconds": round(train_s, 1), "epochs": round(step * args.batch_size / n, 2),
        "device": torch.cuda.get_device_name() if use_cuda else "cpu", "ema_weights": True,
        "final_loss": log[-1]["loss"] if log else None, "loss_log": log,
        "torch": torch.__version__,
    }
    path = T.save_teacher(mp, args.out, state_dict=ema.state_dict(unet), dtype=save_dtype, info=info)
    size = path.stat().st_size
    print(f"[teacher] wrote {path} ({size / 2**20:.1f} MiB, {args.save_dtype}) and {path.with_name(T.CONFIG_NAME)}",
          flush=True)

    if not args.no_preview:
        preview(args, data, device)
    return 0


def preview(args, data: dict, device) -> None:
    """Sample the saved teacher through ComfyUI for a few train and held-out captions."""
    import eval as E  # noqa: PLC0415  (bench/quality/eval.py; needs no EfficientNet for this)

    t0 = time.perf_counter()
    mp, _ = T.load_teacher(args.out, dtype=torch.float32)
    split = data["split"].cpu()
    per = 2 if args.cpu_smoke else 8
    pick = []
    for s in (0, 1, 2):
        idx = torch.nonzero(split == s).flatten()
        pick += idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(s))[:per]].tolist()
    pick = torch.tensor(pick, dtype=torch.long)
    cond = T.conditioning(data["hidden"][pick.to(data["hidden"].device)], data["attention_mask"][pick.to(data["hidden"].device)])
    neg = T.empty_conditioning(data)
    noise = T.make_noise(len(pick), seed=1234)
    x = T.sample(mp, cond, neg, noise, T.trailing_sigmas(mp, args.preview_steps), args.preview_cfg)
    gen = T.to_uint8(x)
    real = data["images"][pick.to(data["images"].device)].cpu()
    both = torch.stack([real, gen], 1).flatten(0, 1)  # real, generated, real, generated …
    out = args.out / "preview.png"
    E.sample_grid(both, out, nrow=8 if per > 2 else 4)
    captions = data["meta"]["captions"] if data.get("meta") else None
    lines = [f"{i}: split {int(split[j])} {captions[j] if captions else ''}" for i, j in enumerate(pick.tolist())]
    (args.out / "preview.txt").write_text(
        f"pairs (real | teacher, {args.preview_steps}-step trailing DDIM, cfg {args.preview_cfg}), row-major:\n"
        + "\n".join(lines) + "\n")
    print(f"[teacher] preview {out} ({time.perf_counter() - t0:.1f}s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
