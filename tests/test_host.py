"""The host module: gradients reach adapters and never base weights; the cached model stays as it was."""
import pytest
import torch

from headless import tiny_models
from comfy_rapm import conditioning, lora as lora_mod, training_unet


def _load_checkpoint_like_the_executor(host, tmp_path):
    import folder_paths
    d = tmp_path / "checkpoints"
    d.mkdir()
    tiny_models.make_sd15_checkpoint(str(d / "tiny.safetensors"))
    folder_paths.add_model_folder_path("checkpoints", str(d))
    with torch.inference_mode():  # every node runs like this: the loaded weights are inference tensors
        model, clip, _ = host.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]().load_checkpoint("tiny.safetensors")
        cond = host.NODE_CLASS_MAPPINGS["CLIPTextEncode"]().encode(clip, "a red apple")[0]
        uncond = host.NODE_CLASS_MAPPINGS["CLIPTextEncode"]().encode(clip, "")[0]
    return model, cond, uncond


def _denoise_once(model, pos, neg, x, sigma, cfg):
    from comfy_rapm import host as h
    return h.run_with_denoiser(model, pos, neg, x.shape, lambda d: d(x.to(d.device), sigma, cfg=cfg).detach().cpu())


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_gradients_reach_adapters_only_and_the_cached_model_is_unchanged(host, tmp_path, compute_dtype):
    """fp32 (the CPU default) and bf16 (the GPU default): during training the weights are ordinary frozen
    tensors in that dtype; afterwards the cached model is exactly as before."""
    from comfy_rapm import host as h
    model, pos, neg = _load_checkpoint_like_the_executor(host, tmp_path)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([3.0, 0.5])
    flags_before = [p.requires_grad for p in model.model.parameters()]
    with torch.inference_mode():
        before = _denoise_once(model, pos, neg, x, sigma, cfg=2.0)
        weights_before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}

    with torch.inference_mode(), torch.inference_mode(False):
        adapters = lora_mod.LoRA(h.weight_modules(model), rank=4, alpha=4, seed=0)
        for layer in adapters.layers:  # non-zero up, so the adapter changes the output
            torch.nn.init.normal_(layer.up, std=0.05)
        student = h.trainable_clone(model, compute_dtype)
        x_in = x.clone().requires_grad_(True)

        def step(d):
            with training_unet.training_weights(h.unet(student), compute_dtype), training_unet.lora_attached(h.module_root(student), adapters):
                out = d(x_in.to(d.device), sigma, cfg=2.0)
                out.square().mean().backward()
                adapters.set_enabled(False)
                with torch.no_grad():
                    teacher = d(x.to(d.device), sigma, cfg=2.0)
                adapters.set_enabled(True)
            with torch.no_grad():
                detached = d(x.to(d.device), sigma, cfg=2.0)  # hooks removed on exit: the teacher again
            return out.detach(), teacher, detached
        out, teacher_through_student, after_exit = h.run_with_denoiser(student, pos, neg, x.shape, step)

    assert all(layer.up.grad is not None and layer.up.grad.abs().sum() > 0 for layer in adapters.layers)
    assert x_in.grad is not None and x_in.grad.abs().sum() > 0  # flows through every frozen layer
    assert [n for n, p in model.model.named_parameters() if p.grad is not None] == []
    assert [p.requires_grad for p in model.model.parameters()] == flags_before  # not even flags touched
    assert (out - before).abs().max() > 1e-2  # the adapter is in the graph
    tol = 1e-5 if compute_dtype == torch.float32 else 3e-2 * before.abs().max().item()
    torch.testing.assert_close(teacher_through_student, before, rtol=tol, atol=tol)  # LoRA off = teacher
    torch.testing.assert_close(after_exit, teacher_through_student, rtol=0, atol=0)
    assert not any(m._forward_hooks for m in model.model.modules())

    with torch.inference_mode():
        after = _denoise_once(model, pos, neg, x, sigma, cfg=2.0)
        weights_after = model.model.diffusion_model.state_dict()
    assert torch.equal(after, before)
    assert weights_after.keys() == weights_before.keys()
    assert all(weights_after[k].dtype == v.dtype and torch.equal(weights_after[k], v) for k, v in weights_before.items())


def test_training_weights_replace_the_originals_instead_of_keeping_both(host):
    """The loader's weights wait on the CPU during training: with the model loaded by ComfyUI, as in a
    session, no original stays referenced on its device."""
    import gc
    import weakref
    from comfy_rapm import host as h
    model = tiny_models.make_model_patcher("sd15")
    pos, neg = tiny_models.make_conditioning("sd15", seed=1), tiny_models.make_conditioning("sd15", seed=2)
    unet = model.model.diffusion_model
    student = h.trainable_clone(model, torch.bfloat16)

    def body(d):
        originals = [weakref.ref(p) for p in unet.parameters()]
        with training_unet.training_weights(h.unet(student), torch.bfloat16):
            gc.collect()
            alive = [r for r in originals if r() is not None]
            dtypes = {p.dtype for p in unet.parameters()}
            frozen = not any(p.requires_grad for p in unet.parameters())
        return alive, dtypes, frozen
    with torch.inference_mode():
        alive, dtypes, frozen = h.run_with_denoiser(student, pos, neg, (1, 4, 8, 8), body)
    assert alive == [] and dtypes == {torch.bfloat16} and frozen
    assert {p.dtype for p in unet.parameters()} == {torch.float32}


