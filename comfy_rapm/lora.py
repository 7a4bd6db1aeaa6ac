"""The student's LoRA: created over the frozen teacher, switched on for student passes and off for
teacher and discriminator-backbone passes (one UNet in memory), saved in keys ComfyUI's stock
LoRA loaders apply.

A layer runs in bypass form: the target module's output gets (α/r)·up(down(x)) added, which equals
running the module with W + (α/r)·up·down without materializing that sum in every forward pass, or
its full-size gradient in every backward pass."""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

# PCM's targets (diffusers names) in ComfyUI's UNet naming: attention q/k/v/out, proj_in/out,
# feed-forward, resnet convs (in/out/skip), time_emb_proj, down/up-sample convs.
DEFAULT_TARGETS = (
    r"\.attn[12]\.to_(q|k|v)$", r"\.attn[12]\.to_out\.0$", r"\.ff\.net\.0\.proj$", r"\.ff\.net\.2$",
    r"\.proj_(in|out)$", r"\.in_layers\.2$", r"\.out_layers\.3$", r"\.skip_connection$", r"\.emb_layers\.1$",
    r"_blocks\.\d+\.0\.op$", r"output_blocks\.\d+\.\d+\.conv$",
)


def select_targets(modules: dict[str, tuple], patterns=DEFAULT_TARGETS) -> list[str]:
    compiled = [re.compile(p) for p in patterns]
    return sorted(n for n, (shape, _) in modules.items()
                  if len(shape) >= 2 and any(p.search(n) for p in compiled))


class LoRALayer(nn.Module):
    def __init__(self, weight_shape: tuple[int, ...], rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        out_features, in_features = weight_shape[0], weight_shape[1]
        kernel = tuple(weight_shape[2:])
        rank = min(rank, out_features, in_features * math.prod(kernel))
        self.rank, self.alpha, self.weight_shape = rank, float(alpha), tuple(weight_shape)
        down = torch.empty((rank, in_features) + kernel)
        bound = 1.0 / math.sqrt(in_features * math.prod(kernel))  # kaiming-uniform with a=sqrt(5), as peft
        down.uniform_(-bound, bound, generator=generator)
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(torch.zeros((out_features, rank) + (1,) * len(kernel)))
        self._cached_key, self._cached = None, None

    def delta(self) -> torch.Tensor:
        """ΔW = (α/r)·up·down, the merged form (the weight a LoRA loader adds)."""
        return (self.up.flatten(1) @ self.down.flatten(1)).reshape(self.weight_shape) * (self.alpha / self.rank)

    def _factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """down and (α/r)·up in the compute dtype; without grad, cached until the parameters change
        (most passes of an iteration are no-grad; this saves two casts and a scale per layer and pass).
        A CUDA graph being captured must read the parameters themselves, which the optimizer updates in place."""
        if torch.is_grad_enabled() or (self.down.is_cuda and torch.cuda.is_current_stream_capturing()):
            return self.down.to(dtype), self.up.to(dtype) * (self.alpha / self.rank)
        key = (dtype, self.down.device, self.down._version, self.up._version)
        if self._cached_key != key:
            self._cached = (self.down.detach().to(dtype), self.up.detach().to(dtype) * (self.alpha / self.rank))
            self._cached_key = key
        return self._cached

    def output_delta(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What ΔW adds to `module`'s output for input x (a Linear or ConvNd with groups 1)."""
        down, up = self._factors(x.dtype)
        if down.ndim == 2:
            return F.linear(F.linear(x, down), up)
        return self._conv(down.ndim)(self._down(module, x, down), up)

    def add_to_output(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """`module`'s output for input x with ΔW's part added. Without grad, the up projection is
        accumulated into `output` in place by one matrix multiply (no separate add; for convolutions a
        batched matrix multiply instead of a 1×1 convolution): a batch-1 pass is bound by its number of kernels."""
        if torch.is_grad_enabled() or not output.is_contiguous() or output.dtype != x.dtype:
            return output + self.output_delta(module, x)
        down, up = self._factors(x.dtype)
        if down.ndim == 2:
            h = F.linear(x, down)
            output.view(-1, output.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up.t())
            return output
        h = self._down(module, x, down)
        n, rank = h.shape[0], h.shape[1]
        up = up.reshape(up.shape[0], rank)
        output.view(n, up.shape[0], -1).baddbmm_(up.expand(n, -1, -1), h.reshape(n, rank, -1))
        return output

    @staticmethod
    def _conv(ndim: int):
        return {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[ndim]

    def _down(self, module: nn.Module, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        return self._conv(down.ndim)(x, down, None, module.stride, module.padding, module.dilation)


class LoRA(nn.Module):
    """All student LoRA layers, keyed by module name in the diffusion model (`diffusion_model.…`)."""

    def __init__(self, modules: dict[str, tuple], rank: int = 64, alpha: float = 8.0,
                 targets=DEFAULT_TARGETS, seed: int = 0):
        super().__init__()
        names = select_targets(modules, targets)
        if not names:
            raise ValueError("no LoRA target layers found in this model")
        g = torch.Generator().manual_seed(seed)
        self.names = names
        self.layers = nn.ModuleList(LoRALayer(modules[n][0], rank, alpha, g) for n in names)
        self.rank, self.alpha = rank, float(alpha)
        self.enabled = True

    def by_module(self) -> dict[str, LoRALayer]:
        return dict(zip(self.names, self.layers))

    def set_enabled(self, enabled: bool) -> "LoRA":
        self.enabled = enabled
        return self

    def recompute_context(self):
        """For gradient checkpointing: the (forward, recompute) contexts that make a block's
        recomputation in backward see the LoRA switched as it was in the forward pass."""
        import contextlib
        state = self.enabled

        @contextlib.contextmanager
        def as_in_forward():
            saved = self.enabled
            self.enabled = state
            try:
                yield
            finally:
                self.enabled = saved
        return contextlib.nullcontext(), as_in_forward()

    def comfy_state_dict(self, dtype=torch.float16) -> dict[str, torch.Tensor]:
        """Keys ComfyUI's own trainer writes and every stock loader applies:
        `diffusion_model.<module>.lora_up.weight / .lora_down.weight / .alpha`."""
        out = {}
        for name, layer in zip(self.names, self.layers):
            out[f"{name}.lora_up.weight"] = layer.up.detach().to(dtype).contiguous()
            out[f"{name}.lora_down.weight"] = layer.down.detach().to(dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(layer.alpha)
        return out



def kohya_state_dict(comfy_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`diffusion_model.a.b.c.lora_up.weight` → `lora_unet_a_b_c.lora_up.weight` (kohya / A1111 form)."""
    out = {}
    for key, value in comfy_state.items():
        for suffix in (".lora_up.weight", ".lora_down.weight", ".alpha"):
            if key.endswith(suffix):
                module = key[: -len(suffix)].removeprefix("diffusion_model.")
                out["lora_unet_" + module.replace(".", "_") + suffix] = value
    return out


class LoRAWeights(dict):
    """A LORA_MODEL (a plain dict of tensors, as ComfyUI's stock nodes expect) that also carries
    what RAPM knows about it (teacher, schedule, settings) for the file's metadata."""

    def __init__(self, tensors: dict, metadata: dict | None = None):
        super().__init__(tensors)
        self.metadata = dict(metadata or {})
