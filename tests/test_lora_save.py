"""LoRA Save: a file stock ComfyUI loaders apply with no warnings, equal to RAPMTrain's MODEL output;
and the whole pipeline through the real executor."""
import json
import logging
import os

import pytest
import torch

import rapm_fixtures
from headless import tiny_models
from stock_nodes import call  # noqa: E402


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def trained(host, tmp_path_factory):
    teacher = tiny_models.make_model_patcher("sd15", seed=4)
    tset = rapm_fixtures.make_trajectory_set(tmp_path_factory.mktemp("sets") / "s", teacher, count=2, steps=4, fine_steps=2)
    with torch.inference_mode():
        model, lora, loss = host.NODE_CLASS_MAPPINGS["RAPMTrain"]().train(
            teacher, tset, 4, lora_rank=4, lora_alpha=4.0, learning_rate=5e-3, discriminator_learning_rate=1e-3, delta=0,
            absolute_weight="1.0", huber_c=0.001, adversarial_weight=0.1, mode="rapm", seed=0, checkpoint_every=10,
            name="for_saving")
    return teacher, model, lora, loss


def _save(host, lora, prefix, key_format):
    import folder_paths
    out = host.NODE_CLASS_MAPPINGS["RAPMSaveLoRA"]().save(lora, prefix, key_format)
    name = out["result"][0]
    return name, os.path.join(folder_paths.get_folder_paths("loras")[0], name)


def _sample(host, model, steps=4, scheduler=None, sigmas=None):
    from comfy_extras.nodes_custom_sampler import KSamplerSelect, SamplerCustom
    cond = tiny_models.make_conditioning("sd15", seed=8)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with torch.inference_mode():
        if scheduler:
            return host.NODE_CLASS_MAPPINGS["KSampler"]().sample(model, 3, steps, 1.0, "euler", scheduler, cond, cond, latent)[0]["samples"]
        if sigmas is not None:
            euler = call(KSamplerSelect, "euler")[0]
            return call(SamplerCustom, model, True, 3, 1.0, cond, cond, euler, sigmas, latent)[0]["samples"]
        return host.NODE_CLASS_MAPPINGS["RAPMSampler"]().sample(model, cond, cond, latent, 3, steps, 1.0)[0]["samples"]


@pytest.mark.parametrize("key_format", ["comfyui", "kohya"])
def test_saved_file_applies_with_stock_loader_like_the_trained_model(host, trained, key_format):
    from safetensors import safe_open
    teacher, model, lora, _ = trained
    assert any(float(v.abs().sum()) > 0 for k, v in lora.items() if "lora_up" in k)  # trained, not the zero init
    name, path = _save(host, lora, f"rapm_test/student_{key_format}", key_format)
    assert os.path.isfile(path) and name.startswith("rapm_test")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_steps"] == "4" and meta["ss_output_name"]
    assert meta["modelspec.architecture"] == "SD15/lora"
    assert json.loads(meta["rapm.timesteps"]) == [999, 749, 499, 249, 0] and meta["rapm.delta"] == "20"
    assert json.loads(meta["rapm.recommended_sampler"])["scheduler"] == "simple"
    assert all(k.startswith("lora_unet_" if key_format == "kohya" else "diffusion_model.") for k in keys)

    ms = teacher.get_model_object("model_sampling")
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        with torch.inference_mode():
            stock, = host.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]().load_lora_model_only(teacher, name, 1.0)
    finally:
        logging.getLogger().removeHandler(handler)
    assert not [r for r in records if "lora key not loaded" in r.getMessage()]
    # RAPMSampler on RAPMTrain's MODEL == stock loader + SamplerCustom(euler) on the paper's trailing sigmas
    ours = _sample(host, model)
    assert _rel(_sample(host, stock, sigmas=ms.sigmas[[999, 749, 499, 249, 0]].clone()), ours) <= 1e-4
    assert _rel(_sample(host, stock), ours) <= 1e-4
    # stock KSampler (euler, simple, N steps, cfg 1) runs the same trailing timesteps, ending at σ=0
    ksampler = _sample(host, stock, scheduler="simple")
    sigmas_to_zero = torch.cat([ms.sigmas[[999, 749, 499, 249]], torch.zeros(1)])
    assert _rel(ksampler, _sample(host, model, sigmas=sigmas_to_zero)) <= 1e-4
    assert _rel(ksampler, ours) < 0.1  # differs only by the last σ(index 0)→0 remainder
    assert _rel(_sample(host, teacher), ours) > 1e-3  # the LoRA matters


