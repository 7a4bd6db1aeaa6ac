"""Test helper: the real ComfyUI server (main.py --cpu) on a free local port, stopped on exit."""
import contextlib
import json
import urllib.request
from pathlib import Path

import pytest

from headless.comfy_host import ServerFailed, serve


def get_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(url, payload, timeout=10):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def running_server(folder: Path, *args: str):
    """main.py --cpu with `args`; yields its base URL once it serves the pack's nodes; log in folder/server.log."""
    try:
        with serve(["--cpu", *args], Path(folder) / "server.log", env={"OMP_NUM_THREADS": "1"}, timeout=120) as url:
            yield url
    except ServerFailed as e:
        pytest.fail(str(e))
