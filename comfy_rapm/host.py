"""The one module that touches ComfyUI internals (`comfy.*`).

Everything the core needs from the host goes through here: a denoiser over a ModelPatcher with
ComfyUI's own conditioning and CFG, the model's sampling object, seeded noise, latent-space
conversion, the training session's weights, LoRA hooks and CUDA graphs, stock LoRA application,
progress and Cancel.
Imported only inside a ComfyUI process."""
from __future__ import annotations

import copy
import logging
from typing import Callable

import torch

import comfy.conds
import comfy.model_management
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy.sd
import comfy.utils

from .conditioning import Conditioning

log = logging.getLogger(__name__)


# --- the denoiser -------------------------------------------------------------------------

class Denoiser:
    """CFG denoised prediction of a loaded model at any σ, for a batch.

    `denoiser(x, sigma, conds, cfg)`: x in model space (batch B), sigma one per item, conds from
    `prepare(positive, negative)` (or None for the conditioning the context was opened with).
    Conditioning rows are repeated to the batch if the conditioning has batch 1."""

    def __init__(self, guider, model_options, seed, latent_shape):
        self._guider = guider
        self._model_options = model_options
        self._seed = seed
        self._latent_shape = tuple(latent_shape)
        self.default_conds = guider.conds
        self.model_sampling = guider.inner_model.model_sampling
        self.device = guider.model_patcher.load_device

    def prepare(self, positive: Conditioning, negative: Conditioning, latent_shape=None):
        conds = {"positive": comfy.sampler_helpers.convert_cond(positive),
                 "negative": comfy.sampler_helpers.convert_cond(negative)}
        shape = latent_shape or (1,) + tuple(self._latent_shape[1:])
        noise = torch.zeros(shape, device=self.device)
        processed = comfy.samplers.process_conds(self._guider.inner_model, noise, conds, self.device)
        # on the device once, not per pass by the model's own cast (and so no host copy inside a CUDA graph's capture)
        return _map_tensors(processed, lambda t: t.to(self.device))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, conds=None, cfg: float = 1.0) -> torch.Tensor:
        g = self._guider
        g.conds = conds if conds is not None else self.default_conds
        g.cfg = cfg
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        try:
            return g(x, sigma, model_options=self._model_options, seed=self._seed)
        finally:
            g.conds = self.default_conds


def _map_tensors(obj, fn):
    """`obj` (processed conditioning: dicts, lists, ComfyUI's CONDRegular-like objects) with fn applied to every tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    if isinstance(obj, comfy.conds.CONDRegular):
        out = copy.copy(obj)
        out.cond = _map_tensors(obj.cond, fn)
        return out
    return obj


def conditioning_tensors(conds) -> list[torch.Tensor]:
    """Every tensor of a `Denoiser.prepare` result, in a fixed order (two results of the same structure line up)."""
    found = []
    _map_tensors(conds, lambda t: found.append(t) or t)
    return found


class _CallbackSampler(comfy.samplers.Sampler):
    """A ComfyUI sampler whose body is our function: it runs with the model loaded, conditioning
    processed and patches applied exactly as in any KSampler run."""

    def __init__(self, fn, latent_shape):
        self.fn = fn
        self.latent_shape = latent_shape
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        denoiser = Denoiser(model_wrap, extra_args.get("model_options", {}), extra_args.get("seed"), self.latent_shape)
        self.result = self.fn(denoiser)
        return noise


def run_with_denoiser(model, positive: Conditioning, negative: Conditioning, latent_shape, fn: Callable,
                      seed: int = 0):
    """Load `model` through ComfyUI's sampling path and call fn(denoiser) inside it; returns fn's
    result. `latent_shape` (model-space latent, batch first) sizes memory estimates and conds."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    sampler = _CallbackSampler(fn, tuple(latent_shape))
    dummy = torch.zeros(tuple(latent_shape))
    guider.sample(dummy, dummy, sampler, torch.tensor([1.0, 0.0]), disable_pbar=True, seed=seed)
    return sampler.result


# --- in-slot solvers ---------------------------------------------------------------------------

def slot_solver(name: str):
    """A solver.Solve for trajectory slots: "ddim" (ours; = ComfyUI's euler), or ComfyUI's own sampler function
    of that name ("dpmpp_2m", "uni_pc") run deterministically on the slot's sigmas, the way KSampler calls it
    (model(x, σ·1) → denoised)."""
    from . import solver
    if name == "ddim":
        return solver.ddim_solve
    if name not in solver.SOLVERS:
        raise ValueError(f"in-slot solver {name!r}: one of {', '.join(solver.SOLVERS)}")
    function = comfy.samplers.sampler_object(name).sampler_function

    def solve(denoise, x, sigmas, callback=None):
        def model(x, sigma, **_):
            return denoise(x, sigma)
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=x.device)
        return function(model, x, sigmas, extra_args={}, callback=callback, disable=True)
    return solve


# --- text and folders -----------------------------------------------------------------------

