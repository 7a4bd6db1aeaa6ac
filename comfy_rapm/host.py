"""The one module that touches ComfyUI internals (`comfy.*`).

Everything the core needs from the host goes through here: a denoiser over a ModelPatcher with
ComfyUI's own conditioning and CFG, the model's sampling object, seeded noise, latent-space
conversion, the training session's weights, LoRA hooks and CUDA graphs, stock LoRA application,
progress and Cancel.
Imported only inside a ComfyUI process."""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

import comfy.model_management
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy.sd
import comfy.utils

Conditioning = list  # ComfyUI CONDITIONING: [[cross_attn tensor, {extra}], ...]


# --- conditioning -------------------------------------------------------------------------

def single_entry(conditioning: Conditioning, what: str) -> tuple[torch.Tensor, dict]:
    if not isinstance(conditioning, list) or len(conditioning) != 1 or len(conditioning[0]) != 2:
        raise ValueError(f"{what}: expected the output of one text encode (one conditioning entry), "
                         f"got {len(conditioning) if isinstance(conditioning, list) else type(conditioning).__name__} "
                         "entries; RAPM does not support combined, area or masked conditioning")
    return conditioning[0][0], conditioning[0][1]


def stack_conditioning(conditionings: list[Conditioning], what: str = "conditioning") -> Conditioning:
    """Batch one-prompt conditionings into one CONDITIONING whose row i belongs to latent i.
    Token lengths are padded by repetition to their least common multiple, as ComfyUI does."""
    entries = [single_entry(c, what) for c in conditionings]
    length = 1
    for tensor, _ in entries:
        length = math.lcm(length, tensor.shape[1])
    tensors = [t.repeat(1, length // t.shape[1], 1) if t.shape[1] < length else t for t, _ in entries]
    extra = {}
    for key, value in entries[0][1].items():
        values = [e[1].get(key) for e in entries]
        if isinstance(value, torch.Tensor):
            extra[key] = torch.cat(values)
        elif all(v == value for v in values):
            extra[key] = value
        else:
            raise ValueError(f"{what}: prompts in one batch differ in '{key}' ({values[:3]}…)")
    return [[torch.cat(tensors), extra]]


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
        return comfy.samplers.process_conds(self._guider.inner_model, noise, conds, self.device)

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
    patched = model.clone()
    patched.set_model_compute_dtype(compute_dtype)
    return patched


@contextlib.contextmanager
def training_weights(model, dtype: torch.dtype):
    """While inside (with `model` loaded): the diffusion model's parameters are frozen ordinary
    tensors in `dtype`. The loader's weights are inference tensors, which autograd cannot save, and
    casting them on every use costs a copy per layer per pass and a saved copy per graded pass. The
    originals wait on the CPU and are put back exactly on exit."""
    slots = [(module, name) for module in model.model.diffusion_model.modules()
             for name, p in module._parameters.items() if p is not None]
    saved = []
    try:
        for module, name in slots:  # one parameter at a time, so no original outlives its replacement
            p = module._parameters[name]
            saved.append((module, name, p.detach().to("cpu", copy=True), p.requires_grad, p.device))
            with torch.inference_mode(False):
                module._parameters[name] = torch.nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False)
            del p
        yield
    finally:
        with torch.inference_mode():
            for module, name, original, flag, device in saved:
                module._parameters[name] = torch.nn.Parameter(original.to(device, copy=True), requires_grad=flag)


@contextlib.contextmanager
def lora_attached(model, lora):
    """While inside: every LoRA target module of `model` adds its layer's output while the LoRA is
    enabled (forward hooks on the shared modules, removed on exit)."""
    modules = dict(model.model.named_modules())
    handles = []
    try:
        for name, layer in lora.by_module().items():
            module = modules[name]
            if getattr(module, "groups", 1) != 1 or getattr(module, "padding_mode", "zeros") != "zeros":
                raise ValueError(f"LoRA target {name} is a grouped or non-zero-padded convolution, not supported")

            def hook(module, args, output, _layer=layer):
                if lora.enabled:
                    return _layer.add_to_output(module, args[0], output)
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


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

    def update(self, n: int = 1):
        self.bar.update(n)


def check_interrupt() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()




def is_oom(error: BaseException) -> bool:
    return isinstance(error, comfy.model_management.OOM_EXCEPTION)




# --- training support ---------------------------------------------------------------------

class _FeaturesCaptured(Exception):
    pass


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


class FeatureTap:
    """Runs the model as the discriminator backbone and returns the tapped feature maps; the
    pass stops at the last tap, so an SDXL-style down+mid backbone skips the up path.

    Eagerly, hooks on the tapped layers collect the features and the last one stops the pass by
    raising through the host's sampling code. Under `graphed_unet` the diffusion model's forward
    itself returns the features (`forward_to_features`, captured in a graph) and hands them over
    (`deliver`), which stops the pass the same way."""

    def __init__(self, model, include_up: bool):
        self.layers = feature_layers(model, include_up)
        self.active = False  # while a tapped pass runs
        self._captured: dict = {}
        self._delivered = None

    def __call__(self, denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, conds) -> list[torch.Tensor]:
        captured = self._captured = {}
        last = self.layers[-1]

        def hook(module, args, output):
            captured[id(module)] = output
            if module is last:
                raise _FeaturesCaptured

        handles = [layer.register_forward_hook(hook) for layer in self.layers]
        self.active, self._delivered = True, None
        try:
            denoiser(x, sigma, conds, cfg=1.0)
        except _FeaturesCaptured:
            pass
        finally:
            self.active = False
            for h in handles:
                h.remove()
        if self._delivered is not None:
            features, self._delivered = list(self._delivered), None
            return features
        return [captured[id(layer)] for layer in self.layers]

    def forward_to_features(self, forward: Callable, *args, **kwargs) -> tuple[torch.Tensor, ...]:
        """The diffusion model's `forward` as far as the last tap (while __call__'s hooks are on),
        returning the tapped features."""
        try:
            forward(*args, **kwargs)
        except _FeaturesCaptured:
            pass
        return tuple(self._captured[id(layer)] for layer in self.layers)

    def deliver(self, features: tuple) -> None:
        """Hands `features` to the running __call__ and stops the pass."""
        self._delivered = features
        raise _FeaturesCaptured


@contextlib.contextmanager
def graphed_unet(model, enabled: bool, state: Callable[[], object], tap: FeatureTap | None = None,
                 graded: bool = False, parameters: Callable[[], torch.nn.Module | None] = lambda: None,
                 graded_parameters: bool = True):
    """While inside: the diffusion model's passes on CUDA replay CUDA graphs (see cuda_graphs.py),
    tapped backbone passes included; with `graded`, also the passes with grad (their gradients reach
    the inputs and, with `graded_parameters`, `parameters()`). Yields the GraphedCalls (None when not
    enabled). Off CUDA the passes run eagerly through the same wrapper."""
    from .cuda_graphs import GraphedCalls
    unet = model.model.diffusion_model
    if not enabled:
        yield None
        return
    own_forward = unet.__dict__.get("forward")
    forward = unet.forward
    tapping = lambda: tap is not None and tap.active  # noqa: E731

    def pass_(*args, **kwargs):
        return tap.forward_to_features(forward, *args, **kwargs) if tapping() else forward(*args, **kwargs)

    graphed = GraphedCalls(pass_, state=lambda: (state(), tapping()), graded=graded, parameters=parameters,
                           graded_parameters=graded_parameters, interrupts=interrupted_types())

    def graphed_forward(*args, **kwargs):
        out = graphed(*args, **kwargs)
        if tapping():
            tap.deliver(out)
        return out
    unet.forward = graphed_forward
    try:
        yield graphed
    finally:
        if own_forward is None:
            del unet.forward
        else:
            unet.forward = own_forward
        graphed.graphs.clear()


class gradient_checkpointing:
    """Recompute each UNet block in backward (torch.utils.checkpoint, use_reentrant=False; ComfyUI's
    own `use_checkpoint` flag fails with frozen base weights). Restores the blocks on exit.
    `context_fn` (torch.utils.checkpoint's) restores state the recomputation depends on."""

    def __init__(self, model, enabled: bool = True, context_fn=None):
        self.model, self.enabled, self.saved, self.context_fn = model, enabled, [], context_fn

    def __enter__(self):
        if not self.enabled:
            return self
        import torch.utils.checkpoint as cp
        unet = self.model.model.diffusion_model
        blocks = list(getattr(unet, "input_blocks", [])) + [getattr(unet, "middle_block", None)] + list(getattr(unet, "output_blocks", []))
        for block in blocks:
            for layer in (block or []):
                original = layer.forward
                self.saved.append((layer, layer.__dict__.get("forward")))

                def checkpointed(*args, _f=original, **kwargs):
                    if torch.is_grad_enabled():
                        extra = {"context_fn": self.context_fn} if self.context_fn else {}
                        # preserve_rng_state off: the UNet draws no random numbers, and reading the CUDA
                        # RNG state is not allowed while a CUDA graph is captured
                        return cp.checkpoint(_f, *args, use_reentrant=False, preserve_rng_state=False, **extra, **kwargs)
                    return _f(*args, **kwargs)
                layer.forward = checkpointed
        return self

    def __exit__(self, *exc):
        for layer, own_forward in self.saved:
            if own_forward is None:
                del layer.forward  # back to the class's forward
            else:
                layer.forward = own_forward
        self.saved.clear()
        return False


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


def autotuned_convolutions():
    """cuDNN picks the fastest convolution algorithms for the (fixed) shapes of a long run, as
    ComfyUI's `--fast autotune` does, restored on exit; not under PyTorch's cudaMallocAsync allocator,
    where each search stalls (comfy_rapm/convolutions.py)."""
    from . import convolutions
    return convolutions.autotuned()


def interrupted_types() -> tuple[type, ...]:
    return (comfy.model_management.InterruptProcessingException, KeyboardInterrupt)


# --- the demo's pixel-space model --------------------------------------------------------

_PIXEL_FORMAT = {}


def pixel_latent_format():
    """RGB pixels in [-1, 1] as the 'latent': 3 channels, scale 1, no downscale."""
    if not _PIXEL_FORMAT:
        import comfy.latent_formats

        class PixelRGB(comfy.latent_formats.LatentFormat):
            latent_channels = 3
            latent_dimensions = 2
            scale_factor = 1.0
            spacial_downscale_ratio = 1
            latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]

            def process_in(self, latent):
                return latent

            def process_out(self, latent):
                return latent
        _PIXEL_FORMAT["class"] = PixelRGB
    return _PIXEL_FORMAT["class"]


def pixel_unet_model(unet_config: dict, state_dict: dict):
    """A ModelPatcher around an SD1.5-style EPS UNet that works in pixel space (the demo's
    emoji teacher): ComfyUI's own UNet class and SD discrete schedule, strict weight load."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    config = comfy.supported_models.SD15(dict(unet_config))
    config.unet_config["num_heads"] = unet_config.get("num_heads", -1)
    config.unet_config["num_head_channels"] = unet_config["num_head_channels"]
    config.latent_format = pixel_latent_format()()
    config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode(False):
        model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device="cpu")
        model.diffusion_model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())
