"""The pack's shape: the core imports without ComfyUI, the root package imports anywhere, and only
comfy_rapm/host.py touches comfy.* internals."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORE = ["schedule", "solver", "sampler", "trajectories", "lora", "discriminator", "losses", "trainer", "storage", "emoji",
        "progress", "errors", "cuda_graphs", "optim", "distributed"]


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
    assert not pattern.search((REPO / "nodes.py").read_text())


def test_all_nodes_are_registered(host):
    for name in ("RAPMSampler", "RAPMTeacherTrajectory", "RAPMLoadTrajectories", "RAPMTrain", "RAPMSaveLoRA",
                 "RAPMEmojiDemoLoader"):
        assert name in host.NODE_CLASS_MAPPINGS and name in host.NODE_DISPLAY_NAME_MAPPINGS
