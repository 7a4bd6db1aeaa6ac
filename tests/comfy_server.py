"""Test helper: the real ComfyUI server (main.py --cpu) on a free local port, stopped on exit."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from headless.comfy_host import find_comfyui


def get_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def running_server(folder: Path, *args: str):
    """Start the server with `args` (added to --cpu, --listen and --port), wait until it serves the
    pack's nodes, yield its base URL; its log is folder/server.log."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = Path(folder) / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
             *args], cwd=find_comfyui(), stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(240):
                if proc.poll() is not None:
                    pytest.fail("server exited:\n" + log_path.read_text()[-3000:])
                try:
                    if "RAPMSampler" in get_json(f"{url}/object_info/RAPMSampler"):
                        break
                except OSError:
                    time.sleep(0.5)
            else:
                pytest.fail("server did not answer in 120 s:\n" + log_path.read_text()[-3000:])
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