def encode_text(clip, text: str) -> Conditioning:
    """What the stock CLIPTextEncode node does."""
    if clip is None:
        raise ValueError("the clip input is empty: the checkpoint has no text encoder; connect a CLIP loader")
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def output_directory() -> str:
    import folder_paths
    return folder_paths.get_output_directory()


def input_directory() -> str:
    import folder_paths
    return folder_paths.get_input_directory()


def lora_directory() -> str:
    import folder_paths
    return folder_paths.get_folder_paths("loras")[0]


# --- model facts --------------------------------------------------------------------------

def model_sampling(model):
    return model.get_model_object("model_sampling")


def latent_channels(model) -> int:
    return int(model.model.latent_format.latent_channels)


def latent_downscale(model) -> int:
    return int(getattr(model.model.latent_format, "spacial_downscale_ratio", 8))


def model_family(model) -> str:
    """A short name of the model's config class (SD15, SDXL, …): compatibility checks and metadata."""
    return type(model.model.model_config).__name__


def is_sdxl_like(model) -> bool:
    return "SDXL" in model_family(model) or "SDXL" in type(model.model).__name__


def size_conditioning(model, width: int, height: int) -> dict:
    """The conditioning entries CLIPTextEncode's caller adds for a model that is conditioned on image size
    (SDXL-like: original and target size, no crop); nothing for the others."""
    if not is_sdxl_like(model):
        return {}
    return {"width": width, "height": height, "crop_w": 0, "crop_h": 0, "target_width": width, "target_height": height}


def process_latent_in(model, samples: torch.Tensor) -> torch.Tensor:
    return model.model.process_latent_in(samples)


def process_latent_out(model, samples: torch.Tensor) -> torch.Tensor:
    return model.model.process_latent_out(samples)


def fix_empty_latent_channels(model, samples: torch.Tensor) -> torch.Tensor:
    return comfy.sample.fix_empty_latent_channels(model, samples)


def prepare_noise(samples: torch.Tensor, seed: int, batch_index=None) -> torch.Tensor:
    """The noise ComfyUI's samplers draw for this latent and seed (CPU generator)."""
    return comfy.sample.prepare_noise(samples, seed, batch_index)


def model_info(model, latent_shape=None) -> dict:
    """What a trajectory set or LoRA records about its teacher, to refuse mismatches later."""
    ms = model_sampling(model)
    info = {"family": model_family(model), "latent_channels": latent_channels(model),
            "prediction": "+".join(b.__name__ for b in type(ms).__bases__),
            "num_timesteps": int(getattr(ms, "sigmas").shape[0]) if hasattr(ms, "sigmas") else 1000,
            "fingerprint": unet_state_fingerprint(model)}
    if latent_shape is not None:
        info["latent_shape"] = [int(v) for v in latent_shape]
    return info


def unet_state_fingerprint(model, max_tensors: int = 64) -> str:
    """A cheap fingerprint of the base weights (shapes + a few values of evenly spaced tensors). A clone
    that sampled last may have left its LoRA merged into the weights all clones share; ComfyUI keeps the
    originals in the patcher's `backup` (shared by clones) until it restores them, so read those."""
    import hashlib
    sd = model.model.diffusion_model.state_dict()
    for key, saved in (getattr(model, "backup", None) or {}).items():
        name = key.removeprefix("diffusion_model.")
        if name != key and name in sd:
            sd[name] = saved.weight
    keys = sorted(sd)
    h = hashlib.sha256()
    for k in keys:
        h.update(f"{k}:{tuple(sd[k].shape)};".encode())
    step = max(1, len(keys) // max_tensors)
    for k in keys[::step]:
        flat = sd[k].detach().flatten()
        sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


# --- adapters -----------------------------------------------------------------------------

def weight_modules(model) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Modules of the diffusion model whose weights ComfyUI casts through weight functions,
    by their key prefix in a LoRA file (`diffusion_model.…`)."""
    out = {}
    for name, module in model.model.named_modules():
        if hasattr(module, "weight_function") and getattr(module, "weight", None) is not None:
            out[name] = (tuple(module.weight.shape), module.weight.dtype)
    return out


def trainable_clone(model, compute_dtype: torch.dtype):
    """A clone of `model` that computes in `compute_dtype`; inside `training_weights` gradients flow
    through it to its inputs. The cached model other nodes hold is untouched."""
    patched = resident(model).clone()
    patched.set_model_compute_dtype(compute_dtype)
    return patched


def resident(model):
    """`model`, or where the host made it a dynamic patcher (ComfyUI 0.33+ on a GPU with comfy-aimdo: weights
    streamed into VRAM layer by layer while sampling) the host's own non-dynamic delegate of it. Training swaps
    the UNet's parameters for resident copies and replays CUDA graphs over them, which needs weights that stay
    where they are."""
    if not getattr(model, "is_dynamic", lambda: False)():
        return model
    delegate = getattr(model, "get_non_dynamic_delegate", None)
    if delegate is None:
        raise RuntimeError("this ComfyUI gave RAPM a dynamic model patcher without a non-dynamic delegate; "
                           "start ComfyUI with --disable-dynamic-vram to train")
    log.info("RAPM: training on ComfyUI's non-dynamic copy of the model (its dynamic VRAM streams weights per layer)")
    return delegate()


def apply_lora(model, lora_state_dict: dict, strength: float = 1.0):
    """Teacher + LoRA the way the stock 'Load LoRA Model' node applies it."""
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora_state_dict, strength, 0)
    return patched


# --- progress and cancel ------------------------------------------------------------------

class Progress:
    """The host's progress bar (the node's bar in the UI; a terminal bar under headless/run.py)
    plus a text line on the node (rate, ETA, losses). The host's hook raises its interrupt
    exception from update() when the user pressed Cancel."""

    def __init__(self, total: int, node_id=None):
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.total = total
        self.node_id = node_id

    def text(self, message: str) -> None:
        if self.node_id is None:
            return
        try:
            from server import PromptServer
            PromptServer.instance.send_progress_text(message, self.node_id)
        except Exception:  # no server (tests) or an older host: the bar still works
            pass

    def update_absolute(self, value: int, preview=None):
        self.bar.update_absolute(value, self.total, preview)


def check_interrupt() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, comfy.model_management.OOM_EXCEPTION)


# --- training support ---------------------------------------------------------------------

def unet(model) -> torch.nn.Module:
    """The diffusion model's torch module (a UNet for SD1.5/SDXL), shared by every clone of the patcher."""
    return model.model.diffusion_model


