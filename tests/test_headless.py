"""headless/run.py: UI -> API conversion, --set, --print-api, errors, and real runs through
ComfyUI's own executor (in-process through main(), and once as a subprocess)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from headless import run  # noqa: E402


def link(lid, src, src_slot, dst, dst_slot, type_):
    return [lid, src, src_slot, dst, dst_slot, type_]


def inp(name, type_, link_id=None, widget=False):
    entry = {"name": name, "type": type_, "link": link_id}
    if widget:
        entry["widget"] = {"name": name}
    return entry


def out(name, type_, links):
    return {"name": name, "type": type_, "links": links}


def conversion_workflow():
    """Stock nodes around a KSampler: a seed control value, a Reroute, a PrimitiveNode, a Note,
    a bypassed LoRA loader, muted nodes, an upload combo, new-style widget input entries."""
    nodes = [
        {"id": 1, "type": "CheckpointLoaderSimple", "mode": 0, "inputs": [],
         "outputs": [out("MODEL", "MODEL", [10]), out("CLIP", "CLIP", [2, 3, 11]), out("VAE", "VAE", [9])],
         "widgets_values": ["model.safetensors"]},
        {"id": 2, "type": "CLIPTextEncode", "title": "Positive", "mode": 0,
         # new front end: every widget input is listed, with a "widget" key
         "inputs": [inp("text", "STRING", None, widget=True), inp("clip", "CLIP", 2)],
         "outputs": [out("CONDITIONING", "CONDITIONING", [5])], "widgets_values": ["a cat"]},
        {"id": 20, "type": "Reroute", "mode": 0, "inputs": [inp("", "*", 3)],
         "outputs": [out("", "CLIP", [4])]},
        {"id": 3, "type": "CLIPTextEncode", "title": "Negative", "mode": 0,
         "inputs": [inp("clip", "CLIP", 4)], "outputs": [out("CONDITIONING", "CONDITIONING", [6])],
         "widgets_values": ["ugly"]},
        {"id": 21, "type": "PrimitiveNode", "mode": 0, "inputs": [],
         "outputs": [{"name": "INT", "type": "INT", "links": [8], "widget": {"name": "width"}}],
         "widgets_values": [640, "fixed"]},
        {"id": 4, "type": "EmptyLatentImage", "mode": 0,
         "inputs": [inp("width", "INT", 8, widget=True)], "outputs": [out("LATENT", "LATENT", [7])],
         "widgets_values": [512, 384, 2]},
        {"id": 9, "type": "LoraLoader", "mode": 4,  # bypassed: MODEL passes through to the KSampler
         "inputs": [inp("model", "MODEL", 10), inp("clip", "CLIP", 11)],
         "outputs": [out("MODEL", "MODEL", [12]), out("CLIP", "CLIP", [])],
         "widgets_values": ["some_lora.safetensors", 1.0, 1.0]},
        {"id": 5, "type": "KSampler", "mode": 0,
         "inputs": [inp("model", "MODEL", 12), inp("positive", "CONDITIONING", 5),
                    inp("negative", "CONDITIONING", 6), inp("latent_image", "LATENT", 7)],
         "outputs": [out("LATENT", "LATENT", [13, 14])],
         "widgets_values": [42, "randomize", 20, 7.5, "euler", "normal", 1.0]},
        {"id": 6, "type": "VAEDecode", "mode": 0, "inputs": [inp("samples", "LATENT", 13), inp("vae", "VAE", 9)],
         "outputs": [out("IMAGE", "IMAGE", [15, 16])]},
        {"id": 7, "type": "SaveImage", "mode": 0, "inputs": [inp("images", "IMAGE", 15)], "outputs": [],
         "widgets_values": ["ComfyUI"]},
        {"id": 8, "type": "PreviewImage", "mode": 2, "inputs": [inp("images", "IMAGE", 16)], "outputs": []},
        {"id": 13, "type": "LatentUpscale", "mode": 2,  # muted: its consumer loses the input
         "inputs": [inp("samples", "LATENT", 14)], "outputs": [out("LATENT", "LATENT", [17])],
         "widgets_values": ["nearest-exact", 512, 512, "disabled"]},
        {"id": 12, "type": "SaveLatent", "mode": 0, "inputs": [inp("samples", "LATENT", 17)], "outputs": [],
         "widgets_values": ["latents/x"]},
        {"id": 10, "type": "Note", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["remember me"]},
        {"id": 14, "type": "KSamplerAdvanced", "mode": 0, "inputs": [], "outputs": [],
         "widgets_values": ["enable", 7, "fixed", 30, 8.0, "euler", "karras", 0, 10000, "disable"]},
        {"id": 15, "type": "LoadImage", "mode": 0, "inputs": [],
         "outputs": [out("IMAGE", "IMAGE", []), out("MASK", "MASK", [])],
         "widgets_values": ["example.png", "image"]},
    ]
    links = [
        link(2, 1, 1, 2, 1, "CLIP"), link(3, 1, 1, 20, 0, "CLIP"), link(4, 20, 0, 3, 0, "CLIP"),
        link(5, 2, 0, 5, 1, "CONDITIONING"), link(6, 3, 0, 5, 2, "CONDITIONING"),
        link(7, 4, 0, 5, 3, "LATENT"), link(8, 21, 0, 4, 0, "INT"), link(9, 1, 2, 6, 1, "VAE"),
        link(10, 1, 0, 9, 0, "MODEL"), link(11, 1, 1, 9, 1, "CLIP"), link(12, 9, 0, 5, 0, "MODEL"),
        link(13, 5, 0, 6, 0, "LATENT"), link(14, 5, 0, 13, 0, "LATENT"), link(15, 6, 0, 7, 0, "IMAGE"),
        link(16, 6, 0, 8, 0, "IMAGE"), link(17, 13, 0, 12, 0, "LATENT"),
    ]
    return {"last_node_id": 21, "last_link_id": 17, "nodes": nodes, "links": links, "version": 0.4}


def latent_workflow():
    """A runnable UI workflow of stock nodes that need no model: EmptyLatentImage (width from a
    PrimitiveNode) -> Reroute -> bypassed KSampler (passes its latent through) -> LatentUpscale ->
    SaveLatent, plus a muted SaveLatent and a Note."""
    nodes = [
        {"id": 1, "type": "EmptyLatentImage", "mode": 0, "inputs": [inp("width", "INT", 7, widget=True)],
         "outputs": [out("LATENT", "LATENT", [1])], "widgets_values": [64, 64, 1]},
        {"id": 7, "type": "PrimitiveNode", "mode": 0, "inputs": [],
         "outputs": [{"name": "INT", "type": "INT", "links": [7], "widget": {"name": "width"}}],
         "widgets_values": [96, "fixed"]},
        {"id": 2, "type": "Reroute", "mode": 0, "inputs": [inp("", "*", 1)], "outputs": [out("", "LATENT", [2])]},
        {"id": 3, "type": "KSampler", "mode": 4,
         "inputs": [inp("model", "MODEL"), inp("positive", "CONDITIONING"), inp("negative", "CONDITIONING"),
                    inp("latent_image", "LATENT", 2)],
         "outputs": [out("LATENT", "LATENT", [3])],
         "widgets_values": [5, "randomize", 20, 8, "euler", "normal", 1]},
        {"id": 4, "type": "LatentUpscale", "title": "Upscale", "mode": 0, "inputs": [inp("samples", "LATENT", 3)],
         "outputs": [out("LATENT", "LATENT", [4, 5])], "widgets_values": ["nearest-exact", 128, 64, "disabled"]},
        {"id": 5, "type": "SaveLatent", "mode": 0, "inputs": [inp("samples", "LATENT", 4)], "outputs": [],
         "widgets_values": ["latents/ui"]},
        {"id": 6, "type": "SaveLatent", "mode": 2, "inputs": [inp("samples", "LATENT", 5)], "outputs": [],
         "widgets_values": ["latents/muted"]},
        {"id": 8, "type": "Note", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["a note"]},
    ]
    links = [link(1, 1, 0, 2, 0, "LATENT"), link(2, 2, 0, 3, 3, "LATENT"), link(3, 3, 0, 4, 0, "LATENT"),
             link(4, 4, 0, 5, 0, "LATENT"), link(5, 4, 0, 6, 0, "LATENT"), link(7, 7, 0, 1, 0, "INT")]
    return {"nodes": nodes, "links": links, "version": 0.4}


API_GRAPH = {
    "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1},
          "_meta": {"title": "Start"}},
    "2": {"class_type": "LatentUpscale", "inputs": {"samples": ["1", 0], "upscale_method": "nearest-exact",
                                                    "width": 64, "height": 64, "crop": "disabled"}},
    "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "latents/api"}},
}


@pytest.fixture
def files(tmp_path):
    (tmp_path / "ui.json").write_text(json.dumps(latent_workflow()))
    (tmp_path / "api.json").write_text(json.dumps(API_GRAPH))
    return tmp_path


@pytest.fixture
def keep_folders(host):
    """main() points folder_paths at --output-directory; give the session's folders back after."""
    import folder_paths
    saved = folder_paths.get_output_directory()
    yield
    folder_paths.set_output_directory(saved)


