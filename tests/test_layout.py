"""The pack's shape: the core imports without ComfyUI, the root package imports anywhere, and only
comfy_rapm/host.py touches comfy.* internals."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORE = ["schedule", "solver", "sampler", "trajectories", "lora", "discriminator", "losses", "trainer", "storage", "emoji",
        "presets", "training_unet", "reference",
        "progress", "errors", "cuda_graphs", "optim", "lora_file", "distributed", "shared_store", "checkpoints", "journals", "convolutions", "settings",
        "conditioning"]


def test_core_imports_without_comfyui():
    code = ("import sys; sys.path.insert(0, %r); " % str(REPO)
            + "; ".join(f"import comfy_rapm.{m}" for m in CORE)
            + "; assert not any(k == 'comfy' or k.startswith('comfy.') for k in sys.modules), 'comfy imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_repo_root_imports_outside_comfyui_with_empty_mappings():
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('pack', %r, "
            "submodule_search_locations=[%r]); m = importlib.util.module_from_spec(spec); "
            "spec.loader.exec_module(m); assert m.NODE_CLASS_MAPPINGS == {} and m.NODE_DISPLAY_NAME_MAPPINGS == {}"
            % (str(REPO / "__init__.py"), str(REPO)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_only_the_host_module_touches_comfy_internals():
    pattern = re.compile(r"^\s*(import comfy\b|from comfy\b|import comfy\.|from comfy\.|import folder_paths|from server)", re.M)
    offenders = [p.name for p in (REPO / "comfy_rapm").glob("*.py") if p.name != "host.py" and pattern.search(p.read_text())]
    assert offenders == []
    glue = sorted((REPO / "nodes").glob("*.py"))
    assert len(glue) >= 2 and [p.name for p in glue if pattern.search(p.read_text())] == []


def test_all_nodes_are_registered(host):
    for name in ("RAPMSampler", "RAPMTeacherTrajectory", "RAPMLoadTrajectories", "RAPMTrain", "RAPMSaveLoRA",
                 "RAPMEmojiDemoLoader"):
        assert name in host.NODE_CLASS_MAPPINGS and name in host.NODE_DISPLAY_NAME_MAPPINGS


def _copy_tracked_files(destination: Path) -> None:
    """The checkout's tracked files as they are now (committed or not), as a fresh clone would hold them."""
    import shutil
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (REPO / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)


def test_the_suite_runs_from_a_folder_named_as_users_name_it(tmp_path):
    """The README clones into `comfy-rapm` (not a Python name) inside ComfyUI/custom_nodes/; pytest must still
    collect and pass there."""
    import os
    from headless.comfy_host import find_comfyui
    env = dict(os.environ, COMFYUI_PATH=str(find_comfyui()), OMP_NUM_THREADS="1")
    for folder in (tmp_path / "comfy-rapm", tmp_path / "ComfyUI" / "custom_nodes" / "comfy-rapm"):
        _copy_tracked_files(folder)
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:logging", "tests/test_layout.py",
                                 "-k", "not folder_named"], cwd=folder, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{folder}:\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}"
        assert "4 passed" in result.stdout, result.stdout[-2000:]
