"""The user's own numbers (issue #17, item 2): the SD1.5 example workflow queued over HTTP on ComfyUI's real server,
started the way a user starts it, with its progress read off the websocket as the page reads it.

    python bench/server_perf.py --out $OUT/server_perf.json                   # GPU: full-size SD1.5, random weights
    python bench/server_perf.py --model sdxl --count 16 --iterations 20 --out $OUT/server_perf_sdxl.json
    python bench/server_perf.py --model tiny --cpu --count 2 --iterations 4   # the CPU miniature (CI)

1. Writes a random-weight checkpoint that the stock CheckpointLoaderSimple loads as SD1.5 (`sd15`: the full-size
   UNet, 860M parameters, CLIP-L, a TAESD-sized VAE; `tiny`: the tests' one-level UNet) or as SDXL (`sdxl`: the
   full-size UNet, 2.6B parameters, CLIP-L and CLIP-G, the TAESD-sized VAE; ~7 GB, ~1-2 min) into a base folder.
2. Starts `main.py --base-directory <folder>` (plus `--cpu` for the miniature) through headless.comfy_host.serve: no
   other flag, so ComfyUI's launcher picks its own allocator (cudaMallocAsync on CUDA) and everything else a user
   gets. The pack is linked into the base folder's custom_nodes/.
3. Converts the model's example workflow (rapm-2-sd15-… or rapm-3-sdxl-…) to the API format against the server's /object_info
   (headless.convert.convert_ui), with small counts (--count trajectories, --iterations), and queues it on /prompt.
4. Reads /ws: `progress` messages (value/max per node) and the binary `progress_text` messages (the node's text
   line: what the user reads). Reports trajectories/min and s/it two ways: the rate on the node's last text line
   (the user's number, warm-up included, as the node computes it) and the steady rate from the progress messages'
   arrival times after the first batch / the first --skip-iterations iterations.
   GPU memory in use as nvidia-smi shows it (the server's models and CUDA context included) is sampled every 0.5 s:
   its peak over the prompt and within each node's run.
5. With --perf (default on CUDA), runs bench/perf.py for the same configuration (the same model, the node's default training
   configuration `checkpointing`, M=25 trajectories at the node's auto batch size) under the allocator the server
   used, and prints both and their ratio (the issue asks for agreement within 10%).

Where the machine lacks packages only the server's start-up imports and this workload never runs (the GPU image has
no `av` and no `comfyui-frontend-package`), --stub-missing (default on) puts empty stand-ins on the server's path and
the report lists them."""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORKFLOWS = {"sd15": REPO / "example_workflows" / "rapm-2-sd15-to-4-step-lora.json",
             "tiny": REPO / "example_workflows" / "rapm-2-sd15-to-4-step-lora.json",
             "sdxl": REPO / "example_workflows" / "rapm-3-sdxl-to-4-step-lora.json"}
TEXT_EVENT = 3  # ComfyUI's BinaryEventTypes.TEXT (protocol.py): progress_text
# The miniature's sizes: tiny images and a 2-step teacher sample after training, so the whole graph runs in seconds.
CPU_SETS = {"RAPMTeacherTrajectory": {"width": 64, "height": 64, "fine_steps": 2},
            "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1}}
CPU_SAMPLER_STEPS = 2
RATE = re.compile(r"(\d+(?:\.\d+)?) (?:s/(\w+)|(\w+)/s)")


# --- 1. the checkpoint --------------------------------------------------------------------------------------------

def write_checkpoint(kind: str, path: Path, seed: int = 0, comfyui: str | None = None, env: dict | None = None) -> None:
    """In a CPU-only child process (no CUDA context beside the server's), with the host the server will run."""
    from headless.comfy_host import find_comfyui
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from headless import tiny_models; from bench import perf; "
            "kind, path, seed = sys.argv[2], sys.argv[3], int(sys.argv[4]); "
            "tiny_models.make_sdxl_checkpoint(path, perf.UNET['sdxl'], seed) if kind == 'sdxl' else "
            "tiny_models.make_sd15_checkpoint(path, seed, None if kind == 'tiny' else perf.UNET['sd15'])")
    if kind not in WORKFLOWS:
        raise ValueError(f"--model {kind}: one of {', '.join(WORKFLOWS)}")
    env = {"OMP_NUM_THREADS": "1", **os.environ, **(env or {}), "CUDA_VISIBLE_DEVICES": "",
           "COMFYUI_PATH": str(find_comfyui(comfyui))}
    res = subprocess.run([sys.executable, "-c", code, str(REPO), kind, str(path), str(seed)], env=env,
                         capture_output=True, text=True, timeout=900)
    if res.returncode:
        raise RuntimeError(f"writing the checkpoint failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")


