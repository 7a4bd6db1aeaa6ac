"""bench/server_perf.py's CPU miniature (issue #17, item 2): the SD1.5 example workflow queued over HTTP on the real
server (main.py --base-directory … --cpu), its trajectory and training rates read off the websocket."""
import json
import math

import pytest

pytestmark = pytest.mark.server


def test_the_real_server_reports_trajectories_per_minute_and_seconds_per_iteration(tmp_path):
    from bench import server_perf
    out = tmp_path / "server_perf.json"
    # (4 iterations: ComfyUI's LossGraphNode divides by the range of the losses, which one student step does not have)
    assert server_perf.main(["--model", "tiny", "--cpu", "--count", "2", "--iterations", "4", "--skip-iterations", "1",
                             "--set", "2.batch_size=1", "--work", str(tmp_path / "base"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["server_args"][:2] == ["--base-directory", str((tmp_path / "base").resolve())]  # paths, --cpu, nothing else
    traj, train = report["nodes"]["RAPMTeacherTrajectory"], report["nodes"]["RAPMTrain"]
    # read from /ws: the nodes' progress messages and their binary progress_text lines
    assert traj["last_value"] == traj["max"] == 2 and train["last_value"] == train["max"] == 4
    assert traj["text_messages"] >= 2 and train["text_messages"] >= 2 and report["messages"]["progress_text"] >= 4
    assert train["last_text"].startswith("4/4 it") and train["shown_unit"] == "it" and traj["shown_unit"] == "traj"
    for value in report["user"].values():
        assert value is not None and math.isfinite(value) and value > 0
    assert "perf" not in report  # perf.py beside it runs on CUDA only (its tiny model is not this checkpoint's)
    import shutil  # GPU memory is sampled where nvidia-smi is (the GPU machine), and said to be absent elsewhere
    assert (report["device_memory_peak_gib"] is None) == (shutil.which("nvidia-smi") is None)
    assert "device_memory_peak_gib" in train


def test_the_checkpoint_is_written_with_the_host_the_server_runs(tmp_path):
    # a device machine has no .comfyui/: the writer must boot the --comfyui host, not fall back to the repository's
    from bench import server_perf
    from headless.comfy_host import HostNotFound
    with pytest.raises(HostNotFound, match="not a ComfyUI folder"):
        server_perf.write_checkpoint("tiny", tmp_path / "x.safetensors", comfyui=str(tmp_path))


def test_the_stand_ins_cover_what_comfyui_0_33_imports_at_start_up(tmp_path, monkeypatch):
    import subprocess
    import sys
    from bench import server_perf
    monkeypatch.setattr(server_perf, "_importable", lambda name: False)
    assert server_perf.stubs(tmp_path) == ["av", "comfyui_frontend_package"]
    # 0.33.0's comfy_api/latest/_input_impl/video_types.py: submodules, and enum members read into a dict at import
    code = ("import av; from av.codec import Codec; from av.container import InputContainer; "
            "from av.subtitles.stream import SubtitleStream; from av.video.reformatter import ColorTrc\n"
            "names = {ColorTrc.BT709: 'sRGB', ColorTrc.SMPTE2084: 'HDR PQ'}; assert len(names) == 2\n"
            "try:\n    InputContainer()\nexcept RuntimeError as e:\n    print('refused:', e)\n")
    res = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("refused: a stand-in of a package missing")


def test_the_sdxl_checkpoint_has_the_keys_comfyui_detects_as_sdxl_and_loads_its_text_encoders_from():
    # the full-size layout on the meta device (nothing allocated); the GPU run loads the written file for real
    import torch
    from bench import perf
    from headless import tiny_models
    unet, vae, clip = tiny_models.sdxl_checkpoint_shapes(perf.UNET["sdxl"])
    import comfy.model_detection
    import comfy.sdxl_clip
    import comfy.supported_models as sm
    meta = {"model.diffusion_model." + k: torch.empty(v, device="meta") for k, v in unet.items()}
    detected = comfy.model_detection.model_config_from_unet(meta, "model.diffusion_model.")
    assert type(detected) is sm.SDXL  # not SSD1B, not the refiner
    assert sum(math.prod(v) for v in unet.values()) > 2.5e9
    assert "taesd_decoder.1.weight" in vae and "vae_scale" in vae
    # ComfyUI's loader maps the checkpoint's keys onto SDXLClipModel's: every key it needs, at its shape
    with torch.device("meta"):
        wanted = comfy.sdxl_clip.SDXLClipModel(device="meta").state_dict()
    loaded = detected.process_clip_state_dict({k: torch.empty(v, device="meta") for k, v in clip.items()})
    unused_by_sdxl = {"clip_l.logit_scale", "clip_l.transformer.text_projection.weight"}  # real checkpoints lack them too
    assert set(wanted) - set(loaded) == unused_by_sdxl
    assert all(tuple(loaded[k].shape) == tuple(v.shape) for k, v in wanted.items() if k in loaded)
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.31.") for k in clip)  # open_clip layout


def test_device_memory_peaks_are_taken_within_each_window():
    from bench import server_perf
    memory = server_perf.DeviceMemory()
    memory.samples = [(1.0, 3.0), (2.0, 9.5), (3.0, 4.0), (4.0, 12.0)]
    assert memory.peak() == 12.0
    assert memory.peak(1.5, 3.5) == 9.5 and memory.peak(2.5, None) == 12.0 and memory.peak(None, 1.0) == 3.0
    assert memory.peak(5.0, 6.0) is None
