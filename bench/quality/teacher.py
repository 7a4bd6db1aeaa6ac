"""The quality benchmark's teacher: a small text-to-emoji EPS model that *is* a ComfyUI model.

It is ComfyUI's own `UNetModel` inside a `comfy.model_base.BaseModel` built from an SD15 model
config (ModelType.EPS, so ComfyUI's SD discrete schedule: scaled-linear betas 0.00085-0.012, 1000
steps), wrapped in a `ModelPatcher`: every ComfyUI sampler, the project's trainer and LoRA code take
it like any SD1.5 MODEL. What differs from SD1.5:

- pixel space: RGB images in [-1, 1] are the "latents" (`PixelRGB` latent format: 3 channels, scale 1,
  no VAE; `spacial_downscale_ratio` 1 for code that asks), or with `patch` p > 1 their p×p space-to-depth
  (`torch.nn.functional.pixel_unshuffle`: 3p² channels at 1/p the size, a fixed lossless "autoencoder";
  64×64 images are 12×32×32 latents at patch 2). The map is a permutation of the pixels, so the noise
  stays white and diffusion in it is 64-px pixel diffusion, with a UNet whose first layer sees 2×2 patches;
- text: cross-attention (context_dim 384) to the 16 MiniLM token states of the caption
  (bench/quality/dataset.py), zeros at padding; the empty caption's states are the negative.

    import teacher                                     # with bench/quality on sys.path
    teacher.comfy_init()                               # imports ComfyUI (or reuses a running one)
    mp = teacher.build_teacher({"model_channels": 64})  # random init, float32
    cond = teacher.conditioning(d["hidden"][:4], d["attention_mask"][:4])
    neg = teacher.conditioning(d["null_hidden"], d["null_attention_mask"])
    teacher.save_teacher(mp, "out/")                   # out/teacher.safetensors (fp16) + teacher.json
    mp, cfg = teacher.load_teacher("out/")

Weights are stored as safetensors (never pickle) with the architecture in teacher.json and in the
file's metadata. Only torch, safetensors and ComfyUI are needed.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
FORMAT = "rapm-quality-teacher"
FORMAT_VERSION = 1
WEIGHTS_NAME = "teacher.safetensors"
CONFIG_NAME = "teacher.json"
METADATA_KEY = "rapm_quality_teacher"

# Architecture. Levels: 32x32 (no attention), 16x16 and 8x8 (one transformer block each, cross-
# attending to the caption's tokens). 64 channels, mult [1,2,2], 2 res blocks: 10.79M parameters,
# 20.6 MiB in float16.
DEFAULT_CONFIG = {
    "image_size": 32,             # pixels (the latent is image_size / patch)
    "channels": 3,                # image channels (the latent has channels * patch**2)
    "patch": 1,                   # space-to-depth factor: 1 = pixel space
    "model_channels": 64,
    "channel_mult": [1, 2, 2],
    "num_res_blocks": 2,
    "attention_levels": [1, 2],   # indices into channel_mult: 16x16 and 8x8 at image_size 32
    "transformer_depth": 1,
    "transformer_depth_middle": 1,
    "num_head_channels": 32,
    "use_linear_in_transformer": False,
    "context_dim": 384,           # MiniLM hidden size
    "context_tokens": 16,
    "prediction": "eps",          # "eps" (SD1.5's) or "v" (SD2's v-prediction, ModelType.V_PREDICTION)
    "pixel_range": [-1.0, 1.0],   # uint8 x -> x / 127.5 - 1
    "init_seed": 0,
}
# The benchmark's teacher (bench/quality/README.md; its weights in bench/quality/weights/): 32x32 RGB pixels, the
# default architecture (10.79M parameters, 20.6 MiB in float16). The 64-px space-to-depth recipe ({"image_size": 64,
# "patch": 2}) lacked few-step headroom (bench/results/archive/quality_run9_h200_teachers64/).
RECIPE_CONFIG = {"image_size": 32, "patch": 1}
# What the UNet predicts -> ComfyUI's model type name (comfy.model_base.ModelType).
PREDICTIONS = {"eps": "EPS", "v": "V_PREDICTION"}


# --------------------------------------------------------------------------- ComfyUI

def comfy_init(cpu: bool | None = None, comfyui: str | None = None) -> None:
    """Import the few ComfyUI modules the teacher needs, without nodes or the server (headless.comfy_host's
    import_comfy: `comfyui`, then $COMFYUI_PATH, then the repo's .comfyui/ComfyUI). No-op where ComfyUI is
    already imported. `cpu` None: CPU only where CUDA is unavailable."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from headless.comfy_host import import_comfy
    import_comfy(comfyui, cpu)


def pixel_latent_format():
    """The LatentFormat class of a pixel-space teacher: RGB pixels in [-1, 1], 3 channels, scale 1 (the
    demo's built-in teacher's)."""
    return latent_format(1)


_PATCH_FORMATS: dict = {}


def latent_format(patch: int = 1):
    """The LatentFormat class for a space-to-depth factor p: 3p² channels (pixel_unshuffle order: colour c, then
    row and column inside the patch), scale 1, `spacial_downscale_ratio` p, identity process_in/out, previews
    averaging each colour's p² channels; p = 1 is plain RGB pixels."""
    patch = int(patch)
    if patch not in _PATCH_FORMATS:
        comfy_init()
        from comfy_rapm import host
        k = patch * patch
        rgb = [[1.0 / k if c // k == j else 0.0 for j in range(3)] for c in range(3 * k)]
        _PATCH_FORMATS[patch] = host.latent_format(3 * k, patch, rgb)
    return _PATCH_FORMATS[patch]


def full_config(config: dict | None = None) -> dict:
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    for k, v in (config or {}).items():
        if k not in cfg:
            raise ValueError(f"unknown teacher config key {k!r}; known: {sorted(cfg)}")
        cfg[k] = v
    if cfg["prediction"] not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {sorted(PREDICTIONS)}, got {cfg['prediction']!r}")
    if cfg["model_channels"] % 32:
        raise ValueError(f"model_channels must be a multiple of 32 (GroupNorm(32)), got {cfg['model_channels']}")
    if int(cfg["patch"]) < 1 or cfg["image_size"] % int(cfg["patch"]):
        raise ValueError(f"patch {cfg['patch']} must be ≥ 1 and divide image_size {cfg['image_size']}")
    return cfg


def latent_shape(config: dict | None = None) -> tuple[int, int, int]:
    """(C, H, W) of the model's latent: (channels·patch², image_size/patch, image_size/patch)."""
    cfg = full_config(config)
    p = int(cfg["patch"])
    return (cfg["channels"] * p * p, cfg["image_size"] // p, cfg["image_size"] // p)


def unet_config(config: dict | None = None) -> dict:
    """The keyword arguments of ComfyUI's UNetModel for a teacher config (the form
    comfy.model_detection produces: per-res-block transformer depths)."""
    cfg = full_config(config)
    levels = len(cfg["channel_mult"])
    nrb = int(cfg["num_res_blocks"])
    depth = [int(cfg["transformer_depth"]) if i in cfg["attention_levels"] else 0 for i in range(levels)]
    return {
        "use_checkpoint": False, "image_size": latent_shape(cfg)[1], "use_spatial_transformer": True,
        "legacy": False, "in_channels": latent_shape(cfg)[0], "out_channels": latent_shape(cfg)[0],
        "model_channels": cfg["model_channels"], "num_res_blocks": [nrb] * levels,
        "channel_mult": list(cfg["channel_mult"]),
        "transformer_depth": [d for d in depth for _ in range(nrb)],
        "transformer_depth_output": [d for d in depth for _ in range(nrb + 1)],
        "transformer_depth_middle": int(cfg["transformer_depth_middle"]),
        "use_linear_in_transformer": bool(cfg["use_linear_in_transformer"]),
        "context_dim": cfg["context_dim"], "adm_in_channels": None,
        "use_temporal_resblock": False, "use_temporal_attention": False,
        "num_heads": -1, "num_head_channels": int(cfg["num_head_channels"]),
    }


def init_weights(unet: torch.nn.Module, seed: int = 0) -> None:
    """ComfyUI's ops skip weight init (its layers expect a checkpoint). Give every layer PyTorch's
    default init, norms (1, 0), and zero the last layer of each residual branch (res blocks'
    out conv, transformers' proj_out) and the output conv, as the original LDM UNet does."""
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.modules.diffusionmodules.openaimodel as oai

    nn = torch.nn
    kinds = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int(seed))
        for m in unet.modules():
            for kind in kinds:
                if isinstance(m, kind):
                    kind.reset_parameters(m)  # the base class's init, not ComfyUI's no-op
                    break
        zero = [m.out_layers[-1] for m in unet.modules() if isinstance(m, oai.ResBlock)]
        zero += [m.proj_out for m in unet.modules() if isinstance(m, attention.SpatialTransformer)]
        zero.append(unet.out[-1])
        for m in zero:
            for p in m.parameters():
                p.zero_()


def build_teacher(config: dict | None = None, dtype: torch.dtype = torch.float32, init: bool = True,
                  load_device=None):
    """A ComfyUI ModelPatcher around a freshly built teacher (weights on the CPU, `dtype`).

    `init` False skips the weight init (for loading a state dict right after). The patcher's load
    device is ComfyUI's torch device (CUDA where ComfyUI uses it) unless `load_device` is given."""
    comfy_init()
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    cfg = full_config(config)
    mc = comfy.supported_models.SD15(unet_config(cfg))
    # SD15's unet_extra_config sets num_heads=8; ours uses a fixed head width.
    mc.unet_config["num_heads"] = -1
    mc.unet_config["num_head_channels"] = int(cfg["num_head_channels"])
    mc.latent_format = latent_format(cfg["patch"])()
    mc.set_inference_dtype(dtype, None)
    with torch.inference_mode(False):
        model = comfy.model_base.BaseModel(mc, model_type=getattr(comfy.model_base.ModelType, PREDICTIONS[cfg["prediction"]]),
                                          device="cpu")
        if init:
            init_weights(model.diffusion_model, cfg["init_seed"])
    model.eval()
    model.teacher_config = cfg
    return comfy.model_patcher.ModelPatcher(
        model, load_device=load_device or comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())


def parameter_count(model) -> int:
    """Parameters of the UNet of a ModelPatcher, a BaseModel or a UNet."""
    model = getattr(model, "model", model)
    model = getattr(model, "diffusion_model", model)
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- conditioning

def context(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L, 384) float32 token states with padded positions zeroed."""
    x = hidden.float()
    if x.ndim == 2:
        x = x[None]
    if mask is not None:
        m = mask.to(x.device).bool()
        if m.ndim == 1:
            m = m[None]
        x = x * m[..., None].to(x.dtype)
    return x


def conditioning(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> list:
    """ComfyUI CONDITIONING [[tokens (B, 16, 384), {}]] for B captions (row i goes with latent i;
    batch 1 is repeated to any latent batch by ComfyUI). Use the dataset's `null_hidden` /
    `null_attention_mask` for the negative (empty caption)."""
    with torch.inference_mode(False):
        tokens = context(hidden, mask).detach().clone()
    return [[tokens, {}]]


def empty_conditioning(data: dict) -> list:
    """The negative: the empty caption's conditioning from a load_dataset() dict."""
    return conditioning(data["null_hidden"], data["null_attention_mask"])


# --------------------------------------------------------------------------- the UNet as trained

def alphas_cumprod(model) -> torch.Tensor:
    """ᾱ of ComfyUI's discrete schedule of the model (1000,), from its sigma table."""
    ms = getattr(model, "model", model).model_sampling
    return 1.0 / (1.0 + ms.sigmas.double() ** 2)


def unet_prediction(base_model, x_vp: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """The UNet's raw output for VP inputs z_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε at integer timesteps t: ε̂ for an
    EPS teacher, v̂ (≈ sqrt(ᾱ_t) ε - sqrt(1-ᾱ_t) x0) for a V teacher.

    Exactly what ComfyUI's BaseModel.apply_model computes for x = z_t·sqrt(1+σ²) at σ = σ(t):
    its input scaling x/sqrt(1+σ²) is z_t and `model_sampling.timestep(σ(t))` is t; it then
    returns the denoised x - σ ε̂ (EPS) or sqrt(ᾱ_t) z_t - sqrt(1-ᾱ_t) v̂ (V)."""
    return base_model.diffusion_model(x_vp, t.to(x_vp.device).float(), context=ctx)


def training_target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output at z_t = sqrt(ᾱ) x0 + sqrt(1-ᾱ) ε: ε, or v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0."""
    if prediction == "eps":
        return eps
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0


# --------------------------------------------------------------------------- save / load

def _json_default(o):
    if isinstance(o, (torch.dtype,)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_teacher(model, out: str | os.PathLike, state_dict: dict | None = None,
                 dtype: torch.dtype = torch.float16, info: dict | None = None) -> Path:
    """Write <out>/teacher.safetensors (UNet weights in `dtype`, keys as in the UNet's
    state_dict) and <out>/teacher.json (format, architecture, parameter count, sha256, `info`).
    `state_dict` overrides the model's weights (e.g. the EMA). Returns the weights' path."""
    from safetensors.torch import save_file

    cfg = full_config(getattr(getattr(model, "model", model), "teacher_config", None))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else getattr(model, "model", model).diffusion_model.state_dict()
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in sd.items()}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "teacher_config": json.dumps(cfg),
            "dtype": str(dtype).replace("torch.", "")}
    path = out / WEIGHTS_NAME
    tmp = path.with_name(path.name + ".tmp")
    # One metadata key: safetensors writes several in a random order, and the file's checksum must depend on the
    # weights alone (read_teacher_config reads both layouts).
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "weights": WEIGHTS_NAME,
           "dtype": meta["dtype"], "parameters": int(sum(t.numel() for t in tensors.values())),
           "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
           "config": cfg, "unet_config": unet_config(cfg),
           "comfyui": {"model_config": "SD15", "model_type": PREDICTIONS[cfg["prediction"]], "latent_format": "PixelRGB (3 ch, scale 1)",
                       "schedule": "discrete scaled-linear 0.00085-0.012, 1000 steps"},
           "info": info or {}}
    (out / CONFIG_NAME).write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    return path


def read_teacher_config(path: str | os.PathLike) -> dict:
    """teacher.json of a teacher folder (or of the folder of a teacher.safetensors)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    doc_path = folder / CONFIG_NAME
    if doc_path.is_file():
        doc = json.loads(doc_path.read_text())
    else:  # the weights alone: the architecture is in the file's metadata
        from safetensors import safe_open
        with safe_open(str(folder / WEIGHTS_NAME if path.is_dir() else path), "pt") as f:
            meta = f.metadata() or {}
        if METADATA_KEY in meta:
            meta = json.loads(meta[METADATA_KEY])
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file and no {CONFIG_NAME} beside it")
        doc = {"format": FORMAT, "format_version": int(meta["format_version"]), "weights": WEIGHTS_NAME,
               "config": json.loads(meta["teacher_config"])}
    if doc.get("format") != FORMAT:
        raise ValueError(f"{doc_path}: format is {doc.get('format')!r}, expected {FORMAT!r}")
    if int(doc.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{doc_path}: format_version {doc['format_version']} is newer than this code ({FORMAT_VERSION})")
    return doc


def weights_file(path: Path, doc: dict) -> Path:
    """The weights of a teacher folder (teacher.json's `weights`, relative to it) or the file itself."""
    return path if path.is_file() else path / doc.get("weights", WEIGHTS_NAME)


def load_teacher(path: str | os.PathLike, dtype: torch.dtype = torch.float32, load_device=None):
    """(ModelPatcher, teacher.json dict) from a folder written by save_teacher (or its
    teacher.safetensors). Weights are cast to `dtype`; the load is strict."""
    from safetensors.torch import load_file

    path = Path(path)
    doc = read_teacher_config(path)
    weights = weights_file(path, doc)
    mp = build_teacher(doc["config"], dtype=dtype, init=False, load_device=load_device)
    sd = load_file(str(weights))
    with torch.inference_mode(False), torch.no_grad():
        missing, unexpected = mp.model.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights}: does not match the architecture in {CONFIG_NAME}: "
                         f"missing {missing[:5]}…, unexpected {unexpected[:5]}…")
    return mp, doc


# --------------------------------------------------------------------------- images

def to_model_space(images_uint8: torch.Tensor, patch: int = 1) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 latents: pixels in [-1, 1], space-to-depth by `patch`."""
    x = images_uint8.float() / 127.5 - 1.0
    return torch.nn.functional.pixel_unshuffle(x, int(patch)) if int(patch) > 1 else x


def to_uint8(x: torch.Tensor, patch: int = 1) -> torch.Tensor:
    """Model-space samples (float, [-1, 1] nominal) -> uint8 images (B, 3, H·patch, W·patch) on the CPU:
    depth-to-space by `patch`, then clamp((x+1)/2)."""
    x = x.detach().float().cpu()
    if int(patch) > 1:
        x = torch.nn.functional.pixel_shuffle(x, int(patch))
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def patch_of(model) -> int:
    """The space-to-depth factor of a teacher ModelPatcher / BaseModel (1 for pixel-space models)."""
    cfg = getattr(getattr(model, "model", model), "teacher_config", None) or {}
    return int(cfg.get("patch", 1))


def images(model, x: torch.Tensor) -> torch.Tensor:
    """uint8 images of a teacher's model-space samples (`to_uint8` with the model's patch)."""
    return to_uint8(x, patch_of(model))


def describe(config: dict | None = None) -> str:
    cfg = full_config(config)
    c, h, _ = latent_shape(cfg)
    res = [h // 2 ** i for i in range(len(cfg["channel_mult"]))]
    attn = ", ".join(f"{res[i]}²" for i in cfg["attention_levels"])
    space = (f"{cfg['image_size']}² pixels" if cfg["patch"] == 1 else
             f"{cfg['image_size']}² pixels as {c}×{h}² latents ({cfg['patch']}×{cfg['patch']} space-to-depth)")
    return (f"{space}; UNet {cfg['model_channels']} ch × {cfg['channel_mult']}, {cfg['num_res_blocks']} res blocks/level, "
            f"cross-attention (context {cfg['context_dim']}, {cfg['context_tokens']} tokens) at {attn} + middle, "
            f"head width {cfg['num_head_channels']}")


# --------------------------------------------------------------------------- sampling through ComfyUI

def trailing_sigmas(model, steps: int) -> torch.Tensor:
    """σ of the trailing grid [t_steps … t_1] then index 0 (100 steps: 999, 989, …, 9, 0), from
    the model's own sigma table: the grid of the teacher trajectories and of the students."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from comfy_rapm import schedule
    ms = getattr(model, "model", model).model_sampling
    return schedule.sigma_at(ms, schedule.trailing_timesteps(steps, schedule.num_timesteps(ms))).cpu()


def make_noise(count: int, seed: int, shape=(3, 32, 32)) -> torch.Tensor:
    """Standard normal noise (count, *shape), float32 on the CPU, from one seeded generator:
    the same seed gives the same noise for the teacher and every student."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn((int(count),) + tuple(shape), generator=gen)


def _rows(conditioning: list, start: int, stop: int, total: int) -> list:
    out = []
    for tensor, extra in conditioning:
        t = tensor[start:stop] if tensor.shape[0] == total and total > 1 else tensor
        out.append([t, dict(extra)])
    return out


def _check_batches(conditioning: list, negative: list, total: int) -> None:
    for name, cond in (("conditioning", conditioning), ("negative", negative)):
        for tensor, _ in cond:
            if tensor.shape[0] not in (1, total):
                raise ValueError(f"{name} has batch {tensor.shape[0]}, noise has {total}: give one row per sample or one row")


def _chunked(run, conditioning: list, negative: list, noise: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    """run(noise chunk, positive rows, negative rows) per chunk of `batch_size`, under inference mode."""
    total = noise.shape[0]
    _check_batches(conditioning, negative, total)
    step = int(batch_size or total)
    outs = []
    with torch.inference_mode():
        for start in range(0, total, step):
            stop = min(total, start + step)
            out = run(noise[start:stop].float().cpu(), _rows(conditioning, start, stop, total),
                      _rows(negative, start, stop, total))
            outs.append(out.float().cpu())
    return torch.cat(outs).clone()


def sample(model_patcher, conditioning: list, negative: list, noise: torch.Tensor, sigmas: torch.Tensor,
           cfg: float, sampler_name: str = "euler", seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """Sample THROUGH ComfyUI: `comfy.sample.sample_custom` with `comfy.samplers.sampler_object`
    on the given sigmas, from pure noise (a zero latent), exactly as a SamplerCustom node does.

    `noise`: standard normal (B, C, H, W) latents; ComfyUI scales it by sqrt(1+σ0²) when sigmas[0] is the
    schedule's σ_max (trailing grids start at t=999). `conditioning` has batch B (row i for sample
    i) or 1; `negative` batch 1 (or B). Euler on an EPS model is DDIM, so a trailing grid ending at
    σ(index 0) gives the DDIM result at ᾱ[0]. cfg 1 skips the negative (ComfyUI's own shortcut).
    Returns model-space samples (float32, CPU, [-1, 1] nominal); `images` makes images.
    `batch_size` splits the work into chunks (conditioning rows follow their noise)."""
    comfy_init()
    import comfy.sample
    import comfy.samplers

    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)

    def run(n, positive, neg):
        return comfy.sample.sample_custom(model_patcher, n, float(cfg), comfy.samplers.sampler_object(sampler_name),
                                          sigmas, positive, neg, torch.zeros_like(n), disable_pbar=True, seed=int(seed))
    return _chunked(run, conditioning, negative, noise, batch_size)


def ksampler(model_patcher, conditioning: list, negative: list, noise: torch.Tensor, steps: int, cfg: float,
             sampler_name: str, scheduler: str, seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """What ComfyUI's stock KSampler node runs (`nodes.common_ksampler` → `comfy.sample.sample`, which builds
    `comfy.samplers.KSampler(sampler_name, scheduler, steps)`), at denoise 1 from an empty latent, with the
    given standard-normal `noise` instead of the node's seeded draw (the same noise as every other row).
    Returns model-space samples like `sample`."""
    comfy_init()
    import comfy.sample

    def run(n, positive, neg):
        latent = comfy.sample.fix_empty_latent_channels(model_patcher, torch.zeros_like(n))
        return comfy.sample.sample(model_patcher, n, int(steps), float(cfg), sampler_name, scheduler, positive, neg,
                                   latent, denoise=1.0, disable_pbar=True, seed=int(seed))
    return _chunked(run, conditioning, negative, noise, batch_size)


if __name__ == "__main__":  # python bench/quality/teacher.py: the architecture and its size
    comfy_init(cpu=True)
    mp = build_teacher()
    n = parameter_count(mp)
    print(describe(), f"\n{n:,} parameters, {n * 2 / 2**20:.1f} MiB in float16")