def test_files_are_never_overwritten_a_resave_keeps_its_file_and_names_stay_in_the_lora_folder(host, trained):
    from comfy_rapm.lora import LoRAWeights
    _, _, lora, _ = trained
    first, first_path = _save(host, lora, "rapm_test/same", "comfyui")
    written = os.path.getmtime(first_path), os.path.getsize(first_path)
    again, _ = _save(host, lora, "rapm_test/same", "comfyui")  # an unchanged re-queue: no copy
    assert again == first and (os.path.getmtime(first_path), os.path.getsize(first_path)) == written
    assert _save(host, lora, "rapm_test/same", "kohya")[0] != first  # another format is another file
    key = next(k for k in lora if k.endswith("lora_up.weight"))
    changed = LoRAWeights({k: (v + 1 if k == key else v) for k, v in lora.items()}, lora.metadata)
    second, _ = _save(host, changed, "rapm_test/same", "comfyui")
    assert second not in (first, again) and os.path.getmtime(first_path) == written[0]  # never overwritten
    assert _save(host, changed, "rapm_test/same", "comfyui")[0] == second
    for bad in ("../outside", "/abs/path", "a/../../b"):
        with pytest.raises(ValueError, match="RAPMSaveLoRA: input 'filename_prefix'"):
            _save(host, lora, bad, "comfyui")


def test_lora_model_and_loss_map_work_with_the_stock_training_nodes(host, trained, tmp_path):
    from comfy_extras.nodes_train import LoraModelLoader, LossGraphNode, SaveLoRA
    teacher, model, lora, loss = trained
    assert len(loss["loss"]) == 2 and all(isinstance(v, float) for v in loss["loss"])
    with torch.inference_mode():
        loaded = call(LoraModelLoader, teacher, lora, 1.0)[0]
    assert _rel(_sample(host, loaded), _sample(host, model)) <= 1e-6
    call(SaveLoRA, lora, "rapm_test/stock_saved")
    call(LossGraphNode, loss, "rapm_test_loss")  # no subfolder: 0.3.52's node does not create one


def test_trajectories_train_save_and_stock_lora_loader_through_the_executor(host, tmp_path, capsys):
    """Two graphs, as a user would run them: distill and save, then sample with stock nodes."""
    from headless import run
    import folder_paths
    saved_out = folder_paths.get_output_directory()
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    tiny_models.make_sd15_checkpoint(str(models / "checkpoints" / "e2e.safetensors"))
    out = tmp_path / "out"
    distill = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "e2e.safetensors"}},
        "2": {"class_type": "RAPMTeacherTrajectory", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "prompts": "a red apple\na blue car", "negative_prompt": "",
            "width": 64, "height": 64, "count": 2, "steps": 2, "fine_steps": 2, "cfg": 3.0, "seed": 0, "batch_size": 2,
            "name": "e2e"}},
        "3": {"class_type": "RAPMTrain", "inputs": {
            "model": ["1", 0], "trajectories": ["2", 0], "iterations": 2, "lora_rank": 2, "lora_alpha": 2.0,
            "learning_rate": 1e-3, "discriminator_learning_rate": 1e-3, "delta": 0, "absolute_weight": "1.0",
            "huber_c": 0.001, "adversarial_weight": 0.1, "mode": "rapm", "seed": 0, "checkpoint_every": 10, "name": "e2e"}},
        "4": {"class_type": "RAPMSaveLoRA", "inputs": {"lora": ["3", 1], "filename_prefix": "e2e_student", "key_format": "comfyui"}},
    }
    (tmp_path / "distill.json").write_text(json.dumps(distill))
    lora_dir = folder_paths.get_folder_paths("loras")[0]
    try:
        assert run.main([str(tmp_path / "distill.json"), "--models", str(models), "--output-directory", str(out), "--quiet"]) == 0
        saved = [f for f in os.listdir(lora_dir) if f.startswith("e2e_student")]
        assert saved
        sample = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "e2e.safetensors"}},
            "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": saved[0],
                                                         "strength_model": 1.0, "strength_clip": 1.0}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a red apple"}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 1, "steps": 2, "cfg": 1.0,
                                                       "sampler_name": "euler", "scheduler": "simple", "positive": ["3", 0],
                                                       "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
            "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
            "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "e2e_student"}},
        }
        (tmp_path / "sample.json").write_text(json.dumps(sample))
        assert run.main([str(tmp_path / "sample.json"), "--models", str(models), "--output-directory", str(out), "--quiet"]) == 0
        assert [f for f in os.listdir(out) if f.startswith("e2e_student") and f.endswith(".png")]
        assert (out / "rapm_trajectories" / "e2e" / "manifest.json").is_file()
        assert (out / "rapm_runs" / "e2e" / "checkpoint.safetensors").is_file()
    finally:
        folder_paths.set_output_directory(saved_out)