def _main(capsys, *argv):
    code = run.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _latent_shape(path):
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return tuple(f.get_tensor("latent_tensor").shape)


# ------------------------------------------------------------------------------------------------
# conversion

def test_ui_to_api_maps_widgets_by_position_and_honours_ui_only_muted_bypassed(host):
    api = run.ui_to_api(conversion_workflow(), host.NODE_CLASS_MAPPINGS)
    # UI-only nodes, the muted nodes and the bypassed LoRA loader are gone
    assert sorted(api, key=int) == ["1", "2", "3", "4", "5", "6", "7", "12", "14", "15"]
    assert api["1"]["inputs"] == {"ckpt_name": "model.safetensors"}
    assert api["2"] == {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]},
                        "_meta": {"title": "Positive"}}
    assert api["3"]["inputs"] == {"text": "ugly", "clip": ["1", 1]}          # through the Reroute
    assert api["4"]["inputs"] == {"width": 640, "height": 384, "batch_size": 2}  # PrimitiveNode value
    assert api["4"]["_meta"]["title"] == "Empty Latent Image"                # default title = display name
    # seed control value ("randomize") dropped; bypassed LoraLoader passes the checkpoint's MODEL
    assert api["5"]["inputs"] == {"model": ["1", 0], "seed": 42, "steps": 20, "cfg": 7.5, "sampler_name": "euler",
                                  "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
                                  "latent_image": ["4", 0], "denoise": 1.0}
    assert api["6"]["inputs"] == {"samples": ["5", 0], "vae": ["1", 2]}
    assert api["7"]["inputs"] == {"images": ["6", 0], "filename_prefix": "ComfyUI"}
    assert api["12"]["inputs"] == {"filename_prefix": "latents/x"}           # its source is muted
    assert api["14"]["inputs"] == {"add_noise": "enable", "noise_seed": 7, "steps": 30, "cfg": 8.0,
                                   "sampler_name": "euler", "scheduler": "karras", "start_at_step": 0,
                                   "end_at_step": 10000, "return_with_leftover_noise": "disable"}
    assert api["15"]["inputs"] == {"image": "example.png"}                   # upload button value dropped


