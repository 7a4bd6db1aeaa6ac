"""RAPMSampler and the host denoiser on the real ComfyUI host, with tiny random models."""
import pytest
import torch

from headless import tiny_models
from stock_nodes import call  # noqa: E402


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _sampler_custom(host, model, positive, negative, latent, seed, cfg, timesteps):
    from comfy_extras.nodes_custom_sampler import SamplerCustom, KSamplerSelect
    sigmas = model.get_model_object("model_sampling").sigmas[timesteps].clone()
    sampler = call(KSamplerSelect, "euler")[0]
    return call(SamplerCustom, model, True, seed, cfg, positive, negative, sampler, sigmas, latent)[0]["samples"]


def _rapm(host, model, positive, negative, latent, seed, steps, cfg):
    node = host.NODE_CLASS_MAPPINGS["RAPMSampler"]()
    return node.sample(model, positive, negative, latent, seed, steps, cfg)[0]["samples"]


@pytest.mark.parametrize("kind", ["sd15", "v", "sdxl", "flow"])
def test_rapm_sampler_equals_sampler_custom_euler_on_trailing_sigmas(host, kind):
    model = tiny_models.make_model_patcher(kind)
    positive = tiny_models.make_conditioning(kind, seed=1)
    negative = tiny_models.make_conditioning(kind, seed=2)
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    with torch.inference_mode():
        ours = _rapm(host, model, positive, negative, latent, seed=7, steps=4, cfg=2.5)
        ref = _sampler_custom(host, model, positive, negative, latent, 7, 2.5, [999, 749, 499, 249, 0])
    assert torch.isfinite(ours).all()
    assert _rel(ours, ref) <= 1e-4
    # The comparison is sharp: a different schedule or seed is far off.
    with torch.inference_mode():
        other_grid = _sampler_custom(host, model, positive, negative, latent, 7, 2.5, [999, 750, 500, 250, 0])
        other_seed = _rapm(host, model, positive, negative, latent, seed=8, steps=4, cfg=2.5)
    assert _rel(other_grid, ref) > 1e-3
    assert _rel(other_seed, ref) > 1e-2


def test_rapm_sampler_through_the_real_checkpoint_loader_and_text_encoder(host, tmp_path):
    import folder_paths
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    tiny_models.make_sd15_checkpoint(str(ckpt_dir / "tiny.safetensors"))
    folder_paths.add_model_folder_path("checkpoints", str(ckpt_dir))
    with torch.inference_mode():
        model, clip, _ = host.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]().load_checkpoint("tiny.safetensors")
        encode = host.NODE_CLASS_MAPPINGS["CLIPTextEncode"]()
        positive = encode.encode(clip, "a cat, twitter style")[0]
        negative = encode.encode(clip, "")[0]
        latent = host.NODE_CLASS_MAPPINGS["EmptyLatentImage"]().generate(64, 64, 1)[0]
        ours = _rapm(host, model, positive, negative, latent, seed=3, steps=2, cfg=3.0)
        ref = _sampler_custom(host, model, positive, negative, latent, 3, 3.0, [999, 499, 0])
    assert _rel(ours, ref) <= 1e-4


def test_wrong_latent_channels_names_the_node_and_input(host):
    model = tiny_models.make_model_patcher("sd15")
    cond = tiny_models.make_conditioning("sd15")
    latent = {"samples": torch.randn(1, 16, 8, 8)}
    with pytest.raises(ValueError) as err, torch.inference_mode():
        _rapm(host, model, cond, cond, latent, 0, 4, 1.0)
    assert "RAPMSampler" in str(err.value) and "latent_image" in str(err.value) and "16" in str(err.value)


def test_progress_per_step_and_cancel_stops_sampling(host, every_progress_update):
    import comfy.model_management
    import comfy.utils
    model = tiny_models.make_model_patcher("sd15")
    cond = tiny_models.make_conditioning("sd15")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append((value, total))

    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with torch.inference_mode():
            _rapm(host, model, cond, cond, latent, 0, 4, 1.0)
        assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

        seen.clear()

        def cancel_at_two(value, total, preview, node_id=None):
            seen.append(value)
            if value == 2:
                comfy.model_management.interrupt_current_processing(True)
        comfy.utils.set_progress_bar_global_hook(cancel_at_two)
        with pytest.raises(comfy.model_management.InterruptProcessingException), torch.inference_mode():
            _rapm(host, model, cond, cond, latent, 0, 4, 1.0)
        assert max(seen) == 2
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(old)
