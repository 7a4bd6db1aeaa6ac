"""The LoRA's bypass form (module output + (α/r)·up(down(x))) equals the module with W + ΔW."""
import pytest
import torch
from torch import nn

from comfy_rapm.lora import LoRALayer


@pytest.mark.parametrize("module,x_shape", [
    (nn.Linear(12, 10), (3, 5, 12)),
    (nn.Conv2d(6, 8, 3, stride=2, padding=1), (2, 6, 9, 9)),
    (nn.Conv2d(6, 8, 3, padding=2, dilation=2), (2, 6, 7, 7)),
    (nn.Conv2d(6, 8, 1), (2, 6, 5, 5)),
    (nn.Conv1d(4, 5, 3, padding=1), (2, 4, 11)),
])
def test_bypass_output_equals_the_merged_weight(module, x_shape):
    g = torch.Generator().manual_seed(0)
    layer = LoRALayer(tuple(module.weight.shape), rank=3, alpha=2.0, generator=g)
    with torch.no_grad():
        layer.up.normal_(generator=g)
    x = torch.randn(x_shape, generator=g)
    merged = nn.Module.__new__(type(module))
    merged.__dict__ = dict(module.__dict__)
    merged._parameters = dict(module._parameters, weight=nn.Parameter(module.weight + layer.delta()))
    expected = merged(x)
    got = module(x) + layer.output_delta(module, x)
    assert (expected - module(x)).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


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
