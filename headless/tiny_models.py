"""Tiny random-weight models built at run time (no real weights exist here): the tests' models and
the built-in checkpoint of `make demo`.

- make_sd15_checkpoint(path, seed): a safetensors checkpoint that ComfyUI's stock
  CheckpointLoaderSimple detects as SD1.5 (model_config class SD15): a one-level UNet with
  model_channels=320 and context_dim=768 (the two values SD15 detection keys on), the full-size
  CLIP-L text encoder (random weights), and a TAESD-layout VAE (4-channel latent, 8x downscale).
- make_model_patcher(kind, seed): a ModelPatcher around a much smaller UNet built straight from a
  unet_config, for kind in "sd15" (EPS), "v" (SD2-like, V_PREDICTION), "sdxl" (SDXL, EPS, ADM
  conditioning) and "flow" (CONST + ModelSamplingDiscreteFlow).
- make_conditioning(kind, batch, seed): a CONDITIONING list with random text embeddings that fit
  the kind.
- make_sd15_demo_files(models_root): writes models_root/checkpoints/rapm_tiny_sd15.safetensors.

Every function boots ComfyUI in-process (headless.comfy_host.boot) if that has not happened yet.
Weights are random with fan-in scaling (std 1/sqrt(fan_in)), norm scales 1 and small biases, so
outputs are finite and non-trivial; everything is deterministic for a given seed.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

SD15_CHECKPOINT_NAME = "rapm_tiny_sd15.safetensors"
KINDS = ("sd15", "v", "sdxl", "flow")
FLOW_SHIFT = 3.0  # like SD3's default shift
CONTEXT_DIM = {"sd15": 768, "v": 1024, "sdxl": 2048, "flow": 768}
POOLED_DIM = {"sd15": 768, "v": 1024, "sdxl": 1280, "flow": 768}
TAESD_SD15_SCALE = 0.18215  # what ComfyUI's VAELoader sets for the SD1 TAESD

# What detect_unet_config() returns for the checkpoint written by make_sd15_checkpoint: one level,
# one res block, one transformer block on that level and in the middle block.
_SD15_CKPT_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "channel_mult": [1], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "use_temporal_resblock": False, "use_temporal_attention": False,
}


def _comfy():
    """Boot ComfyUI in-process once (CPU unless a GPU is there); comfy.* is importable after.
    Skipped where ComfyUI is already running in this process (booted, or the real host)."""
    if "comfy.model_management" not in sys.modules:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        from headless.comfy_host import boot
        boot()


def _tiny_unet_config(kind: str) -> dict:
    base = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "num_res_blocks": [1, 1], "channel_mult": [1, 2],
        "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1, "use_temporal_resblock": False, "use_temporal_attention": False,
        "adm_in_channels": None, "use_linear_in_transformer": False, "context_dim": CONTEXT_DIM[kind],
    }
    if kind == "v":
        base["use_linear_in_transformer"] = True
    elif kind == "sdxl":
        base.update(use_linear_in_transformer=True, adm_in_channels=2816,
                    transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1], num_classes="sequential")
    return base


# ---------------------------------------------------------------------------------------------
# random weights

def _init_value(name: str, shape, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Fan-in-scaled random tensor for parameter NAME; norm scales 1, biases small."""
    shape = tuple(shape)
    if name.endswith("vae_scale"):
        return torch.full(shape, TAESD_SD15_SCALE, dtype=dtype)
    if name.endswith("vae_shift"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) <= 1:
        if name.endswith(".weight"):  # every 1-D weight in these models is a norm's scale
            return torch.ones(shape, dtype=dtype)
        return torch.randn(shape, generator=gen, dtype=dtype).mul_(0.02)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=gen, dtype=dtype).mul_(1.0 / math.sqrt(fan_in))