def test_bypass_passes_first_input_of_matching_type_and_notes_dropped_inputs(host):
    api, notes = run.convert_ui(latent_workflow(), host.NODE_CLASS_MAPPINGS)
    assert sorted(api) == ["1", "4", "5"]
    # the bypassed KSampler's output slot 0 (LATENT) maps to its latent_image input (index 3)
    assert api["4"]["inputs"]["samples"] == ["1", 0]
    assert api["1"]["inputs"]["width"] == 96
    _, notes = run.convert_ui(conversion_workflow(), host.NODE_CLASS_MAPPINGS)
    assert any("node 12" in n and "'samples'" in n and "muted" in n for n in notes)


def test_conversion_errors_are_one_line(host):
    wf = latent_workflow()
    wf["nodes"][0]["type"] = "EmptyLatentImageX"
    with pytest.raises(run.WorkflowError, match="node 1 .*EmptyLatentImageX.*close: EmptyLatentImage"):
        run.ui_to_api(wf, host.NODE_CLASS_MAPPINGS)
    wf = latent_workflow()
    wf["definitions"] = {"subgraphs": [{"id": "abc-123", "name": "My group"}]}
    wf["nodes"][-1]["type"] = "abc-123"
    with pytest.raises(run.WorkflowError, match="subgraph"):
        run.ui_to_api(wf, host.NODE_CLASS_MAPPINGS)


# ------------------------------------------------------------------------------------------------
# the CLI in-process: --print-api, --set, errors

