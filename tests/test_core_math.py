"""Core DDIM math against an independent reference: diffusers' DDIMScheduler (trailing spacing,
set_alpha_to_one=False) on the SD1.5 scaled-linear schedule, with a fixed analytic model."""
import math

import pytest
import torch

from comfy_rapm import schedule, solver


def test_trailing_timesteps():
    assert schedule.trailing_timesteps(1) == [999, 0]
    assert schedule.trailing_timesteps(2) == [999, 499, 0]
    assert schedule.trailing_timesteps(4) == [999, 749, 499, 249, 0]
    assert schedule.trailing_timesteps(8) == [999, 874, 749, 624, 499, 374, 249, 124, 0]


def test_trailing_matches_diffusers():
    from diffusers import DDIMScheduler
    for n in (1, 2, 4, 8, 100):
        s = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)
        s.set_timesteps(n)
        assert schedule.trailing_timesteps(n)[:-1] == s.timesteps.tolist()


def test_slot_timesteps_tile_the_fine_grid():
    slots = schedule.slot_timesteps(4, 25)
    assert [s[0] for s in slots] == [999, 749, 499, 249]
    assert [s[-1] for s in slots] == [749, 499, 249, 0]
    assert all(len(s) == 26 for s in slots)
    assert slots[-1][-2:] == [9, 0]
    assert schedule.slot_timesteps(2, 3) == [[999, 832, 666, 499], [499, 332, 166, 0]]


def _model_sampling(kind):
    import comfy.model_sampling as ms
    if kind == "flow":
        bases = (ms.ModelSamplingDiscreteFlow, ms.CONST)
    else:
        bases = (ms.ModelSamplingDiscrete, ms.EPS if kind == "eps" else ms.V_PREDICTION)
    return type("MS", bases, {})(None)


def _analytic_model(z_vp, t):
    """A smooth, fixed, nonlinear function of the VP latent and the timestep (any prediction type)."""
    c = z_vp.shape[1]
    mix = torch.linspace(-0.6, 0.9, c * c, dtype=torch.float64).reshape(c, c)
    phase = torch.arange(c, dtype=torch.float64).reshape(1, c, 1, 1)
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1)
    return torch.tanh(torch.einsum("ij,bjhw->bihw", mix, z_vp.double()) + 0.4 * torch.cos(t / 137.0 + phase))


def _comfy_denoiser(model_sampling):
    """What ComfyUI does around a UNet: timestep from σ, input scaled to VP, denoised from the raw output."""
    def denoise(x, sigma):
        t = model_sampling.timestep(sigma)
        z_vp = model_sampling.calculate_input(sigma, x)
        raw = _analytic_model(z_vp, t).to(x.dtype)
        return model_sampling.calculate_denoised(sigma, raw, x)
    return denoise


def _diffusers_run(prediction_type, steps, z_start, keep_every=None):
    from diffusers import DDIMScheduler
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False,
                      prediction_type=prediction_type)
    s.set_timesteps(steps)
    z = z_start.clone()
    kept = []
    for i, t in enumerate(s.timesteps):
        z = s.step(_analytic_model(z, int(t)).float(), t, z).prev_sample
        if keep_every and (i + 1) % keep_every == 0:
            kept.append(z)
    return z, kept


def _ours(kind, steps, substeps, z_start, timestep_offset=0, step_fn=solver.ddim_step):
    ms = _model_sampling(kind)
    denoise = _comfy_denoiser(ms)
    slots = schedule.slot_timesteps(steps, substeps)
    x = schedule.from_vp(z_start, schedule.sigma_at(ms, slots[0][0]), ms)
    boundaries = []
    for slot in slots:
        sigmas = schedule.sigma_at(ms, [min(t + timestep_offset, 999) for t in slot])
        for i in range(len(sigmas) - 1):
            x = step_fn(denoise, x, sigmas[i], sigmas[i + 1])
        boundaries.append(schedule.to_vp(x, sigmas[-1], ms))
    return boundaries[-1], boundaries


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def z_start():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind,prediction_type", [("eps", "epsilon"), ("v", "v_prediction")])
def test_four_step_ddim_matches_diffusers(host, z_start, kind, prediction_type):
    ref, _ = _diffusers_run(prediction_type, 4, z_start)
    ours, _ = _ours(kind, 4, 1, z_start)
    assert _rel(ours, ref) <= 1e-5