# --- 2. the server's environment ----------------------------------------------------------------------------------

def _importable(name: str) -> bool:
    res = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True)
    return res.returncode == 0


STUB_MODULE = '''"""Stand-in written by bench/server_perf.py: this machine lacks the package, which only ComfyUI's start-up imports
(video and audio types); the benchmarked workload never calls it."""
class _MissingType(type):
    def __getattr__(cls, name):  # enum-like constants read at import time (0.33's ColorTrc.BT709)
        if name.startswith("__"):
            raise AttributeError(name)
        return cls.__name__ + "." + name


class _Missing(metaclass=_MissingType):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("a stand-in of a package missing on this machine (bench/server_perf.py --stub-missing)")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Missing
'''


def stubs(folder: Path) -> list[str]:
    """Stand-ins for the packages the server's start-up imports but this machine lacks; returns their names."""
    made = []
    if not _importable("av"):
        for module in ("av", "av/codec", "av/container", "av/subtitles", "av/subtitles/stream", "av/audio", "av/video",
                       "av/video/reformatter"):
            (folder / module).mkdir(parents=True, exist_ok=True)
            (folder / module / "__init__.py").write_text(STUB_MODULE)
        made.append("av")
    if not _importable("comfyui_frontend_package"):
        static = folder / "comfyui_frontend_package" / "static"
        static.mkdir(parents=True, exist_ok=True)
        (folder / "comfyui_frontend_package" / "__init__.py").write_text('"""Stand-in (bench/server_perf.py): no web page."""\n')
        (static / "index.html").write_text("<!doctype html><title>no front end (benchmark)</title>\n")
        made.append("comfyui_frontend_package")
    return made


