"""The tiny random-weight models load and run through ComfyUI's own loaders, nodes and samplers."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from headless import tiny_models  # noqa: E402


@pytest.fixture(scope="module")
def comfy_nodes():
    """ComfyUI in-process on CPU (idempotent: shares the boot with conftest's `host`)."""
    from headless.comfy_host import boot
    return boot(cpu=True)


@pytest.fixture(scope="module")
def checkpoint_dir(comfy_nodes, tmp_path_factory):
    import folder_paths
    root = tmp_path_factory.mktemp("tiny_models")
    files = tiny_models.make_sd15_demo_files(str(root))
    assert files == {"checkpoint": "rapm_tiny_sd15.safetensors"}
    folder_paths.add_model_folder_path("checkpoints", str(root / "checkpoints"))
    return root / "checkpoints"


def _finite(t):
    import torch
    return bool(torch.isfinite(t).all())


def test_checkpoint_is_sd15_and_runs_a_graph(comfy_nodes, checkpoint_dir):
    import torch
    import comfy.latent_formats
    import comfy.supported_models

    nodes = comfy_nodes
    with torch.inference_mode():  # as the executor runs every node
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint("rapm_tiny_sd15.safetensors")
        assert type(model.model.model_config) is comfy.supported_models.SD15
        assert isinstance(model.model.latent_format, comfy.latent_formats.SD15)
        assert vae.latent_channels == 4 and vae.downscale_ratio == 8

        (cond,) = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")
        (neg,) = nodes.CLIPTextEncode().encode(clip, "")
        assert cond[0][0].shape == (1, 77, 768) and _finite(cond[0][0])
        assert cond[0][1]["pooled_output"].shape == (1, 768) and _finite(cond[0][1]["pooled_output"])
        assert not torch.allclose(cond[0][0], neg[0][0])

        x = torch.randn(1, 4, 8, 8)
        denoised = model.model.apply_model(x, torch.tensor([2.0]), c_crossattn=cond[0][0])
        assert denoised.shape == x.shape and _finite(denoised)
        assert (denoised - x).abs().mean() > 1e-2  # the UNet is not a no-op

        (latent,) = nodes.EmptyLatentImage().generate(64, 64, 1)
        (sampled,) = nodes.KSampler().sample(model, 1, 2, 7.0, "euler", "simple", cond, neg, latent)
        assert sampled["samples"].shape == (1, 4, 8, 8) and _finite(sampled["samples"])

        (image,) = nodes.VAEDecode().decode(vae, sampled)
        assert image.shape == (1, 64, 64, 3) and _finite(image)
        assert image.std() > 0

        (encoded,) = nodes.VAEEncode().encode(vae, image)
        assert encoded["samples"].shape == (1, 4, 8, 8) and _finite(encoded["samples"])


def test_checkpoint_is_deterministic(comfy_nodes, checkpoint_dir, tmp_path):
    from safetensors import safe_open

    again = tiny_models.make_sd15_checkpoint(str(tmp_path / "again.safetensors"), seed=0)
    names = ["model.diffusion_model.input_blocks.0.0.weight",
             "first_stage_model.taesd_decoder.1.weight",
             "cond_stage_model.transformer.text_model.final_layer_norm.bias"]
    with safe_open(str(checkpoint_dir / "rapm_tiny_sd15.safetensors"), "pt") as a, safe_open(again, "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for name in names:
            assert a.get_tensor(name).equal(b.get_tensor(name))


@pytest.mark.parametrize("kind,sampling", [("sd15", "EPS"), ("v", "V_PREDICTION"),
                                           ("sdxl", "EPS"), ("flow", "CONST")])
def test_model_patcher_kinds(comfy_nodes, kind, sampling):
    import torch
    import comfy.model_sampling

    patcher = tiny_models.make_model_patcher(kind, seed=0)
    model = patcher.model
    assert isinstance(model.model_sampling, getattr(comfy.model_sampling, sampling))
    if kind == "flow":
        assert isinstance(model.model_sampling, comfy.model_sampling.ModelSamplingDiscreteFlow)
    else:
        assert isinstance(model.model_sampling, comfy.model_sampling.ModelSamplingDiscrete)
    params = list(model.diffusion_model.parameters())
    assert sum(p.numel() for p in params) < 5_000_000
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" and not p.is_inference() for p in params)

    same = tiny_models.make_model_patcher(kind, seed=0).model.diffusion_model.state_dict()
    other = tiny_models.make_model_patcher(kind, seed=1).model.diffusion_model.state_dict()
    mine = model.diffusion_model.state_dict()
    assert all(mine[k].equal(same[k]) for k in mine)
    assert not all(mine[k].equal(other[k]) for k in mine)

    conditioning = tiny_models.make_conditioning(kind, batch=2, seed=0)
    cond, extra = conditioning[0]
    assert cond.shape == (2, 77, tiny_models.CONTEXT_DIM[kind])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 0.9]) if kind == "flow" else torch.tensor([1.0, 5.0])
    inputs = model.extra_conds(noise=x, device=torch.device("cpu"), cross_attn=cond, **extra)
    kwargs = {k: v.cond for k, v in inputs.items()}
    if kind == "sdxl":
        assert kwargs["y"].shape == (2, 2816)
    with torch.inference_mode():
        out = model.apply_model(x, sigma, **kwargs)
    assert out.shape == x.shape and _finite(out)
    assert (out - x).abs().mean() > 1e-2


@pytest.mark.parametrize("kind", tiny_models.KINDS)
def test_model_patcher_samples_with_ksampler(comfy_nodes, kind):
    import torch

    nodes = comfy_nodes
    patcher = tiny_models.make_model_patcher(kind)
    positive = tiny_models.make_conditioning(kind, seed=1)
    negative = tiny_models.make_conditioning(kind, seed=2)
    with torch.inference_mode():
        (latent,) = nodes.EmptyLatentImage().generate(128, 128, 1)
        (out,) = nodes.KSampler().sample(patcher, 0, 2, 3.0, "euler", "simple", positive, negative, latent)
    assert out["samples"].shape == (1, 4, 16, 16) and _finite(out["samples"])


def test_sdxl_conditioning_has_size_entries():
    cond, extra = tiny_models.make_conditioning("sdxl", batch=3, seed=0)[0]
    assert cond.shape == (3, 77, 2048) and extra["pooled_output"].shape == (3, 1280)
    for key in ("width", "height", "crop_w", "crop_h", "target_width", "target_height"):
        assert isinstance(extra[key], int)