@pytest.mark.parametrize("kind,prediction_type", [("eps", "epsilon"), ("v", "v_prediction")])
def test_hundred_step_slotted_ddim_matches_diffusers(host, z_start, kind, prediction_type):
    ref, ref_boundaries = _diffusers_run(prediction_type, 100, z_start, keep_every=25)
    ours, boundaries = _ours(kind, 4, 25, z_start)
    assert _rel(ours, ref) <= 1e-5
    for a, b in zip(boundaries, ref_boundaries):
        assert _rel(a, b) <= 1e-5


def test_an_off_by_one_timestep_or_a_sign_error_fails_the_tolerance(host, z_start):
    ref, _ = _diffusers_run("epsilon", 4, z_start)
    shifted, _ = _ours("eps", 4, 1, z_start, timestep_offset=1)
    assert _rel(shifted, ref) > 1e-4

    def wrong_sign(denoise, x, sigma, sigma_next):
        d = denoise(x, torch.as_tensor(sigma).expand(x.shape[0]))
        return d - (sigma_next / sigma) * (x - d)
    flipped, _ = _ours("eps", 4, 1, z_start, step_fn=wrong_sign)
    assert _rel(flipped, ref) > 1e-4


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_step_with_an_oracle_denoiser_lands_exactly_on_the_forward_process(host, kind):
    """If the denoiser returns the true x0, one DDIM step from x_σ = noise_scaling(σ, ε, x0)
    must land on noise_scaling(σ', ε, x0): the closed form of the deterministic step."""
    ms = _model_sampling(kind)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 4, 6, 6, generator=g)
    sigma, sigma_next = schedule.sigma_at(ms, [900, 500, 100]), schedule.sigma_at(ms, [700, 300, 0])
    x = ms.noise_scaling(sigma, eps, x0)
    out = solver.ddim_step(lambda _x, _s: x0, x, sigma, sigma_next)
    assert _rel(out, ms.noise_scaling(sigma_next, eps, x0)) <= 1e-6


def test_flow_step_is_the_closed_form_euler_step(host):
    ms = _model_sampling("flow")
    denoise = _comfy_denoiser(ms)
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(2))
    sigma, sigma_next = schedule.sigma_at(ms, 749), schedule.sigma_at(ms, 499)
    d = denoise(x, sigma.expand(2))
    euler = x + (sigma_next - sigma) * (x - d) / sigma
    assert _rel(solver.ddim_step(denoise, x, sigma, sigma_next), euler) <= 1e-6
    assert not schedule.is_variance_exploding(ms)
    assert torch.equal(schedule.to_vp(x, sigma, ms), x)


@pytest.mark.parametrize("t", [0, 249, 999])
def test_vp_conversion_matches_the_alphas_cumprod_of_diffusers(host, t):
    from diffusers import DDIMScheduler
    ms = _model_sampling("eps")
    alpha_bar = float(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod[t])
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    sigma = schedule.sigma_at(ms, t)
    z = schedule.to_vp(ms.noise_scaling(sigma, eps, x0), sigma, ms)
    assert _rel(z, math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * eps) <= 1e-5
    assert _rel(schedule.from_vp(z, sigma, ms), ms.noise_scaling(sigma, eps, x0)) <= 1e-6


def test_initial_latent_is_pure_noise_in_vp_space(host):
    ms = _model_sampling("eps")
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    sigma = schedule.sigma_at(ms, 999)
    x = schedule.initial_latent(ms, noise, sigma)
    assert _rel(schedule.to_vp(x, sigma, ms), noise) <= 1e-6


def test_default_delta():
    from comfy_rapm import presets
    assert presets.for_teacher(sdxl_like=False).delta_for(1000) == 20
    assert presets.for_teacher(sdxl_like=True).delta_for(1000) == 25
    assert presets.for_teacher(sdxl_like=False).delta_for(500) == 10  # scaled to a shorter schedule