def module_root(model) -> torch.nn.Module:
    """The module whose names LoRA files use (`diffusion_model.…`)."""
    return model.model


def feature_layers(model, include_up: bool) -> list[torch.nn.Module]:
    """The discriminator backbone's taps, where PCM's discriminator reads diffusers' UNet: the output
    of every down block (after its downsampler; the last level has none), the middle block, and (if
    include_up) the output of every up block (after its upsampler)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample
    unet = model.model.diffusion_model
    if not all(hasattr(unet, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        raise ValueError(f"the discriminator needs a UNet backbone; {type(unet).__name__} is not supported yet")
    inputs, outputs = list(unet.input_blocks), list(unet.output_blocks)
    layers = [b[-1] for i, b in enumerate(inputs) if i > 0 and (isinstance(b[0], Downsample) or i == len(inputs) - 1)]
    if unet.middle_block is not None:
        layers.append(unet.middle_block[-1])
    if include_up:
        layers += [b[-1] for i, b in enumerate(outputs) if i == len(outputs) - 1 or isinstance(b[-1], Upsample)]
    return layers


def training_dtype(model, precision: str) -> torch.dtype | None:
    """'auto': bf16 on a GPU that supports it, else float32; 'bf16' also on the CPU (slow, for checks)."""
    device = model.load_device
    if precision == "fp32":
        return torch.float32
    if precision in ("auto", "bf16") and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if precision == "bf16":
        if device.type == "cpu":
            return torch.bfloat16
        raise ValueError(f"bf16 is not supported on {device}; use precision auto or fp32")
    return torch.float32


def interrupted_types() -> tuple[type, ...]:
    return (comfy.model_management.InterruptProcessingException, KeyboardInterrupt)


# --- models built from weights (the demo's teacher) ------------------------------------------

def latent_format(channels: int, downscale: int, rgb_factors: list | None = None):
    """A ComfyUI latent format class for latents that are images rearranged (the demo's pixels, a
    space-to-depth of them): `channels` channels at 1/`downscale` of the image size, scale 1, process_in/out the
    identity; `rgb_factors` (channels × 3) make its previews (default: channel c shows as colour c)."""
    import comfy.latent_formats
    rgb = rgb_factors or [[1.0 if c == j else 0.0 for j in range(3)] for c in range(channels)]

    class ImageLatent(comfy.latent_formats.LatentFormat):
        latent_channels = channels
        latent_dimensions = 2
        scale_factor = 1.0
        spacial_downscale_ratio = downscale
        latent_rgb_factors = rgb

        def process_in(self, latent):
            return latent

        def process_out(self, latent):
            return latent
    ImageLatent.__name__ = ImageLatent.__qualname__ = f"ImageLatent{channels}x{downscale}"
    return ImageLatent


def eps_unet_model(unet_config: dict, state_dict: dict, latent):
    """A ModelPatcher around an SD1.5-style EPS UNet from `unet_config` and its weights (strict load), in the
    latent space of `latent` (a latent_format class): ComfyUI's own UNet class and SD discrete schedule."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    config = comfy.supported_models.SD15(dict(unet_config))
    config.unet_config["num_heads"] = unet_config.get("num_heads", -1)
    config.unet_config["num_head_channels"] = unet_config["num_head_channels"]
    config.latent_format = latent()
    config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode(False):
        model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device="cpu")
        model.diffusion_model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())
