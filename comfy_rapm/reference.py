"""RAPM's Alg. 2 as the paper writes it, slot by slot and eager: the readable specification the fast path in
trainer.py is held against (no batching across slots, no shared no-grad chain, no memory tricks). It uses the
trainer's public pieces (a DDIM step of teacher or student, the backbone's features, the heads, the losses) and
none of its scheduling, so tests/test_reference_equivalence.py and bench/perf.py check that the product's
batched iteration computes the same losses and gradients; bench/perf.py also times it as the baseline."""
from __future__ import annotations

import torch

from comfy_rapm import losses


def reference_backward(tr, draws, student_turn: bool) -> dict:
    """Alg. 2 lines 5-16 for one iteration, then backward into the side whose turn it is."""
    cfg, d = tr.config, tr.discriminators
    positions = tr.data.positions[draws.index].to(tr.device, torch.float32)
    cond = tr.data.conditioning(draws.index)
    noise = draws.noise.to(tr.device)
    if student_turn:
        tr.student_opt.zero_grad(set_to_none=True)
        if d is not None:
            d.requires_grad_(False)
    else:
        tr.disc_opt.zero_grad(set_to_none=True)
    loss = torch.zeros((), device=tr.device)
    z = positions[0:1]                                                       # z_N = z̃_N
    for j in range(tr.steps):                                                # n = N-1 … 0
        s0, s1, sd = tr.s_from[j:j + 1], tr.s_to[j:j + 1], tr.s_delta[j:j + 1]
        z_tilde_next, z_tilde = positions[j:j + 1], positions[j + 1:j + 2]
        with torch.no_grad():
            z_delta = tr.ddim_step(z_tilde_next, s0, sd, cond, tr.data.cfg, student=False)   # teacher Δ-step
            z_hat = tr.ddim_step(z_delta, sd, s1, cond, 1.0, student=True).detach()          # 1st detach
        with torch.set_grad_enabled(student_turn):
            z_phi = tr.ddim_step(z, s0, s1, cond, 1.0, student=True)
        w = tr.weights[j]
        if student_turn:
            if cfg.uses_relative:
                loss = loss + losses.pseudo_huber(z_phi, z_hat, cfg.huber_c).sum()
            if cfg.uses_absolute:
                loss = loss + w * losses.pseudo_huber(z_phi, z_tilde, cfg.huber_c).sum()
        if cfg.uses_gan:
            s_adv, n = tr.adversarial_sigmas(draws.t_adv[j:j + 1]), noise[j:j + 1]
            if student_turn:
                f = tr.backbone_features(z_phi, s_adv, s1, n, cond)
                g = torch.zeros((), device=tr.device)
                if cfg.uses_relative:
                    g = g + losses.hinge_generator(d.relative(f)).sum()
                if cfg.uses_absolute:
                    g = g + w * losses.hinge_generator(d.absolute(f)).sum()
                loss = loss + cfg.adversarial_weight * g
            else:
                with torch.no_grad():
                    fake = tr.backbone_features(z_phi.detach(), s_adv, s1, n, cond)
                    real_rel = tr.backbone_features(z_hat, s_adv, s1, n, cond) if cfg.uses_relative else None
                    real_abs = tr.backbone_features(z_tilde, s_adv, s1, n, cond) if cfg.uses_absolute else None
                if cfg.uses_relative:
                    loss = loss + losses.hinge_discriminator(d.relative(fake), d.relative(real_rel)).sum()
                if cfg.uses_absolute:
                    loss = loss + w * losses.hinge_discriminator(d.absolute(fake), d.absolute(real_abs)).sum()
        z = z_phi.detach()                                                   # 2nd detach
    loss.backward()
    tr.lora.set_enabled(True)
    if d is not None:
        d.requires_grad_(True)
    return {"loss": loss.item()}


def compare_with_product(tr, student_turn: bool) -> dict:
    """One iteration's losses and gradients from the product (tr.backward) and from the reference on the
    same random draws: {"product_loss", "reference_loss", "reference_grad_norm", "grad_rel_diff"}."""
    draws = tr.draw()
    params = list(tr.lora.parameters()) if student_turn else list(tr.discriminators.parameters())

    def grads():
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten() for p in params])
    product = tr.backward(draws, student_turn)
    g_product = grads()
    reference = reference_backward(tr, draws, student_turn)
    g_reference = grads()
    return {"product_loss": product["loss"] if student_turn else product["discriminator"],
            "reference_loss": reference["loss"], "reference_grad_norm": float(g_reference.norm()),
            "grad_rel_diff": float((g_product - g_reference).norm() / g_reference.norm())}
