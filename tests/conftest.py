import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO), str(REPO / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "quality: the quality-benchmark miniature (data prep, teacher, eval)")
    config.addinivalue_line("markers", "server: starts the real ComfyUI server")
    config.addinivalue_line("markers", "frontend: the real web front end in headless Chromium")
    # ComfyUI in-process before any test module imports comfy_rapm.host (which imports comfy.*).
    # Its start-up warnings (no torchaudio here) are not ours: keep them out of the test output.
    import logging
    from headless.comfy_host import boot
    logging.getLogger().setLevel(logging.CRITICAL)
    boot(cpu=True)
    logging.getLogger().setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """ComfyUI imported in-process (CPU) with every node loaded, this pack included.
    Returns the host's `nodes` module; output/input folders point into a temp dir."""
    from headless.comfy_host import boot
    import folder_paths
    base = tmp_path_factory.mktemp("comfy")
    nodes = boot(cpu=True, output_directory=str(base / "output"), input_directory=str(base / "input"))
    loras = base / "loras"  # saved LoRAs go here, not into the host's models/loras
    loras.mkdir()
    paths, extensions = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(loras)] + list(paths), extensions)
    return nodes


@pytest.fixture(scope="session")
def quality_mini(tmp_path_factory):
    """bench/quality/prepare_data.py --limit 8 (8 concepts × 3 styles), built once per session. It fetches
    the emoji sets with `npm pack`, so it needs npm and the registry."""
    import shutil
    import subprocess
    if shutil.which("npm") is None:
        pytest.skip("npm is not on PATH: prepare_data.py fetches the emoji sets with `npm pack`")
    out = tmp_path_factory.mktemp("quality_mini")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, str(REPO / "bench" / "quality" / "prepare_data.py"), "--out", str(out),
                          "--limit", "8"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


@pytest.fixture
def every_progress_update(host):
    """The host passes every progress update to its hook, as releases before 0.33 do (0.33 throttles them to
    ≤ every 0.1 s / 0.5%: a UI policy, not the node's): lets a test see each step a node reports."""
    import comfy.utils
    names = [n for n in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT") if hasattr(comfy.utils, n)]
    saved = {n: getattr(comfy.utils, n) for n in names}
    for n in names:
        setattr(comfy.utils, n, 0)
    yield
    for n, v in saved.items():
        setattr(comfy.utils, n, v)
