"""The LoRA's bypass form (module output + (α/r)·up(down(x))) equals the module with W + ΔW."""
import pytest
import torch
from torch import nn

from comfy_rapm.lora import LoRALayer


LAYERS = pytest.mark.parametrize("module,x_shape", [
    (nn.Linear(12, 10), (3, 5, 12)),
    (nn.Linear(12, 10), (4, 12)),
    (nn.Conv2d(6, 8, 3, stride=2, padding=1), (2, 6, 9, 9)),
    (nn.Conv2d(6, 8, 3, padding=2, dilation=2), (2, 6, 7, 7)),
    (nn.Conv2d(6, 8, 1), (1, 6, 5, 5)),
    (nn.Conv1d(4, 5, 3, padding=1), (2, 4, 11)),
])


def _adapter_and_input(module, x_shape, seed):
    """A LoRA layer for `module` whose up factor is not zero (a trained adapter), and an input."""
    g = torch.Generator().manual_seed(seed)
    layer = LoRALayer(tuple(module.weight.shape), rank=3, alpha=2.0, generator=g)
    with torch.no_grad():
        layer.up.normal_(generator=g)
    return layer, torch.randn(x_shape, generator=g)


@LAYERS
def test_bypass_output_equals_the_merged_weight(module, x_shape):
    layer, x = _adapter_and_input(module, x_shape, seed=0)
    merged = nn.Module.__new__(type(module))
    merged.__dict__ = dict(module.__dict__)
    merged._parameters = dict(module._parameters, weight=nn.Parameter(module.weight + layer.delta()))
    expected = merged(x)
    got = module(x) + layer.output_delta(module, x)
    assert (expected - module(x)).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@LAYERS
def test_the_in_place_no_grad_form_adds_the_same_as_the_graded_form(module, x_shape):
    layer, x = _adapter_and_input(module, x_shape, seed=2)
    expected = (module(x) + layer.output_delta(module, x)).detach()
    with torch.no_grad():
        output = module(x)
        got = layer.add_to_output(module, x, output)
        assert got is output  # accumulated in place: no separate add
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    graded = layer.add_to_output(module, x, module(x))  # with grad: a new tensor, gradients reach the factors
    graded.sum().backward()
    assert layer.up.grad is not None and layer.up.grad.abs().sum() > 0
    torch.testing.assert_close(graded.detach(), expected)


def test_an_output_in_another_dtype_than_the_input_gets_the_same_sum_out_of_place():
    module = nn.Linear(6, 5)
    layer, x = _adapter_and_input(module, (3, 6), seed=4)
    with torch.no_grad():
        output = module(x).double()
        got = layer.add_to_output(module, x, output)
        assert got is not output and got.dtype == torch.float64
        torch.testing.assert_close(got, output + layer.output_delta(module, x).double())


def test_a_channels_last_output_gets_the_same_sum_out_of_place():
    module = nn.Conv2d(6, 8, 3, padding=1).to(memory_format=torch.channels_last)
    layer, x = _adapter_and_input(module, (2, 6, 5, 5), seed=3)
    with torch.no_grad():
        x = x.to(memory_format=torch.channels_last)
        output = module(x)
        assert not output.is_contiguous()
        got = layer.add_to_output(module, x, output)
        assert got is not output
        torch.testing.assert_close(got, output + layer.output_delta(module, x))


def test_no_grad_passes_see_every_optimizer_step_despite_the_cached_factors():
    g = torch.Generator().manual_seed(1)
    module = nn.Conv2d(4, 6, 3, padding=1)
    layer = LoRALayer(tuple(module.weight.shape), rank=2, alpha=2.0, generator=g)
    x = torch.randn(1, 4, 5, 5, generator=g)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    seen = []
    for _ in range(3):
        with torch.no_grad():
            cached = layer.output_delta(module, x)
            assert layer.output_delta(module, x) is not cached  # a new output, from the same cached factors
        fresh = layer.output_delta(module, x)  # with grad: straight from the parameters
        torch.testing.assert_close(cached, fresh.detach())
        seen.append(cached)
        (fresh * torch.randn(fresh.shape, generator=g)).sum().backward()  # non-zero gradient even while up = 0
        opt.step()
        opt.zero_grad()
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])  # training moved the adapter, and the no-grad pass followed