def _fill_module(module: torch.nn.Module, seed: int) -> int:
    """Overwrite every parameter of MODULE (in registration order) with seeded random values."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(_init_value(name, p.shape, gen, torch.float32).to(p.dtype))
            count += p.numel()
    return count


def _random_state_dict(shapes: dict, gen: torch.Generator, dtype: torch.dtype, prefix: str) -> dict:
    return {prefix + k: _init_value(k, shape, gen, dtype) for k, shape in shapes.items()}


def _shapes(module: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# 1. checkpoint on disk

def _sd15_checkpoint_shapes(unet_config: dict | None = None) -> tuple[dict, dict, dict]:
    """Key -> shape for the UNet (the one-level test UNet, or `unet_config`), the TAESD VAE and the CLIP-L text
    model, read off ComfyUI's own classes built on the meta device (nothing is allocated)."""
    _comfy()
    import json
    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.taesd.taesd

    with torch.device("meta"):
        unet = comfy.supported_models.SD15(dict(unet_config or _SD15_CKPT_UNET)).get_model({}, device="meta").diffusion_model
        taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
        config_path = os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")
        with open(config_path) as f:
            clip_config = json.load(f)
        clip = comfy.clip_model.CLIPTextModel(clip_config, torch.float16, "meta", comfy.ops.disable_weight_init)
    # SD15.process_clip_state_dict moves every cond_stage_model.transformer.* key under text_model.,
    # so a text_projection can't be loaded from an SD1 checkpoint (SD1 uses the unprojected pooled
    # output anyway): leave it out, like real SD1.5 checkpoints do.
    clip_shapes = {k: v for k, v in _shapes(clip).items() if k.startswith("text_model.")}
    return _shapes(unet), _shapes(taesd), clip_shapes


def make_sd15_checkpoint(path: str, seed: int = 0, unet_config: dict | None = None) -> str:
    """Write a random SD1.5-detected checkpoint (float16 tensors, ~300 MB) to PATH; returns PATH.

    Keys: model.diffusion_model.* (one-level UNet, 320 channels, context 768; or the UNet of `unet_config`, e.g.
    the full-size SD1.5 one: ~2 GB), first_stage_model.taesd_encoder/taesd_decoder.* + vae_scale/vae_shift (TAESD
    VAE), cond_stage_model.transformer.text_model.* (CLIP-L, 123M params)."""
    unet_shapes, vae_shapes, clip_shapes = _sd15_checkpoint_shapes(unet_config)
    title = "rapm tiny random SD1.5 (test model)" if unet_config is None else "rapm random-weight SD1.5 (benchmark model)"
    return _save_random_checkpoint(path, seed, title, [(unet_shapes, "model.diffusion_model."),
                                                       (vae_shapes, "first_stage_model."),
                                                       (clip_shapes, "cond_stage_model.transformer.")])


