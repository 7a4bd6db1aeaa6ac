"""The shipped workflows: they convert and validate against the installed nodes, the demo runs end to
end through headless/run.py, and UI and API formats of the same graph give identical results."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headless import run, tiny_models
from headless.convert import widget_slots

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
SMALL = ["Teacher Trajectories (RAPM).count=2", "Teacher Trajectories (RAPM).fine_steps=2",
         "RAPM Train.iterations=4", "RAPM Train.lora_rank=2", "Teacher (20 DDIM steps, cfg 6.0).steps=2"]


@pytest.fixture
def keep_output(host):
    import folder_paths
    saved = folder_paths.get_output_directory()
    yield
    folder_paths.set_output_directory(saved)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "checkpoints").mkdir()
    (root / "loras").mkdir()
    tiny_models.make_sd15_checkpoint(str(root / "checkpoints" / "tiny.safetensors"))
    return root


def test_the_three_workflows_ship():
    assert {p.name for p in WORKFLOWS} == {"rapm-2-sd15-to-4-step-lora.json", "rapm-3-sdxl-to-4-step-lora.json", "rapm-1-demo-emoji-teacher-no-downloads.json"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_converts_with_matching_widget_counts(host, path):
    workflow = json.loads(path.read_text())
    classes = host.NODE_CLASS_MAPPINGS
    for node in workflow["nodes"]:
        if node["type"] in ("Note", "MarkdownNote"):
            continue
        assert node["type"] in classes, f"{path.name}: node type {node['type']} is not installed"
        widgets = len(widget_slots(classes[node["type"]]))
        assert len(node["widgets_values"]) == widgets, f"{path.name}: {node['type']} widget count"
    api = run.ui_to_api(workflow, classes)
    assert {n["class_type"] for n in api.values()} >= {"RAPMTeacherTrajectory", "RAPMTrain", "RAPMSaveLoRA", "RAPMSampler"}
    train = next(n for n in api.values() if n["class_type"] == "RAPMTrain")
    assert train["inputs"]["mode"] == "rapm" and isinstance(train["inputs"]["iterations"], int)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_validates_with_a_checkpoint_present(host, path, models, tmp_path, keep_output, capsys):
    pick = [] if path.stem == "rapm-1-demo-emoji-teacher-no-downloads" else ["--set", "Teacher checkpoint.ckpt_name=tiny.safetensors"]
    code = run.main([str(path), "--print-api", "--models", str(models), "--output-directory", str(tmp_path)] + pick)
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "RAPMTrain" in out.out


def _student_pixels(folder):
    images = sorted(Path(folder).rglob("demo_student_*.png"))
    assert images, f"no student image in {folder}"
    return np.asarray(Image.open(images[-1]))


def test_demo_runs_end_to_end_and_ui_equals_api(host, models, tmp_path, keep_output, capsys):
    demo = REPO / "example_workflows" / "rapm-1-demo-emoji-teacher-no-downloads.json"
    sets = [a for s in SMALL for a in ("--set", s)]
    ui_out, api_out = tmp_path / "ui", tmp_path / "api"
    assert run.main([str(demo), "--models", str(models), "--output-directory", str(ui_out), "--quiet"] + sets) == 0
    assert (ui_out / "rapm_trajectories" / "demo" / "manifest.json").is_file()
    assert list(ui_out.rglob("demo_teacher_vs_student_*.png"))
    assert list((models / "loras").rglob("demo*.safetensors"))

    api_file = tmp_path / "demo_api.json"
    api_file.write_text(_printed_api(capsys, demo, models, api_out, sets))
    assert run.main([str(api_file), "--models", str(models), "--output-directory", str(api_out), "--quiet"]) == 0
    assert np.array_equal(_student_pixels(ui_out), _student_pixels(api_out))


def _printed_api(capsys, demo, models, out, sets):
    capsys.readouterr()
    assert run.main([str(demo), "--print-api", "--models", str(models), "--output-directory", str(out)] + sets) == 0
    text = capsys.readouterr().out
    start = text.index("{")
    api, _ = json.JSONDecoder().raw_decode(text[start:])
    return json.dumps(api)


def test_unknown_set_targets_and_bad_values_fail_clearly(host, models, tmp_path, keep_output, capsys):
    demo = REPO / "example_workflows" / "rapm-1-demo-emoji-teacher-no-downloads.json"
    base = [str(demo), "--models", str(models), "--output-directory", str(tmp_path), "--print-api"]
    assert run.main(base + ["--set", "No Such Node.count=1"]) == 2
    assert "No Such Node" in capsys.readouterr().err
    assert run.main(base + ["--set", "RAPM Train.no_such_input=1"]) == 2
    assert "no_such_input" in capsys.readouterr().err
    assert run.main(base + ["--set", "RAPM Train.iterations=-5"]) != 0
    err = capsys.readouterr().err
    assert "RAPM Train" in err and "iterations" in err


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflows_name_the_checkpoint_they_expect_and_say_where_files_go(path):
    """The front end's missing-models dialog reads node.properties.models: name, address and folder."""
    workflow = json.loads(path.read_text())
    loaders = [n for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    for loader in loaders:
        (model,) = loader["properties"]["models"]
        assert model["name"] == loader["widgets_values"][0] and model["directory"] == "checkpoints"
        assert model["url"].startswith("https://huggingface.co/") and model["name"] in model["url"]
    note = next(n for n in workflow["nodes"] if n["type"] == "Note")["widgets_values"][0]
    assert "output/rapm_trajectories/" in note and "output/rapm_runs/" in note and "models/loras/rapm/" in note
    assert ("models/checkpoints/" in note) == bool(loaders)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_each_workflow_has_a_template_thumbnail(path):
    thumbnail = path.with_suffix(".jpg")  # what the template browser shows on the card (headless/build_workflows.py)
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG" and image.width >= 320 and image.height >= 200
        assert np.asarray(image.convert("L")).std() > 10  # a picture, not a blank