def test_print_api_on_ui_and_api_files_with_set_by_title_and_id(host, files, keep_folders, capsys):
    code, stdout, err = _main(capsys, files / "ui.json", "--print-api", "--set", "Upscale.width=256",
                              "--set", "5.filename_prefix=latents/renamed", "--set", "1.batch_size=3")
    assert code == 0, err
    api = json.loads(stdout)
    assert api["4"]["inputs"]["width"] == 256
    assert api["5"]["inputs"]["filename_prefix"] == "latents/renamed"   # not JSON: kept as a string
    assert api["1"]["inputs"]["batch_size"] == 3                       # JSON: an int
    assert not list((files).glob("**/*.latent"))                       # a dry run

    code, stdout, err = _main(capsys, files / "api.json", "--print-api", "--set", "Start.height=128")
    assert code == 0, err
    api = json.loads(stdout)
    assert api["1"]["inputs"] == {"width": 64, "height": 128, "batch_size": 1}
    assert api["3"]["inputs"]["samples"] == ["2", 0]


def test_set_unknown_node_or_input_is_a_clear_error(host, files, keep_folders, capsys):
    code, stdout, err = _main(capsys, files / "ui.json", "--print-api", "--set", "Upscal.width=256")
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1
    assert "'Upscal'" in err and "'Upscale'" in err
    code, stdout, err = _main(capsys, files / "ui.json", "--print-api", "--set", "4.widht=256")
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "no input 'widht'" in err and "'width'" in err
    code, _, err = _main(capsys, files / "ui.json", "--set", "nonsense")
    assert code == 2 and "NODE.INPUT=VALUE" in err


def test_invalid_input_value_names_node_and_input(host, files, keep_folders, capsys):
    code, stdout, err = _main(capsys, files / "api.json", "--output-directory", files / "out",
                              "--set", "1.width=3", "--quiet")
    assert code == 1
    assert "node 1 'Start' (EmptyLatentImage), input 'width'" in err and "smaller than min" in err
    assert "Traceback" not in err
    code, stdout, err = _main(capsys, files / "api.json", "--output-directory", files / "out",
                              "--set", "2.upscale_method=bilinar", "--quiet")
    assert code == 1
    assert "input 'upscale_method'" in err and "did you mean 'bilinear'" in err
    assert not (files / "out" / "latents").exists()


def test_runs_ui_workflow_in_process(host, files, keep_folders, capsys):
    code, stdout, err = _main(capsys, files / "ui.json", "--output-directory", files / "out")
    assert code == 0, err
    saved = files / "out" / "latents" / "ui_00001_.latent"
    assert saved.is_file() and str(saved) in stdout
    assert not (files / "out" / "latents" / "muted_00001_.latent").exists()
    assert _latent_shape(saved) == (1, 4, 8, 16)  # LatentUpscale 128x64 of a latent 96 wide
    assert "[3/3]" in err and "done in" in stdout


def test_ctrl_c_interrupts_the_running_node_which_writes_its_checkpoint(host, files, keep_folders, capsys):
    import comfy.model_management
    import comfy.utils

    class SlowCheckpointingNode:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"steps": ("INT", {"default": 8, "min": 1}), "checkpoint": ("STRING", {})}}
        RETURN_TYPES = ()
        FUNCTION = "run"
        OUTPUT_NODE = True

        def run(self, steps, checkpoint):
            pbar = comfy.utils.ProgressBar(steps)
            done = 0
            try:
                for i in range(steps):
                    if i == 3:
                        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
                    # what real nodes do each step (samplers, this pack's): the host's interrupt check, which
                    # does not depend on how often the host passes progress to its hook (0.33: ≤ every 0.1 s)
                    comfy.model_management.throw_exception_if_processing_interrupted()
                    time.sleep(0.15)
                    pbar.update(1)
                    done += 1
            except comfy.model_management.InterruptProcessingException:
                Path(checkpoint).write_text(f"stopped after {done} steps")
                raise
            return {}

    host.NODE_CLASS_MAPPINGS["HeadlessTestSlowNode"] = SlowCheckpointingNode
    try:
        ckpt = files / "ckpt.txt"
        graph = {"1": {"class_type": "HeadlessTestSlowNode", "inputs": {"steps": 8, "checkpoint": str(ckpt)}}}
        (files / "slow.json").write_text(json.dumps(graph))
        code, stdout, err = _main(capsys, files / "slow.json", "--output-directory", files / "out")
    finally:
        del host.NODE_CLASS_MAPPINGS["HeadlessTestSlowNode"]
    assert code == 130
    assert ckpt.read_text() == "stopped after 3 steps"
    assert "cancelling" in err and "cancelled during node 1" in err
    assert "2/8" in err  # the progress bar (periodic lines when not a TTY)
    assert signal.getsignal(signal.SIGINT) is not None and not comfy.model_management.processing_interrupted()


