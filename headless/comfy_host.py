"""ComfyUI started the two ways this project uses it: its machinery in this process (no HTTP server: the node
registry, the folder paths, the executor), or its own server (main.py) in a subprocess. Shared by
headless/run.py, the benchmarks and the tests.

In-process, order matters: cli args before comfy.model_management, utils.extra_config before
nodes, custom nodes loaded through the host's own loader."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class HostNotFound(RuntimeError):
    pass


class HostUnsupported(RuntimeError):
    """The host lacks something the pack needs; the message names its version and what is missing."""


def find_comfyui(explicit: str | None = None) -> Path:
    """--comfyui, then COMFYUI_PATH, then the repo's .comfyui/ComfyUI."""
    for source, candidate in (("--comfyui", explicit), ("COMFYUI_PATH", os.environ.get("COMFYUI_PATH")),
                              ("the repo", str(REPO / ".comfyui" / "ComfyUI"))):
        if candidate:
            path = Path(candidate).expanduser().resolve()
            if (path / "main.py").is_file() and (path / "comfy").is_dir():
                return path
            if source != "the repo":
                raise HostNotFound(f"{source} points at {path}, which is not a ComfyUI folder (no main.py and comfy/)")
    raise HostNotFound("ComfyUI not found: pass --comfyui PATH, set COMFYUI_PATH, or run `make setup` "
                       "to install the host at .comfyui/ComfyUI")


class ServerFailed(RuntimeError):
    """The host's server exited or did not answer; the message ends with its log's tail."""


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(args: list[str], log_path: str | os.PathLike, comfyui: str | None = None, env: dict | None = None,
          timeout: float = 120.0):
    """The host's own server, `main.py` with `args` (what a user types after it), in a subprocess on a free local
    port; yields its base URL once it serves this pack's nodes, and stops it on exit. Its log goes to log_path."""
    import json
    import subprocess
    import time
    import urllib.request
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port),
                                 "--disable-auto-launch", *args], cwd=find_comfyui(comfyui), stdout=log,
                                stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})))
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise ServerFailed(f"the server exited ({proc.returncode}):\n" + Path(log_path).read_text()[-3000:])
                try:
                    with urllib.request.urlopen(f"{url}/object_info/RAPMSampler", timeout=5) as r:
                        if "RAPMSampler" in json.loads(r.read()):
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise ServerFailed(f"the server did not serve the pack's nodes in {timeout:.0f} s:\n"
                                       + Path(log_path).read_text()[-3000:])
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


_booted: dict = {}


def import_comfy(comfyui: str | None = None, cpu: bool | None = None) -> Path:
    """Import ComfyUI's `comfy` package in this process, without its nodes or server (what the benchmarks need to
    build and run models). `cpu` None: the CPU only where CUDA is unavailable. A no-op where it is imported
    already (a booted host, or inside ComfyUI); returns the host's folder."""
    if "comfy.model_management" in sys.modules:
        return Path(sys.modules["comfy.model_management"].__file__).resolve().parent.parent
    path = find_comfyui(comfyui)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    if cpu is None:
        import torch
        cpu = not torch.cuda.is_available()
    comfy.cli_args.args.cpu = bool(cpu)
    import comfy.model_management  # noqa: F401  (reads args.cpu at import)
    return path


def boot(comfyui: str | None = None, cpu: bool | None = None, output_directory: str | None = None,
         input_directory: str | None = None, extra_model_dirs: tuple[str, ...] = (), quiet: bool = True):
    """Import ComfyUI in-process once and load every node (built-in extras and custom nodes,
    this pack included). Returns the host's `nodes` module. Later calls only change folders."""
    if not _booted:
        if quiet:
            logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
        path = import_comfy(comfyui, cpu)
        import utils.extra_config  # noqa: F401  (before `nodes`, or `utils` is shadowed by comfy/utils.py)
        import nodes
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        if not any(name.startswith("RAPM") for name in nodes.NODE_CLASS_MAPPINGS):
            # The pack is not linked into this host's custom_nodes/: load it from the repo.
            asyncio.run(nodes.load_custom_node(str(REPO), module_parent="custom_nodes"))
        _booted.update(path=path, nodes=nodes)
    import folder_paths
    if output_directory:  # temporary files (previews, loss graphs) under it too, as main.py's --temp-directory
        os.makedirs(output_directory, exist_ok=True)
        folder_paths.set_output_directory(os.path.abspath(output_directory))
        temp = os.path.join(os.path.abspath(output_directory), "temp")
        os.makedirs(temp, exist_ok=True)  # main.py makes it; some nodes write into it without checking
        folder_paths.set_temp_directory(temp)
    if input_directory:
        os.makedirs(input_directory, exist_ok=True)
        folder_paths.set_input_directory(os.path.abspath(input_directory))
    for folder in extra_model_dirs:
        add_model_root(folder)
    return _booted["nodes"]


def add_model_root(root: str) -> None:
    """Register ROOT/<kind>/ (checkpoints, loras, …) as an extra model folder for each kind."""
    import folder_paths
    for kind in list(folder_paths.folder_names_and_paths):
        sub = os.path.join(root, kind)
        if os.path.isdir(sub):
            folder_paths.add_model_folder_path(kind, sub, is_default=True)


def version() -> str:
    """The booted host's version ("0.3.75"), or "unknown" for a tree without comfyui_version.py."""
    try:
        import comfyui_version
        return str(comfyui_version.__version__)
    except ImportError:
        return "unknown"


class _AbsentIsZero(dict):
    """Cache settings: a key this code does not know (a later host's) reads as 0, its 'off'."""

    def __missing__(self, key):
        return 0


def new_executor(server):
    """The host's PromptExecutor with the classic cache (keep every output of this one run), built from the
    parameters its constructor declares, as each release's main.py builds it: `cache_args` (0.3.6x+; 0.33
    added keys), or `cache_size` (earlier)."""
    import inspect
    import execution
    params = inspect.signature(execution.PromptExecutor.__init__).parameters
    kwargs = {"cache_type": execution.CacheType.CLASSIC} if "cache_type" in params else {}
    if "cache_args" in params:
        kwargs["cache_args"] = _AbsentIsZero(lru=0, ram=0)
    elif "cache_size" in params:
        kwargs["cache_size"] = None
    try:
        return execution.PromptExecutor(server, **kwargs)
    except TypeError as e:
        raise HostUnsupported(f"ComfyUI {version()}: its PromptExecutor{inspect.signature(execution.PromptExecutor)} "
                              f"is not one headless/run.py knows how to build ({e}); run the workflow in ComfyUI's "
                              "page instead") from None