def _save_random_checkpoint(path: str, seed: int, title: str, parts: list[tuple[dict, str]],
                            fixed: dict[str, torch.Tensor] | None = None) -> str:
    """float16 random tensors for each (key -> shape, key prefix) in `parts`, drawn in that order from one seeded
    generator, plus the `fixed` tensors, saved as a safetensors checkpoint at PATH; returns PATH."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(int(seed))
    with torch.inference_mode(False):
        sd = {}
        for shapes, prefix in parts:
            sd.update(_random_state_dict(shapes, gen, torch.float16, prefix))
        sd.update(fixed or {})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, path, metadata={"modelspec.title": title, "rapm.tiny_seed": str(int(seed))})
    return path


def sdxl_checkpoint_shapes(unet_config: dict) -> tuple[dict, dict, dict]:
    """Key -> shape for an SDXL checkpoint: the UNet of `unet_config` and the TAESD VAE (keys without their
    model.diffusion_model. / first_stage_model. prefixes), and CLIP-L + CLIP-G under the checkpoint's own keys
    (conditioner.embedders.0 / 1, CLIP-G in open_clip's layout). The text encoders come from ComfyUI's SDXLClipModel
    built on the meta device, their keys from ComfyUI's own conversion for saving: the inverse of its loader's."""
    _comfy()
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.taesd.taesd

    model_config = comfy.supported_models.SDXL(dict(unet_config))
    with torch.device("meta"):
        unet = model_config.get_model({}, device="meta").diffusion_model
        taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta")
    saved = model_config.process_clip_state_dict_for_saving(dict(clip.state_dict()))
    clip_shapes = {k: tuple(v.shape) for k, v in saved.items() if not k.endswith("position_ids")}
    return _shapes(unet), _shapes(taesd), clip_shapes


def make_sdxl_checkpoint(path: str, unet_config: dict, seed: int = 0) -> str:
    """Write a random-weight checkpoint that CheckpointLoaderSimple loads as SDXL to PATH; returns PATH. With the
    full-size UNet (bench/perf.py's UNET["sdxl"]) ~7 GB: 2.6B UNet and 0.8B text-encoder parameters in float16."""
    unet_shapes, vae_shapes, clip_shapes = sdxl_checkpoint_shapes(unet_config)
    position_ids = {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0)}
    return _save_random_checkpoint(path, seed, "rapm random-weight SDXL (benchmark model)",
                                   [(unet_shapes, "model.diffusion_model."), (vae_shapes, "first_stage_model."),
                                    (clip_shapes, "")], fixed=position_ids)


def make_sd15_demo_files(models_root: str) -> dict:
    """Write MODELS_ROOT/checkpoints/rapm_tiny_sd15.safetensors; returns {"checkpoint": filename}."""
    make_sd15_checkpoint(os.path.join(models_root, "checkpoints", SD15_CHECKPOINT_NAME))
    return {"checkpoint": SD15_CHECKPOINT_NAME}


# ---------------------------------------------------------------------------------------------
# 2. in-memory ModelPatcher

def make_model_patcher(kind: str = "sd15", seed: int = 0):
    """A ComfyUI ModelPatcher around a tiny random UNet (float32, CPU weights, < 1M-ish params).

    sd15: SD15 config, EPS, context 768.      v: SD20 config (linear proj), V_PREDICTION, context 1024.
    sdxl: SDXL config, EPS, context 2048, adm 2816 (pooled 1280 + 6 size embeddings).
    flow: SD15 config with CONST + ModelSamplingDiscreteFlow (shift FLOW_SHIFT, multiplier 1000).
    Built outside inference mode, so the weights are ordinary tensors."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    _comfy()
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models as sm

    cfg = _tiny_unet_config(kind)
    with torch.inference_mode(False):
        if kind == "sdxl":
            mc = sm.SDXL(cfg)
            mc.set_inference_dtype(torch.float32, None)
            model = comfy.model_base.SDXL(mc, model_type=comfy.model_base.ModelType.EPS, device="cpu")
        else:
            mc = (sm.SD20 if kind == "v" else sm.SD15)(cfg)
            if kind == "v":
                mc.unet_config["num_head_channels"] = 16  # SD20's 64 would leave 0 heads at 32 channels
            if kind == "flow":
                mc.sampling_settings = {"shift": FLOW_SHIFT, "multiplier": 1000}
            model_type = {"sd15": comfy.model_base.ModelType.EPS,
                          "v": comfy.model_base.ModelType.V_PREDICTION,
                          "flow": comfy.model_base.ModelType.FLOW}[kind]
            mc.set_inference_dtype(torch.float32, None)
            model = comfy.model_base.BaseModel(mc, model_type=model_type, device="cpu")
        _fill_module(model.diffusion_model, int(seed))
        model.eval()
        return comfy.model_patcher.ModelPatcher(
            model, load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device())


def make_conditioning(kind: str = "sd15", batch: int = 1, seed: int = 0) -> list:
    """A CONDITIONING list [[cond (batch, 77, ctx), {"pooled_output": ..., ...}]] with random
    embeddings for KIND; "sdxl" also carries the size entries CLIPTextEncodeSDXL adds (1024, crop 0)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    gen = torch.Generator().manual_seed(int(seed))
    with torch.inference_mode(False):
        cond = torch.randn((batch, 77, CONTEXT_DIM[kind]), generator=gen)
        pooled = torch.randn((batch, POOLED_DIM[kind]), generator=gen)
    extra = {"pooled_output": pooled}
    if kind == "sdxl":
        extra.update(width=1024, height=1024, crop_w=0, crop_h=0, target_width=1024, target_height=1024)
    return [[cond, extra]]


def parameter_count(patcher) -> int:
    """Parameters of the diffusion model inside a ModelPatcher."""
    return sum(p.numel() for p in patcher.model.diffusion_model.parameters())