def base_folder(root: Path, checkpoint_kind: str) -> Path:
    """ROOT/models/checkpoints/, ROOT/custom_nodes/comfy-rapm → this repository, input/, output/ and user/."""
    for sub in ("models/checkpoints", "custom_nodes", "input", "output", "user"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    link = root / "custom_nodes" / "comfy-rapm"
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return root / "models" / "checkpoints" / f"rapm_server_perf_{checkpoint_kind}.safetensors"


# --- 3. the workflow ----------------------------------------------------------------------------------------------

class _Info:
    """A node class as convert_ui reads it, from one /object_info entry."""

    def __init__(self, name: str, info: dict):
        self.name, self.info = name, info
        self.DISPLAY_NAME = info.get("display_name") or name
        self.RETURN_TYPES = tuple(info.get("output") or ())

    def INPUT_TYPES(self):
        return {k: v for k, v in (self.info.get("input") or {}).items() if k in ("required", "optional")}


def api_prompt(object_info: dict, checkpoint: str, count: int, iterations: int, name: str, cpu: bool,
               sets: list[str], model: str = "sd15") -> tuple[dict, dict]:
    """The model's example workflow in API format with this run's values; returns (graph, node ids by class)."""
    from headless.convert import convert_ui
    from headless.workflow import apply_sets
    classes = {k: _Info(k, v) for k, v in object_info.items()}
    workflow = json.loads(WORKFLOWS[model].read_text())
    api, _notes = convert_ui(workflow, classes, {k: c.DISPLAY_NAME for k, c in classes.items()})
    ids: dict[str, list[str]] = {}
    for node_id, node in api.items():
        kind, inputs = node["class_type"], node["inputs"]
        ids.setdefault(kind, []).append(node_id)
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = checkpoint
        elif kind == "RAPMTeacherTrajectory":
            inputs.update(count=count, name=name)
        elif kind == "RAPMTrain":
            inputs.update(iterations=iterations, name=name, checkpoint_every=max(iterations, int(inputs.get("checkpoint_every", 1))))
        elif kind in ("SaveImage", "RAPMSaveLoRA", "LossGraphNode"):
            inputs["filename_prefix"] = f"server_perf/{name}_{node_id}"
        if cpu:
            inputs.update(CPU_SETS.get(kind, {}))
            if kind == "RAPMSampler" and int(inputs["steps"]) > 4:  # the teacher's 100-step sample after training
                inputs["steps"] = CPU_SAMPLER_STEPS
    if sets:
        apply_sets(api, sets, classes, {k: c.DISPLAY_NAME for k, c in classes.items()})
    return api, ids


# --- 4. the websocket ---------------------------------------------------------------------------------------------

async def queue_and_watch(base: str, api: dict, timeout: float) -> tuple[str, list]:
    """POST the graph, read /ws until it finished; returns (prompt id, [(time, kind, payload)])."""
    import aiohttp
    client = uuid.uuid4().hex
    events: list = []
    ws_url = base.replace("http://", "ws://") + f"/ws?clientId={client}"
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url, max_msg_size=0, heartbeat=30) as ws:
            async with session.post(f"{base}/prompt", json={"prompt": api, "client_id": client}) as r:
                body = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"/prompt refused the graph ({r.status}): {json.dumps(body)[:3000]}")
            prompt_id = body["prompt_id"]
            events.append((time.monotonic(), "queued", prompt_id))
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the prompt did not finish in {timeout:.0f} s")
                msg = await ws.receive(timeout=left)
                now = time.monotonic()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    kind, payload = data.get("type"), data.get("data") or {}
                    if payload.get("prompt_id") not in (None, prompt_id):
                        continue
                    events.append((now, kind, payload))
                    if kind == "execution_error":
                        raise RuntimeError(f"the prompt failed: {json.dumps(payload)[:3000]}")
                    if kind == "execution_interrupted":
                        raise RuntimeError("the prompt was interrupted")
                    if kind == "execution_success" or (kind == "executing" and payload.get("node") is None
                                                       and payload.get("prompt_id") == prompt_id):
                        return prompt_id, events
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    (event,) = struct.unpack(">I", msg.data[:4])
                    if event == TEXT_EVENT:
                        (n,) = struct.unpack(">I", msg.data[4:8])
                        node = msg.data[8:8 + n].decode()
                        events.append((now, "progress_text", {"node": node, "text": msg.data[8 + n:].decode()}))
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                    raise RuntimeError(f"the websocket closed ({msg.type})")


def shown_rate(text: str) -> tuple[float, str] | None:
    """(seconds per unit, unit) from a node's text line ('12/64 traj · 2.5 traj/s · ETA …' or '… 1.30 s/it …')."""
    first = text.split("\n")[0]
    m = RATE.search(first)
    if not m:
        return None
    value = float(m.group(1))
    return (value, m.group(2)) if m.group(2) else (1.0 / value, m.group(3))


def node_figures(events: list, node: str, skip: int) -> dict:
    """What /ws said about one node: its start, progress messages, text lines and rates."""
    start = next((t for t, kind, p in events if kind == "executing" and p.get("node") == node), None)
    later = [t for t, kind, p in events if kind == "executing" and start is not None and t > start and p.get("node") != node]
    end = min(later) if later else None
    progress = [(t, p["value"], p["max"]) for t, kind, p in events if kind == "progress" and str(p.get("node")) == node]
    texts = [(t, p["text"]) for t, kind, p in events if kind == "progress_text" and p.get("node") == node]
    out = {"started_s": start, "seconds": (end - start) if start is not None and end is not None else None,
           "progress_messages": len(progress), "text_messages": len(texts),
           "last_value": progress[-1][1] if progress else None, "max": progress[-1][2] if progress else None}
    rated = [(t, shown_rate(text)) for t, text in texts]
    rated = [(t, r) for t, r in rated if r]
    if rated:
        out["shown_seconds_per_unit"], out["shown_unit"] = rated[-1][1]
        out["last_text"] = texts[-1][1]
    after = [(t, v) for t, v, _ in progress if v >= skip]
    if len(after) >= 2 and after[-1][1] > after[0][1]:
        out["steady_seconds_per_unit"] = (after[-1][0] - after[0][0]) / (after[-1][1] - after[0][1])
        out["steady_from_value"] = after[0][1]
    return out


