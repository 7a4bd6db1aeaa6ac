"""Teacher trajectories on the real host: exact against SamplerCustom, resumable, safe."""
import json
import os

import pytest
import torch

from headless import tiny_models
from comfy_rapm import schedule
from stock_nodes import call  # noqa: E402


@pytest.fixture(scope="module")
def teacher(host, tmp_path_factory):
    import folder_paths
    d = tmp_path_factory.mktemp("models") / "checkpoints"
    d.mkdir()
    tiny_models.make_sd15_checkpoint(str(d / "teacher.safetensors"), seed=0)
    tiny_models.make_sd15_checkpoint(str(d / "other.safetensors"), seed=1)
    folder_paths.add_model_folder_path("checkpoints", str(d))
    with torch.inference_mode():
        loader = host.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]()
        model, clip, vae = loader.load_checkpoint("teacher.safetensors")
        other, _, _ = loader.load_checkpoint("other.safetensors")
    return model, clip, other


def _generate(host, model, clip, name=None, **overrides):
    args = dict(prompts="a red apple\n# a comment\n\na blue car", negative_prompt="blurry", width=64, height=64,
                count=3, steps=2, fine_steps=3, cfg=3.0, seed=5, batch_size=2, name=name)
    args.update(overrides)
    with torch.inference_mode():
        return host.NODE_CLASS_MAPPINGS["RAPMTeacherTrajectory"]().generate(model, clip, **args)[0]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_positions_equal_sampler_custom_on_the_fine_trailing_grid(host, teacher):
    from comfy_extras.nodes_custom_sampler import KSamplerSelect, SamplerCustom
    model, clip, _ = teacher
    tset = _generate(host, model, clip, "exact")
    trajs = tset.load()
    assert [t.prompt for t in trajs] == ["a red apple", "a blue car", "a red apple"]
    assert [t.seed for t in trajs] == [5, 6, 7]
    assert tset.manifest["timesteps"] == [999, 499, 0]
    ms = model.get_model_object("model_sampling")
    fine = [999, 832, 666, 499, 332, 166, 0]
    euler = call(KSamplerSelect, "euler")[0]
    encode = host.NODE_CLASS_MAPPINGS["CLIPTextEncode"]()
    for traj in trajs:
        with torch.inference_mode():
            positive, negative = encode.encode(clip, traj.prompt)[0], encode.encode(clip, "blurry")[0]
        assert torch.equal(traj.positive[0][0], positive[0][0])  # stored exactly as the teacher saw it
        assert torch.equal(traj.positive[0][1]["pooled_output"], positive[0][1]["pooled_output"])
        assert torch.equal(traj.negative[0][0], negative[0][0])
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        for n, end in ((1, 4), (2, 7)):  # slot boundaries on the fine grid
            sigmas = ms.sigmas[fine[:end]].clone()
            with torch.inference_mode():
                ref = call(SamplerCustom, model, True, traj.seed, 3.0, positive, negative, euler, sigmas, latent)[0]["samples"]
            ours = model.model.process_latent_out(schedule.from_vp(traj.positions[n][None], sigmas[-1], ms))
            assert _rel(ours, ref) <= 1e-4, (traj.prompt, n)
        start = schedule.from_vp(traj.positions[0][None], ms.sigmas[999], ms)
        with torch.inference_mode():
            from comfy.sample import prepare_noise
            expected_noise = prepare_noise(torch.zeros(1, 4, 8, 8), traj.seed) * (1 + ms.sigmas[999] ** 2).sqrt()
        assert _rel(start, expected_noise) <= 1e-6


def test_an_interrupted_run_resumes_to_identical_files(host, teacher, monkeypatch):
    import comfy.model_management
    import comfy.utils
    model, clip, _ = teacher
    full = _generate(host, model, clip, "full", count=5)

    def cancel_after_first_batch(value, total, preview, node_id=None):
        if value >= 2:
            comfy.model_management.interrupt_current_processing(True)
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(cancel_after_first_batch)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _generate(host, model, clip, "resumed", count=5)
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(old)
    folder = full.folder.parent / "resumed"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors"] and not manifest["complete"]
    first_written = os.stat(folder / "shard-00000.safetensors").st_mtime_ns
    assert not [p for p in folder.iterdir() if p.suffix == ".tmp"]

    resumed = _generate(host, model, clip, "resumed", count=5)
    assert os.stat(folder / "shard-00000.safetensors").st_mtime_ns == first_written  # not recomputed
    assert resumed.manifest["complete"]
    for shard in full.manifest["shards"]:
        assert (full.folder / shard["file"]).read_bytes() == (folder / shard["file"]).read_bytes()
    assert resumed.manifest["shards"] == full.manifest["shards"]


