"""The discriminators' optimizer updates exactly as torch's AdamW with β₁ = 0, without its first-moment buffer."""
import pytest
import torch

from comfy_rapm.optim import AdamWNoMomentum


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_same_updates_as_adamw_with_beta1_zero(weight_decay):
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 4, 3, 3), (8,), (1, 8, 1, 1)]
    a = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    initial = [p.detach().clone() for p in a]
    ours = AdamWNoMomentum(a, lr=1e-2, beta2=0.999, weight_decay=weight_decay)
    theirs = torch.optim.AdamW(b, lr=1e-2, betas=(0.0, 0.999), weight_decay=weight_decay)
    for step in range(6):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, q, grad in zip(a, b, grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        if step == 3:
            a[1].grad = b[1].grad = None  # a parameter without a gradient this step is left alone by both
        ours.step()
        theirs.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert all(set(ours.state[p]) == {"step", "exp_avg_sq"} for p in a)  # no first moment kept
    assert all((p - p0).abs().max() > 1e-3 for p, p0 in zip(a, initial))  # the updates were not no-ops


def test_state_round_trips_through_state_dict():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdamWNoMomentum([p], lr=0.1)
    p.grad = torch.tensor([1.0, -2.0, 0.5])
    opt.step()
    other = AdamWNoMomentum([torch.nn.Parameter(p.detach().clone())], lr=0.1)
    other.load_state_dict(opt.state_dict())
    state = other.state_dict()["state"][0]
    assert float(state["step"]) == 1 and torch.equal(state["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