def test_the_lora_in_bypass_form_equals_the_stock_loader_merging_its_file(host, tmp_path):
    """Training adds up(down(x)) to each target's output; the saved file, applied by ComfyUI's own LoRA
    loader (W + ΔW), must give the same model."""
    from comfy_rapm import host as h
    model, pos, neg = _load_checkpoint_like_the_executor(host, tmp_path)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([5.0, 0.7])
    with torch.inference_mode(False):
        adapters = lora_mod.LoRA(h.weight_modules(model), rank=4, alpha=2, seed=3)
        for layer in adapters.layers:
            torch.nn.init.normal_(layer.up, std=0.05)
        for kind in (".to_q", ".proj_in", ".in_layers.2"):  # linear, 1×1 conv, 3×3 conv (strided: test_lora_bypass)
            assert any(n.endswith(kind) for n in adapters.names), kind
        student = h.trainable_clone(model, torch.float32)

        def run(d):
            with training_unet.training_weights(h.unet(student), torch.float32), training_unet.lora_attached(h.module_root(student), adapters), torch.no_grad():
                return d(x.to(d.device), sigma, cfg=2.0).cpu()
        bypass = h.run_with_denoiser(student, pos, neg, x.shape, run)
    with torch.inference_mode():
        merged = _denoise_once(h.apply_lora(model, adapters.comfy_state_dict(torch.float32)), pos, neg, x, sigma, cfg=2.0)
        teacher = _denoise_once(model, pos, neg, x, sigma, cfg=2.0)
    assert (merged - teacher).abs().max() > 1e-2
    torch.testing.assert_close(bypass, merged, rtol=1e-4, atol=1e-4)  # fp32 rounding of two summation orders


def test_sdxl_style_conditioning_with_pooled_output_and_size(host):
    model = tiny_models.make_model_patcher("sdxl")
    a, b = tiny_models.make_conditioning("sdxl", seed=1), tiny_models.make_conditioning("sdxl", seed=2)
    stacked = conditioning.stack([a, b])
    assert stacked[0][0].shape[0] == 2 and stacked[0][1]["pooled_output"].shape == (2, 1280)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([2.0, 2.0])
    with torch.inference_mode():
        both = _denoise_once(model, stacked, conditioning.stack([b, b]), x, sigma, cfg=1.0)
        first = _denoise_once(model, a, b, x[:1], sigma[:1], cfg=1.0)
        second = _denoise_once(model, b, b, x[1:], sigma[1:], cfg=1.0)
        other_pool = [[a[0][0], dict(a[0][1], pooled_output=torch.zeros(1, 1280))]]
        changed = _denoise_once(model, other_pool, b, x[:1], sigma[:1], cfg=1.0)
        bigger = [[a[0][0], dict(a[0][1], width=512, height=768)]]
        resized = _denoise_once(model, bigger, b, x[:1], sigma[:1], cfg=1.0)
    torch.testing.assert_close(both[:1], first, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[1:], second, rtol=1e-4, atol=1e-5)
    assert (changed - first).abs().max() > 1e-5  # the pooled output reaches the model
    assert (resized - first).abs().max() > 1e-5  # so does the size conditioning


def test_the_teacher_fingerprint_ignores_a_lora_another_patcher_left_merged_in_the_shared_weights(host, tmp_path):
    """ComfyUI merges a LoRA into the weights every clone shares when that clone samples, and restores them
    only when another patcher loads: the fingerprint must still be the base model's (trajectory sets and
    LoRAs are matched to their teacher by it)."""
    from comfy_rapm import host as h
    model, pos, neg = _load_checkpoint_like_the_executor(host, tmp_path)
    before = h.unet_state_fingerprint(model)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        teacher_before = _denoise_once(model, pos, neg, x, torch.tensor([1.0]), 1.0)
    with torch.inference_mode(False):
        adapters = lora_mod.LoRA(h.weight_modules(model), rank=4, alpha=4, seed=0)
        for layer in adapters.layers:
            torch.nn.init.normal_(layer.up, std=0.05)
    with torch.inference_mode():
        _denoise_once(h.apply_lora(model, adapters.comfy_state_dict(torch.float32)), pos, neg, x, torch.tensor([1.0]), 1.0)
    assert model.backup, "the LoRA is not merged in place: this test no longer checks anything"
    assert h.unet_state_fingerprint(model) == before
    with torch.inference_mode():  # and sampling the base model again restores its weights (ComfyUI does that)
        torch.testing.assert_close(_denoise_once(model, pos, neg, x, torch.tensor([1.0]), 1.0), teacher_before)


def test_a_dynamic_patcher_trains_on_the_hosts_non_dynamic_delegate(host):
    """ComfyUI 0.33's ModelPatcherDynamic (comfy-aimdo) exists only on a GPU: on the CPU its constructor returns a
    plain ModelPatcher. A patcher of the host's class that reports itself dynamic, with the host's own delegate
    method, stands in for it: the student is a clone of the delegate, never of the dynamic patcher; a plain
    patcher is used as it is."""
    from comfy_rapm import host as h
    import comfy.model_patcher
    model = tiny_models.make_model_patcher("sd15")
    assert h.resident(model) is model
    delegates = []

    class Dynamic(comfy.model_patcher.ModelPatcher):
        def is_dynamic(self):
            return True

        def get_non_dynamic_delegate(self):
            delegates.append(comfy.model_patcher.ModelPatcher(self.model, self.load_device, self.offload_device))
            return delegates[-1]

    dynamic = Dynamic(model.model, model.load_device, model.offload_device)
    student = h.trainable_clone(dynamic, torch.float32)
    assert len(delegates) == 1 and student.parent is delegates[0] and not isinstance(student, Dynamic)

    class NoDelegate(Dynamic):
        get_non_dynamic_delegate = None
    with pytest.raises(RuntimeError, match="--disable-dynamic-vram"):
        h.trainable_clone(NoDelegate(model.model, model.load_device, model.offload_device), torch.float32)