class DeviceMemory:
    """GPU 0's used memory as nvidia-smi reports it (what a user's monitor shows: every process and CUDA context on the
    card), sampled every `interval` seconds in a thread while inside; no samples where there is no nvidia-smi."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.samples = interval, []  # (time.monotonic(), GiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        return False

    def _run(self):
        while True:
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=10).stdout
                self.samples.append((time.monotonic(), float(out.split()[0]) / 1024))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            if self._stop.wait(self.interval):
                return

    def peak(self, start: float | None = None, end: float | None = None) -> float | None:
        """The largest sample between start and end (monotonic seconds; None: unbounded), or None without one."""
        inside = [gib for t, gib in self.samples if (start is None or t >= start) and (end is None or t <= end)]
        return max(inside) if inside else None


# --- 5. perf.py beside it -----------------------------------------------------------------------------------------

def perf_figures(model: str, allocator_conf: str | None, limit: float) -> dict:
    from bench.async_autotune import run_limited
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "perf.json"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        if allocator_conf:
            env["PYTORCH_CUDA_ALLOC_CONF"] = allocator_conf
        cmd = [sys.executable, str(REPO / "bench" / "perf.py"), "--models", model, "--variants", "checkpointing",
               "--skip-equivalence", "--traj-fine-steps", "25", "--out", str(out)]
        process = run_limited(cmd, env, limit, Path(tmp) / "perf.log")
        report = json.loads(out.read_text()) if out.is_file() else {}
    entry = report.get("models", {}).get(model, {})
    training = entry.get("training", {}).get("checkpointing", {})
    return {"command": "PYTORCH_CUDA_ALLOC_CONF=" + (allocator_conf or "(unset)") + " " + " ".join(cmd[1:-2]),
            "process": {k: process[k] for k in ("wall_s", "returncode", "timed_out")},
            "trajectories_per_min": (entry.get("trajectories") or {}).get("trajectories_per_min"),
            "trajectory_batch": (entry.get("trajectories") or {}).get("batch_size"),
            "seconds_per_iteration": training.get("seconds_per_iteration"),
            "allocator_backend": report.get("allocator_backend")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15", choices=["sd15", "tiny", "sdxl"])
    p.add_argument("--count", type=int, default=64, help="trajectories")
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--skip-iterations", type=int, default=10, help="training iterations left out of the steady rate")
    p.add_argument("--cpu", action="store_true", help="main.py --cpu (the miniature)")
    p.add_argument("--set", action="append", default=[], help="NODE.input=value on the API graph (as headless/run.py)")
    p.add_argument("--perf", choices=["auto", "on", "off"], default="auto", help="run perf.py beside it (auto: on CUDA)")
    p.add_argument("--stub-missing", choices=["on", "off"], default="on")
    p.add_argument("--work", default=None, help="base folder to keep (default: a temporary one)")
    p.add_argument("--timeout", type=float, default=1500.0, help="seconds for the prompt")
    p.add_argument("--comfyui", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from headless.comfy_host import serve
    started = time.monotonic()
    report = {"command": "python bench/server_perf.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": args.model, "count": args.count,
              "iterations": args.iterations}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work or tmp).resolve()
        checkpoint = base_folder(root, args.model)
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} if args.cpu else {}
        report["stubs"] = stubs(root / "stubs") if args.stub_missing == "on" else []
        if report["stubs"]:  # the checkpoint writer boots the same host, so it needs them too
            env["PYTHONPATH"] = os.pathsep.join([str(root / "stubs")] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x])
        t0 = time.monotonic()
        if not checkpoint.is_file():
            write_checkpoint(args.model, checkpoint, comfyui=args.comfyui, env=env)
        report["checkpoint"] = {"file": checkpoint.name, "bytes": checkpoint.stat().st_size, "write_seconds": time.monotonic() - t0}
        server_args = ["--base-directory", str(root)] + (["--cpu"] if args.cpu else [])
        report["server_args"] = server_args
        log = root / "server.log"
        t0 = time.monotonic()
        with serve(server_args, log, comfyui=args.comfyui, env=env, timeout=300) as base:
            report["server_start_seconds"] = time.monotonic() - t0
            import urllib.request
            with urllib.request.urlopen(f"{base}/object_info", timeout=60) as r:
                object_info = json.loads(r.read())
            name = f"server_perf_{uuid.uuid4().hex[:8]}"
            api, ids = api_prompt(object_info, checkpoint.name, args.count, args.iterations, name, args.cpu, args.set,
                                  args.model)
            with DeviceMemory() as memory:
                prompt_id, events = asyncio.run(queue_and_watch(base, api, args.timeout))
            queued = events[0][0]
            report["device_memory_peak_gib"] = memory.peak()
            report["prompt_seconds"] = events[-1][0] - queued
            report["messages"] = {kind: sum(1 for _, k, _ in events if k == kind) for kind in {k for _, k, _ in events}}
            figures = {}
            for kind, skip in (("RAPMTeacherTrajectory", 1), ("RAPMTrain", args.skip_iterations)):
                node = ids[kind][0]
                f = node_figures(events, node, skip)
                if f.get("started_s") is not None:
                    end = f["started_s"] + f["seconds"] if f["seconds"] is not None else None
                    f["device_memory_peak_gib"] = memory.peak(f["started_s"], end)
                    f["started_s"] -= queued
                figures[kind] = f
            report["nodes"] = figures
        text = log.read_text(errors="replace")
        report["server_log_tail"] = text[-4000:]
        # ComfyUI's start-up line "Device: cuda:0 <name> : cudaMallocAsync" names the allocator it chose
        report["server_allocator"] = "cudaMallocAsync" if "cudaMallocAsync" in text else ("CPU" if args.cpu else "native")
        report["server_device_line"] = next((line for line in text.splitlines() if line.startswith("Device:")), None)
    traj, train = report["nodes"]["RAPMTeacherTrajectory"], report["nodes"]["RAPMTrain"]
    user = {"trajectories_per_min_shown": 60.0 / traj["shown_seconds_per_unit"] if traj.get("shown_seconds_per_unit") else None,
            "trajectories_per_min_steady": 60.0 / traj["steady_seconds_per_unit"] if traj.get("steady_seconds_per_unit") else None,
            "seconds_per_iteration_shown": train.get("shown_seconds_per_unit"),
            "seconds_per_iteration_steady": train.get("steady_seconds_per_unit")}
    report["user"] = user
    run_perf = args.perf == "on" or (args.perf == "auto" and not args.cpu and _cuda())
    if run_perf:
        conf = "backend:cudaMallocAsync" if report["server_allocator"] == "cudaMallocAsync" else None
        perf = report["perf"] = perf_figures(args.model, conf, 600)
        report["ratio_server_over_perf"] = {
            "seconds_per_iteration": _ratio(user["seconds_per_iteration_steady"], perf["seconds_per_iteration"]),
            "minutes_per_trajectory": _ratio(perf["trajectories_per_min"], user["trajectories_per_min_steady"])}
    report["wall_seconds"] = time.monotonic() - started
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "server_log_tail"}, indent=1))
    print(f"\n{args.model}, {args.count} trajectories, {args.iterations} iterations through main.py {' '.join(server_args)} "
          f"({report['server_allocator']}); stand-ins: {report['stubs'] or 'none'}")
    print(f"  trajectories/min: shown {_fmt(user['trajectories_per_min_shown'])}, steady {_fmt(user['trajectories_per_min_steady'])}"
          + (f", perf.py {_fmt(report['perf']['trajectories_per_min'])}" if run_perf else ""))
    print(f"  GPU memory in use (nvidia-smi): peak {_fmt(report['device_memory_peak_gib'])} GiB, training "
          f"{_fmt(train.get('device_memory_peak_gib'))} GiB")
    print(f"  s/it:             shown {_fmt(user['seconds_per_iteration_shown'])}, steady {_fmt(user['seconds_per_iteration_steady'])}"
          + (f", perf.py {_fmt(report['perf']['seconds_per_iteration'])}" if run_perf else ""))
    if run_perf:
        print(f"  server / perf.py: {report['ratio_server_over_perf']}")
    return 0


def _cuda() -> bool:
    res = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True)
    return res.stdout.strip() == "True"


def _ratio(a, b):
    return a / b if a and b and math.isfinite(a) and math.isfinite(b) else None


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    sys.exit(main())
