"""training_unet.gradient_checkpointing when a block raises: the next passes' backward must not depend on it.

On an H200 (torch 2.11) a graded CUDA graph capture that failed inside a checkpointed block (out of memory, four
runs on one card), retried eagerly by GraphedCalls, ended the run in backward with "A different number of tensors
was saved during the original forward and recomputation. Number of tensors saved during forward: 96 …
recomputation: 16": torch.utils.checkpoint before pytorch#184018 leaves a block's saved-tensor hooks pushed when
the block raises, for as long as the exception's traceback lives, so the retry's saved tensors (the next blocks'
inputs among them) were filed under the failed block. The torch here has that fix; `torch_checkpoint` also runs
each test under torch 2.11's checkpoint, emulated."""
import pytest
import torch
import torch.utils.checkpoint as cp
from torch import nn

from comfy_rapm import training_unet


def _checkpoint_before_pytorch_184018(function, args, kwargs, *, use_reentrant=None, **options):
    """torch.utils.checkpoint.checkpoint(use_reentrant=False) as torch 2.11 runs it: an exception in `function` is not
    thrown into the generator, which stays suspended inside its `with _checkpoint_hook(frame)`."""
    assert use_reentrant is False
    gen = cp._checkpoint_without_reentrant_generator_impl(function, args, kwargs, **options)
    next(gen)
    ret = function(*args, **kwargs)
    try:
        next(gen)
    except StopIteration:
        return ret


@pytest.fixture(params=["this torch", "torch 2.11"])
def torch_checkpoint(request, monkeypatch):
    if request.param == "torch 2.11":
        if not (hasattr(cp, "_checkpoint_impl") and hasattr(cp, "_checkpoint_without_reentrant_generator_impl")):
            pytest.skip("this torch's checkpoint is laid out otherwise (a torch before the fix runs as 'this torch')")
        monkeypatch.setattr(cp, "_checkpoint_impl", _checkpoint_before_pytorch_184018)
    return request.param


class _OutOfMemory(RuntimeError):
    pass


class ToyUNet(nn.Module):
    """input/middle/output blocks of small layers, as gradient_checkpointing finds them in ComfyUI's UNet; with
    `fail_in` set, that layer raises (a capture running out of memory inside a block)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        layer = lambda: nn.Sequential(nn.Linear(8, 8), nn.GELU())  # noqa: E731
        self.input_blocks = nn.ModuleList([nn.Sequential(layer(), layer()) for _ in range(3)])
        self.middle_block = nn.Sequential(layer(), layer())
        self.output_blocks = nn.ModuleList([nn.Sequential(layer()) for _ in range(3)])
        self.requires_grad_(False)  # frozen base weights, as in training
        self.fail_in = None
        self.input_blocks[1][0][1].register_forward_hook(self._maybe_fail)

    def _maybe_fail(self, module, args, output):
        if self.fail_in is module:
            raise _OutOfMemory("CUDA out of memory (stand-in)")

    def forward(self, x):
        for block in list(self.input_blocks) + [self.middle_block] + list(self.output_blocks):
            for layer in block:
                x = layer(x)
        return (x * x).sum()


def _input():
    return torch.linspace(-1, 1, 16).reshape(2, 8).requires_grad_()


def _clean_gradient(unet):
    x = _input()
    with training_unet.gradient_checkpointing(unet):
        unet(x).backward()
    return x.grad


def _failing_pass(unet, x):
    unet.fail_in = unet.input_blocks[1][0][1]
    try:
        unet(x.detach().clone().requires_grad_())
    finally:
        unet.fail_in = None


def test_a_pass_retried_while_a_failed_blocks_exception_is_handled_backpropagates_as_a_clean_one(torch_checkpoint):
    """What GraphedCalls did after a failed graded capture: the eager retry inside the `except`."""
    unet = ToyUNet()
    expected = _clean_gradient(unet)
    x = _input()
    with training_unet.gradient_checkpointing(unet):
        try:
            _failing_pass(unet, x)
        except _OutOfMemory:
            loss = unet(x)
        loss.backward()
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


def test_a_failed_blocks_exception_kept_alive_does_not_capture_later_passes(torch_checkpoint):
    """The same with the exception kept (a log record, a traceback in a cycle) while training goes on."""
    unet = ToyUNet()
    expected = _clean_gradient(unet)
    kept = []
    with training_unet.gradient_checkpointing(unet):
        try:
            _failing_pass(unet, _input())
        except _OutOfMemory as error:
            kept.append(error)
        for _ in range(2):
            x = _input()
            unet(x).backward()
            torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)
    assert "out of memory" in str(kept[0])


def test_the_blocks_exception_reaches_the_caller_unchanged(torch_checkpoint):
    unet = ToyUNet()
    with training_unet.gradient_checkpointing(unet), pytest.raises(_OutOfMemory, match="stand-in"):
        _failing_pass(unet, _input())
