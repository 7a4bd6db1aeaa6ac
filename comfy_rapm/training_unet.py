"""The shared UNet rewired for a training session, in one place and for the session's length only.

Teacher, student and discriminator backbone are one UNet in memory. For a training session it gets:
  - its weights as frozen ordinary tensors in the training dtype (the loader's are inference tensors, which
    autograd cannot save; the originals wait on the CPU and come back exactly) — `training_weights`;
  - the student's LoRA as forward hooks on its target layers, adding only while the LoRA is on — `lora_attached`;
  - cuDNN autotuning for the run's fixed shapes — `autotuned_convolutions`;
  - CUDA graphs for its fixed-shape passes, the tapped backbone passes included — `graphed_unet`;
  - gradient checkpointing of every block (torch.utils.checkpoint; ComfyUI's own flag fails with frozen base
    weights) — `gradient_checkpointing`;
and `FeatureTap` runs it as the discriminator backbone, stopping at the last tapped layer.

`rewired` applies all of it as one context. Everything here works on the torch modules ComfyUI builds
(`model.model`, its `diffusion_model` with input/middle/output blocks) and imports nothing of ComfyUI; host.py
hands the modules over (host.unet, host.feature_layers)."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from . import convolutions
from .cuda_graphs import GraphedCalls


@contextlib.contextmanager
def training_weights(unet: nn.Module, dtype: torch.dtype):
    """While inside: the UNet's parameters are frozen ordinary tensors in `dtype`; casting the loader's on
    every use would cost a copy per layer per pass and a saved copy per graded pass. The originals wait on the
    CPU and are put back exactly on exit."""
    slots = [(module, name) for module in unet.modules() for name, p in module._parameters.items() if p is not None]
    saved = []
    try:
        for module, name in slots:  # one parameter at a time, so no original outlives its replacement
            p = module._parameters[name]
            saved.append((module, name, p.detach().to("cpu", copy=True), p.requires_grad, p.device))
            with torch.inference_mode(False):
                module._parameters[name] = nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False)
            del p
        yield
    finally:
        with torch.inference_mode():
            for module, name, original, flag, device in saved:
                module._parameters[name] = nn.Parameter(original.to(device, copy=True), requires_grad=flag)


@contextlib.contextmanager
def lora_attached(root: nn.Module, lora):
    """While inside: every LoRA target module of `root` (named as in a LoRA file, `diffusion_model.…`) adds its
    layer's output while the LoRA is enabled (forward hooks on the shared modules, removed on exit)."""
    modules = dict(root.named_modules())
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


def autotuned_convolutions():
    """cuDNN picks the fastest convolution algorithms for the (fixed) shapes of a long run, as ComfyUI's
    `--fast autotune` does, restored on exit; not under PyTorch's cudaMallocAsync allocator, where each search
    stalls (comfy_rapm/convolutions.py)."""
    return convolutions.autotuned()


class _FeaturesCaptured(Exception):
    pass


class FeatureTap:
    """Runs the model as the discriminator backbone and returns the tapped feature maps; the pass stops at the
    last tap, so an SDXL-style down+mid backbone skips the up path.

    Eagerly, hooks on the tapped layers collect the features and the last one stops the pass by raising through
    the host's sampling code. Under `graphed_unet` the diffusion model's forward itself returns the features
    (`forward_to_features`, captured in a graph) and hands them over (`deliver`), which stops the pass the same
    way."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers
        self.active = False  # while a tapped pass runs
        self._captured: dict = {}
        self._delivered = None

    def __call__(self, denoiser: Callable, x: torch.Tensor, sigma: torch.Tensor, conds) -> list[torch.Tensor]:
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
        """The diffusion model's `forward` as far as the last tap (while __call__'s hooks are on), returning the
        tapped features."""
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
def graphed_unet(unet: nn.Module, enabled: bool, state: Callable[[], object], tap: FeatureTap | None = None,
                 graded: bool = False, parameters: Callable[[], nn.Module | None] = lambda: None,
                 graded_parameters: bool = True, interrupts: tuple[type, ...] = ()):
    """While inside: the diffusion model's passes on CUDA replay CUDA graphs (see cuda_graphs.py), tapped
    backbone passes included; with `graded`, also the passes with grad (their gradients reach the inputs and,
    with `graded_parameters`, `parameters()`). Yields the GraphedCalls (None when not enabled). Off CUDA the
    passes run eagerly through the same wrapper."""
    if not enabled:
        yield None
        return
    own_forward = unet.__dict__.get("forward")
    forward = unet.forward
    tapping = lambda: tap is not None and tap.active  # noqa: E731

    def pass_(*args, **kwargs):
        return tap.forward_to_features(forward, *args, **kwargs) if tapping() else forward(*args, **kwargs)

    graphed = GraphedCalls(pass_, state=lambda: (state(), tapping()), graded=graded, parameters=parameters,
                           graded_parameters=graded_parameters, interrupts=interrupts)

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
    """Recompute each UNet block in backward (torch.utils.checkpoint, use_reentrant=False; ComfyUI's own
    `use_checkpoint` flag fails with frozen base weights). Restores the blocks on exit. `context_fn`
    (torch.utils.checkpoint's) restores state the recomputation depends on.

    An exception inside a block (a CUDA graph capture that runs out of memory, the host's Cancel) is raised only
    after torch.utils.checkpoint has finished the block's frame. Before pytorch#184018 (torch 2.11 included) an
    exception raised through checkpoint left the frame's saved-tensor hooks pushed for as long as the exception's
    traceback lived: every tensor saved meanwhile, the next blocks' inputs too, was filed under the failed block,
    and backward failed recomputing it ("A different number of tensors was saved during the original forward and
    recomputation"), e.g. after GraphedCalls' eager retry of a failed graded capture."""

    def __init__(self, unet: nn.Module, enabled: bool = True, context_fn=None):
        self.unet, self.enabled, self.saved, self.context_fn = unet, enabled, [], context_fn

    def __enter__(self):
        if not self.enabled:
            return self
        import torch.utils.checkpoint as cp
        unet = self.unet
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
                        failed, first = [], [True]

                        def forward(*a, **k):
                            if not first[0]:
                                return _f(*a, **k)  # the recomputation in backward: its errors are backward's
                            first[0] = False
                            try:
                                return _f(*a, **k)
                            except BaseException as error:  # re-raised once checkpoint has closed its frame
                                failed.append(error)
                        out = cp.checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **extra, **kwargs)
                        if failed:
                            raise failed.pop()  # pop: no reference cycle keeps the failed pass's tensors
                        return out
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


@contextlib.contextmanager
def rewired(root: nn.Module, unet: nn.Module, dtype: torch.dtype, lora, tap: FeatureTap | None, config,
            student_graphs: bool, interrupts: tuple[type, ...] = ()):
    """The whole rewiring for a session with `config` (a settings.Config), undone on exit; `student_graphs`: the
    passes with grad into the LoRA are graphed too. Yields the GraphedCalls (None without CUDA graphs); set its
    `enabled` to False for a pass that must not be graphed."""
    with training_weights(unet, dtype), lora_attached(root, lora), autotuned_convolutions(), \
            graphed_unet(unet, config.uses_cuda_graphs, lambda: lora.enabled, tap, config.uses_graded_graphs,
                         lambda: lora if lora.enabled else None, student_graphs, interrupts) as graphs, \
            gradient_checkpointing(unet, config.gradient_checkpointing, lora.recompute_context):
        try:
            yield graphs
        finally:
            # a gradient may live in a graph's memory pool: the LoRA outlives the session, its pools must not
            lora.zero_grad(set_to_none=True)