def test_batch_size_auto_scales_with_the_latent_area(host, teacher):
    from comfy_rapm import trajectories
    assert trajectories.default_batch_size((4, 64, 64)) == 32  # SD1.5 at 512 px
    assert trajectories.default_batch_size((4, 128, 128)) == 8  # SDXL at 1024 px
    assert trajectories.default_batch_size((4, 96, 96)) == 14
    assert trajectories.default_batch_size((4, 8, 8)) == 32 and trajectories.default_batch_size((4, 512, 512)) == 1
    model, clip, _ = teacher
    tset = _generate(host, model, clip, "auto_batch", count=3, batch_size=0)  # 64 px: 8×8 latents
    assert tset.manifest["inputs"]["batch_size"] == 32 and len(tset.manifest["shards"]) == 1


@pytest.mark.parametrize("fail_at", [0, 1])
def test_out_of_memory_says_what_to_change_and_keeps_what_was_stored(host, teacher, monkeypatch, fail_at):
    import sys
    import comfy.model_management
    model, clip, _ = teacher
    node_session = sys.modules[host.NODE_CLASS_MAPPINGS["RAPMTeacherTrajectory"].__module__].session
    real, calls = node_session.trajectory_shard, []

    def out_of_memory(*args, **kw):
        calls.append(1)
        if len(calls) > fail_at:
            raise comfy.model_management.OOM_EXCEPTION("CUDA out of memory. Tried to allocate 4.00 GiB")
        return real(*args, **kw)
    monkeypatch.setattr(node_session, "trajectory_shard", out_of_memory)
    name = f"oom_{fail_at}"
    with pytest.raises(RuntimeError) as err:
        _generate(host, model, clip, name, count=5)
    message = str(err.value)
    assert message.startswith("RAPMTeacherTrajectory: out of GPU memory computing 2 trajectories at once. Fix: ")
    if fail_at:
        assert "2 trajectories are stored" in message and "rerun with batch_size 2 to resume" in message
        monkeypatch.setattr(node_session, "trajectory_shard", real)
        assert _generate(host, model, clip, name, count=5).manifest["complete"]  # the advice works
    else:
        assert "lower batch_size (e.g. 1)" in message and "nothing is stored in it yet" in message


def test_other_inputs_under_an_existing_name_are_refused(host, teacher):
    model, clip, _ = teacher
    _generate(host, model, clip, "taken", count=1)
    with pytest.raises(ValueError) as err:
        _generate(host, model, clip, "taken", count=1, cfg=4.5)
    assert "RAPMTeacherTrajectory" in str(err.value) and "'name'" in str(err.value) and "cfg: 3.0 → 4.5" in str(err.value)


@pytest.mark.parametrize("field,value", [("name", "../escape"), ("name", "a/b"), ("prompts_file", "../../etc/passwd")])
def test_names_cannot_escape_their_folders(host, teacher, field, value):
    model, clip, _ = teacher
    with pytest.raises(ValueError) as err:
        _generate(host, model, clip, **{"name": "ok_name", "count": 1, field: value})
    assert f"'{field}'" in str(err.value)


def test_prompts_file_from_the_input_folder(host, teacher):
    import folder_paths
    model, clip, _ = teacher
    with open(os.path.join(folder_paths.get_input_directory(), "my_prompts.txt"), "w") as f:
        f.write("# emoji\na green frog\n\na yellow star\n")
    tset = _generate(host, model, clip, "from_file", prompts="", count=2, prompts_file="my_prompts.txt")
    assert [t.prompt for t in tset.load()] == ["a green frog", "a yellow star"]


def test_load_node_and_incompatible_teachers_are_refused(host, teacher):
    from comfy_rapm import host as h
    model, clip, other = teacher
    made = _generate(host, model, clip, "loadable", count=1)
    loader = host.NODE_CLASS_MAPPINGS["RAPMLoadTrajectories"]
    assert "loadable" in loader.INPUT_TYPES()["required"]["name"][0]
    loaded = loader().load("loadable")[0]
    assert loaded.fingerprint() == made.fingerprint()
    loaded.check_compatible(h.model_info(model), "RAPMTrain")
    with pytest.raises(ValueError, match="teacher weights"):
        loaded.check_compatible(h.model_info(other), "RAPMTrain")
    with pytest.raises(ValueError, match="model type"):
        loaded.check_compatible(h.model_info(tiny_models.make_model_patcher("sdxl")), "RAPMTrain")
    with pytest.raises(ValueError, match="RAPMLoadTrajectories: input 'name'"):
        loader().load("missing_set")
