"""Train the quality benchmark's teacher (bench/quality/teacher.py) on the TRAIN split of the emoji set.

    python bench/quality/train_teacher.py --data .data/quality64 --out WORK/teacher             # GPU: the recipe
    python bench/quality/train_teacher.py --data .data/quality64 --out WORK/teacher --minutes 8  # stop at 8 min, resumable
    python bench/quality/train_teacher.py --data /tmp/q --out /tmp/t --cpu-smoke                  # a few CPU steps

Standard EPS (or, with config prediction "v", v) objective on ComfyUI's discrete schedule: t ~ U{0..999}, z_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε
(x0 the image in [-1, 1], space-to-depth by the config's `patch`), loss = mean (ε̂(z_t, t, caption) - ε)².
The UNet is called exactly as ComfyUI's BaseModel.apply_model calls it (teacher.unet_prediction; the test
checks the two agree), so the saved teacher samples correctly through ComfyUI's own samplers.

- only split == 0 (train) rows; no flips (emoji are not symmetric);
- caption dropout (default 10%): the caption's token states are replaced by the empty caption's, so
  classifier-free guidance works;
- AdamW, linear warm-up then cosine decay to `--min-lr-ratio` (or constant) over `--max-steps`: the run is
  defined by its steps, not by wall time, so where calls end does not change the result;
- bf16 autocast on CUDA (weights and optimizer in float32); EMA of the weights (the saved teacher);
- **resumable**: `--minutes` ends this call's training early; the state (weights, EMA, optimizer, random
  generator, step, loss log) is in <out>/train_state.safetensors + train_state.json (atomic writes, also every
  --checkpoint-every steps) and the same command continues it (other settings are refused). On the CPU a run
  resumed any number of times is bit-identical to one straight run (tested);
- at the end writes <out>/teacher.safetensors (EMA, float16) + teacher.json (architecture, training settings,
  loss log, sha256) and, unless --no-preview, preview.png: a few train and held-out captions sampled through
  ComfyUI (trailing DDIM, --preview-steps, --preview-cfg). A finished run exits at once when called again.
Exit status 0 when the teacher is written (or was), 3 when this call stopped before --max-steps.
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
REPO = HERE.parent.parent
for _p in (str(HERE), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import teacher as T  # noqa: E402
from dataset import SPLIT_TRAIN, load_dataset  # noqa: E402

STATE = "train_state.safetensors"
STATE_DOC = "train_state.json"
NOT_FINISHED = 3  # exit status of a call that stopped before --max-steps (rerun to resume)
# Arguments that do not change what is trained: a resumed run may differ in these.
RUN_LOCAL = ("data", "out", "minutes", "steps_this_call", "log_every", "no_preview", "preview_steps", "preview_cfg", "checkpoint_every",
             "compile")


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

    def load(self, shadow: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for s, v in zip(self.shadow, shadow):
                s.copy_(v)

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


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(".data/quality64"), help="folder with dataset.safetensors")
    ap.add_argument("--out", type=Path, required=True, help="folder for teacher.safetensors + teacher.json (and the state)")
    ap.add_argument("--max-steps", type=int, default=None, help="the run's length in optimizer steps (default 2200)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="stop this call's training after this long (checkpointed; rerun to resume)")
    ap.add_argument("--steps-this-call", type=int, default=None,
                    help="stop this call after this many steps (checkpointed; rerun to resume)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 1024")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    ap.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 200)")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay")
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--low-t-fraction", type=float, default=0.0,
                    help="share of each batch whose timesteps are drawn from the lowest quarter of the schedule instead of "
                         "all of it: more training where many-step samples get their fine detail (and their grain)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N train rows")
    ap.add_argument("--config", type=str, default=json.dumps(T.RECIPE_CONFIG),
                    help="JSON object overriding teacher.DEFAULT_CONFIG (default: the recipe, "
                         f"{json.dumps(T.RECIPE_CONFIG)}, the committed teacher's)")
    ap.add_argument("--save-dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    ap.add_argument("--checkpoint-every", type=int, default=500, help="steps between saved training states")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="CPU; unless given: 3 steps at batch 8, warm-up 1; preview 2 images x 2 steps: the GPU command's code path")
    ap.add_argument("--no-preview", action="store_true")
    ap.add_argument("--preview-steps", type=int, default=25)
    ap.add_argument("--preview-cfg", type=float, default=6.0)
    return ap


def identity(args) -> dict:
    """What a resumed run must share with the run it continues."""
    return json.loads(json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in RUN_LOCAL}, default=str))


def finished(out: Path) -> bool:
    return (out / T.WEIGHTS_NAME).is_file() and (out / T.CONFIG_NAME).is_file() and not (out / STATE).exists()


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    recipe = {"max_steps": 2200, "batch_size": 1024, "warmup": 200}
    if args.cpu_smoke:
        args.cpu = True
        recipe = {"max_steps": 3, "batch_size": 8, "warmup": 1}
        args.log_every = 1
        args.preview_steps = 2
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    use_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    T.comfy_init(cpu=not use_cuda)
    from comfy_rapm import storage
    if finished(args.out):
        doc = json.loads((args.out / T.CONFIG_NAME).read_text())
        if doc.get("info", {}).get("identity") not in (None, identity(args)):
            raise SystemExit(f"[teacher] {args.out} holds a finished teacher trained with other settings "
                             f"({storage.describe_difference(doc['info']['identity'], identity(args))}); "
                             "use another --out")
        print(f"[teacher] {args.out / T.WEIGHTS_NAME} is finished ({doc['info'].get('steps')} steps); nothing to do",
              flush=True)
        return 0
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    t_setup = time.perf_counter()
    torch.manual_seed(args.seed)
    data = load_dataset(args.data, device=device)
    config = json.loads(args.config) if args.config else {}
    cfg = T.full_config(config)
    if data["images"].shape[-1] != cfg["image_size"]:
        raise SystemExit(f"[teacher] the data's images are {data['images'].shape[-1]} px but the teacher config's "
                         f"image_size is {cfg['image_size']}: prepare the data with --size {cfg['image_size']} "
                         "or pass --config with the data's size")
    patch = int(cfg["patch"])
    prediction = cfg["prediction"]
    rows = train_rows(data, args.limit).to(device)
    images = data["images"][rows]                                           # uint8 on device
    ctx_all = T.context(data["hidden"][rows], data["attention_mask"][rows]).to(device)
    null_ctx = T.context(data["null_hidden"], data["null_attention_mask"]).to(device)   # (1, 16, 384)
    n = rows.numel()

    mp = T.build_teacher(config, dtype=torch.float32)
    base = mp.model
    unet = base.diffusion_model
    unet.to(device).train()
    for p in unet.parameters():
        p.requires_grad_(True)
    ab = T.alphas_cumprod(mp).float().to(device)
    n_params = T.parameter_count(unet)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                            fused=use_cuda)
    ema = EMA(unet.parameters(), args.ema)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    log, step, seconds_before = [], 0, 0.0
    running, running_n = 0.0, 0  # the loss since the last log line (kept across calls: the same log as one run)
    state_path, doc_path = args.out / STATE, args.out / STATE_DOC
    if state_path.exists():
        doc = storage.read_json(doc_path)
        if doc.get("identity") != identity(args):
            raise SystemExit(f"[teacher] {args.out} holds a run with other settings "
                             f"({storage.describe_difference(doc.get('identity', {}), identity(args))}); "
                             "rerun with its settings to resume it, or use another --out")
        load_state(storage.read_safetensors(state_path), unet, opt, ema, gen, device)
        step, log, seconds_before = int(doc["step"]), list(doc["loss_log"]), float(doc["seconds"])
        running, running_n = doc.get("running", (0.0, 0))
        print(f"[teacher] resuming at step {step} of {args.max_steps} ({seconds_before:.0f}s trained before)", flush=True)
    print(f"[teacher] {T.describe(base.teacher_config)}; {n_params:,} parameters; {n} train images; "
          f"device {device}", flush=True)

    def save_state():
        storage.write_safetensors(state_path, state_tensors(unet, opt, ema, gen))
        storage.write_json(doc_path, {"identity": identity(args), "step": step, "loss_log": log,
                                      "running": [running, running_n],
                                      "seconds": round(seconds_before + time.perf_counter() - t0, 1)})

    forward = torch.compile(unet) if (args.compile and use_cuda) else unet
    budget = math.inf if args.minutes is None else args.minutes * 60.0
    setup_s = time.perf_counter() - t_setup
    t0 = time.perf_counter()
    start_step = step
    stop_step = args.max_steps if args.steps_this_call is None else min(args.max_steps, step + args.steps_this_call)
    while step < stop_step and time.perf_counter() - t0 < budget:
        lr = args.lr * lr_factor(step / args.max_steps, step, args.warmup, args.lr_schedule, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr

        idx = torch.randint(0, n, (args.batch_size,), device=device, generator=gen)
        x0 = T.to_model_space(images[idx], patch)
        ctx = ctx_all[idx]
        drop = torch.rand(args.batch_size, device=device, generator=gen) < args.caption_dropout
        ctx = torch.where(drop[:, None, None], null_ctx.expand_as(ctx), ctx)
        t = torch.randint(0, ab.shape[0], (args.batch_size,), device=device, generator=gen)
        if args.low_t_fraction > 0:
            low = torch.rand(args.batch_size, device=device, generator=gen) < args.low_t_fraction
            t = torch.where(low, torch.randint(0, ab.shape[0] // 4, (args.batch_size,), device=device, generator=gen), t)
        eps = torch.randn(x0.shape, device=device, generator=gen)
        a = ab[t].view(-1, 1, 1, 1)
        z = a.sqrt() * x0 + (1 - a).sqrt() * eps
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_cuda):
            pred = forward(z, t.float(), context=ctx)
        loss = torch.nn.functional.mse_loss(pred.float(), T.training_target(prediction, x0, eps, a))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), args.grad_clip)
        opt.step()
        ema.update(step)
        step += 1

        running += float(loss.detach()) if (step % 10 == 0 or not use_cuda) else 0.0
        running_n += 1 if (step % 10 == 0 or not use_cuda) else 0
        if step % args.log_every == 0 or step == args.max_steps:
            el = time.perf_counter() - t0
            mean = running / max(1, running_n)
            log.append({"step": step, "loss": round(mean, 5), "lr": lr, "seconds": round(seconds_before + el, 1)})
            print(f"[teacher] step {step}/{args.max_steps} loss {mean:.4f} lr {lr:.2e} "
                  f"{(step - start_step) / el:.2f} it/s {el:.0f}s", flush=True)
            running, running_n = 0.0, 0
            if not math.isfinite(mean):
                raise SystemExit(f"loss is {mean} at step {step}: stopping (the last saved state is kept)")
        if step % args.checkpoint_every == 0 and step < args.max_steps:
            save_state()
    train_s = time.perf_counter() - t0
    rate = (step - start_step) / max(train_s, 1e-9)
    print(f"[teacher] {step - start_step} steps in {train_s:.1f}s ({rate:.2f} it/s), "
          f"{step * args.batch_size / n:.1f} epochs in all; setup {setup_s:.1f}s", flush=True)
    if step < args.max_steps:
        save_state()
        left = (args.max_steps - step) / max(rate, 1e-9)
        print(f"[teacher] stopped at step {step} of {args.max_steps} (this call's limit); rerun the same "
              f"command to resume (~{left / 60:.1f} min of training left at this rate)", flush=True)
        return NOT_FINISHED

    unet.eval()
    save_dtype = getattr(torch, args.save_dtype)
    info = {
        "data": {"path": str(args.data), "train_images": n, "sha256": (data.get("meta") or {}).get("dataset_safetensors_sha256")},
        "training": {k: v for k, v in vars(args).items() if k not in ("data", "out")},
        "identity": identity(args),
        "steps": step, "seconds": round(seconds_before + train_s, 1), "epochs": round(step * args.batch_size / n, 2),
        "device": torch.cuda.get_device_name() if use_cuda else "cpu", "ema_weights": True,
        "final_loss": log[-1]["loss"] if log else None, "loss_log": log,
        "torch": torch.__version__,
    }
    path = T.save_teacher(mp, args.out, state_dict=ema.state_dict(unet), dtype=save_dtype, info=info)
    for leftover in (state_path, doc_path):  # the run is complete: the teacher is the result
        leftover.unlink(missing_ok=True)
    size = path.stat().st_size
    print(f"[teacher] wrote {path} ({size / 2**20:.1f} MiB, {args.save_dtype}, sha256 "
          f"{json.loads((args.out / T.CONFIG_NAME).read_text())['sha256'][:16]}…) and {path.with_name(T.CONFIG_NAME)}",
          flush=True)

    if not args.no_preview:
        preview(args, data, device)
    return 0


def state_tensors(unet, opt, ema: EMA, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Everything a resumed run needs, as tensors (one safetensors file, no pickle)."""
    out = {f"param.{k}": v.detach() for k, v in unet.state_dict().items()}
    out.update({f"ema.{i}": s for i, s in enumerate(ema.shadow)})
    for i, p in enumerate(ema.params):
        st = opt.state.get(p, {})
        for key, value in st.items():
            out[f"opt.{i}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    out["generator"] = gen.get_state()
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def load_state(tensors: dict, unet, opt, ema: EMA, gen: torch.Generator, device) -> None:
    with torch.no_grad():
        unet.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("param.")}, strict=True)
    ema.load([tensors[f"ema.{i}"].to(device) for i in range(len(ema.shadow))])
    state = opt.state_dict()
    state["state"] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            i, name = key[4:].split(".", 1)
            state["state"].setdefault(int(i), {})[name] = value
    opt.load_state_dict(state)  # moves the moments to the parameters' device
    gen.set_state(tensors["generator"])


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
    noise = T.make_noise(len(pick), seed=1234, shape=T.latent_shape(mp.model.teacher_config))
    x = T.sample(mp, cond, neg, noise, T.trailing_sigmas(mp, args.preview_steps), args.preview_cfg)
    gen = T.images(mp, x)
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