# ------------------------------------------------------------------------------------------------
# the CLI as a process

def _cli(*argv, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "headless" / "run.py"), *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))


def test_malformed_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": [ {"id": 1, ')
    proc = _cli(bad)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _cli(tmp_path / "missing.json")
    assert proc.returncode == 2 and "cannot read" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "list.json").write_text("[1, 2]")
    proc = _cli(tmp_path / "list.json")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0


def test_cli_runs_stock_graph_end_to_end(files):
    out = files / "cli_out"
    proc = _cli(files / "api.json", "--output-directory", out, "--set", "Start.batch_size=2", "--cpu")
    assert proc.returncode == 0, proc.stderr
    saved = out / "latents" / "api_00001_.latent"
    assert saved.is_file()
    assert str(saved) in proc.stdout
    assert _latent_shape(saved) == (2, 4, 8, 8)
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------
# a real (tiny, random) SD1.5 checkpoint through the stock text-to-image graph

def txt2img_workflow(ckpt_name):
    nodes = [
        {"id": 4, "type": "CheckpointLoaderSimple", "mode": 0, "inputs": [],
         "outputs": [out("MODEL", "MODEL", [1]), out("CLIP", "CLIP", [3, 5]), out("VAE", "VAE", [8])],
         "widgets_values": [ckpt_name]},
        {"id": 6, "type": "CLIPTextEncode", "title": "Positive", "mode": 0, "inputs": [inp("clip", "CLIP", 3)],
         "outputs": [out("CONDITIONING", "CONDITIONING", [4])], "widgets_values": ["a red circle"]},
        {"id": 7, "type": "CLIPTextEncode", "title": "Negative", "mode": 0, "inputs": [inp("clip", "CLIP", 5)],
         "outputs": [out("CONDITIONING", "CONDITIONING", [6])], "widgets_values": [""]},
        {"id": 5, "type": "EmptyLatentImage", "mode": 0, "inputs": [], "outputs": [out("LATENT", "LATENT", [2])],
         "widgets_values": [64, 64, 1]},
        {"id": 3, "type": "KSampler", "mode": 0,
         "inputs": [inp("model", "MODEL", 1), inp("positive", "CONDITIONING", 4),
                    inp("negative", "CONDITIONING", 6), inp("latent_image", "LATENT", 2)],
         "outputs": [out("LATENT", "LATENT", [7])],
         "widgets_values": [123, "randomize", 2, 3.0, "euler", "simple", 1.0]},
        {"id": 8, "type": "VAEDecode", "mode": 0, "inputs": [inp("samples", "LATENT", 7), inp("vae", "VAE", 8)],
         "outputs": [out("IMAGE", "IMAGE", [9])]},
        {"id": 9, "type": "SaveImage", "mode": 0, "inputs": [inp("images", "IMAGE", 9)], "outputs": [],
         "widgets_values": ["tiny"]},
    ]
    links = [link(1, 4, 0, 3, 0, "MODEL"), link(2, 5, 0, 3, 3, "LATENT"), link(3, 4, 1, 6, 0, "CLIP"),
             link(4, 6, 0, 3, 1, "CONDITIONING"), link(5, 4, 1, 7, 0, "CLIP"), link(6, 7, 0, 3, 2, "CONDITIONING"),
             link(7, 3, 0, 8, 0, "LATENT"), link(8, 4, 2, 8, 1, "VAE"), link(9, 8, 0, 9, 0, "IMAGE")]
    return {"nodes": nodes, "links": links, "version": 0.4}


def test_txt2img_ui_workflow_with_tiny_checkpoint(host, tmp_path, keep_folders, capsys):
    from headless import tiny_models
    models = tmp_path / "models"
    tiny_models.make_sd15_checkpoint(str(models / "checkpoints" / "headless_tiny.safetensors"), seed=0)
    wf = tmp_path / "txt2img.json"
    wf.write_text(json.dumps(txt2img_workflow("headless_tiny.safetensors")))
    code, stdout, err = _main(capsys, wf, "--models", models, "--output-directory", tmp_path / "out")
    assert code == 0, err
    png = tmp_path / "out" / "tiny_00001_.png"
    assert png.is_file() and str(png) in stdout
    from PIL import Image
    with Image.open(png) as im:
        assert im.size == (64, 64)
        assert "workflow" in im.info and "prompt" in im.info  # metadata as the UI would embed it
    assert "2/2" in err  # the KSampler's progress bar
