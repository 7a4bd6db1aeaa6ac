"""Issue #17 item 1: does cuDNN autotuning stall under PyTorch's cudaMallocAsync allocator because every algorithm
search maps and unmaps all free GPU memory? One GPU call, every case in its own process with a hard time limit:

    python bench/async_autotune.py --out $OUT/async_autotune.json

The hypothesis (comfy_rapm/convolutions.py): for each new convolution configuration PyTorch's cuDNN path asks the
allocator for the largest workspace it could serve (`cacheInfo`); under cudaMallocAsync that is a trial
`cudaMallocAsync` of all the free device memory (kept in the pool afterwards), and after the search PyTorch empties
the cache, which there is `cudaMemPoolTrimTo(0)`: all of it is unmapped again. So the cost per search grows with the
card's free memory, is mostly system time (the driver's page-table work), and disappears when either half is removed.

Part `probe` (a stack of SD1.5-sized convolutions, forward and backward, bf16, batch 1 and 4: 108 searches):
  native_on        native allocator, autotuning (the product natively)
  async_on         cudaMallocAsync, autotuning: predicted ≥ 0.3 s a search, mostly system time, pool peak ≈ free memory
  async_on_hog     the same with a 100 GiB tensor held first: per-search cost falls with the free memory (~1/4 on an H200)
  async_keep_cache cudaMallocAsync, autotuning without the per-search cache release: predicted near native_on's time
  async_off        cudaMallocAsync, cuDNN heuristics (the product's safe path): no search cost
  native_off       native allocator, heuristics: what the heuristics cost in speed where nothing stalls
Part `product` (bench/perf.py, SD1.5, the node's default `checkpointing`, 2 warm-up + 6 timed iterations):
  native_auto, async_auto (the fix), async_keep_cache, native_off; `async_on` (the old behaviour) only when named.

Each case reports wall, user and system seconds (the child's rusage), searches per second while tuning, the
allocator's reserved peak and the driver's view; a case cut at its limit reports how far it got. A table last."""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASYNC = "backend:cudaMallocAsync"
# (in channels, out channels, kernel, stride, input size): the SD1.5 UNet's convolution configurations at 512 px
SHAPES = [(4, 320, 3, 1, 64), (320, 320, 3, 1, 64), (320, 320, 3, 2, 64), (320, 640, 3, 1, 32), (640, 640, 3, 1, 32),
          (320, 640, 1, 1, 32), (640, 640, 3, 2, 32), (640, 1280, 3, 1, 16), (1280, 1280, 3, 1, 16),
          (640, 1280, 1, 1, 16), (1280, 1280, 3, 2, 16), (1280, 1280, 3, 1, 8), (2560, 1280, 3, 1, 8),
          (2560, 1280, 1, 1, 8), (1920, 640, 3, 1, 32), (960, 320, 3, 1, 64), (640, 320, 3, 1, 64), (320, 4, 3, 1, 64)]
BATCHES = (1, 4)
PROBE = {  # name: (allocator, cudnn mode, hog GiB)
    "native_on": ("native", "on", 0), "async_on": ("async", "on", 0), "async_on_hog": ("async", "on", 100),
    "async_keep_cache": ("async", "on_keep_cache", 0), "async_off": ("async", "off", 0), "native_off": ("native", "off", 0),
}
PRODUCT = {  # name: (allocator, --cudnn-autotune)
    "native_auto": ("native", "auto"), "async_auto": ("async", "auto"), "async_keep_cache": ("async", "on_keep_cache"),
    "native_off": ("native", "off"), "async_on": ("async", "on"),
}
DEFAULT_PRODUCT = "native_auto,async_auto,async_keep_cache,native_off"


def environment(allocator: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if allocator == "async":
        env["PYTORCH_CUDA_ALLOC_CONF"] = ASYNC
    return env


def run_limited(cmd: list[str], env: dict, limit: float, log_path: Path) -> dict:
    """Run cmd with a hard wall-clock limit (its whole process group killed at the limit); the child's own wall,
    user and system seconds from wait4."""
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - t0 > limit:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": round(time.monotonic() - t0, 2), "user_s": round(usage.ru_utime, 2),
            "sys_s": round(usage.ru_stime, 2), "returncode": proc.returncode, "timed_out": timed_out,
            "limit_s": limit, "log_tail": log_path.read_text(errors="replace")[-1500:]}


# --- the probe's child --------------------------------------------------------------------------------------------

def probe_child(mode: str, hog_gib: float, progress_path: str, out_path: str) -> None:
    import resource
    import torch
    from comfy_rapm import convolutions
    assert torch.cuda.is_available(), "the probe needs a GPU"
    device = torch.device("cuda")
    hog = torch.empty(int(hog_gib * 2**30), dtype=torch.uint8, device=device) if hog_gib else None
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    torch.cuda.reset_peak_memory_stats()
    convolutions.mode = mode
    g = torch.Generator(device=device).manual_seed(0)
    layers = []
    for cin, cout, k, stride, hw in SHAPES:
        w = (torch.randn(cout, cin, k, k, device=device, generator=g) / (cin * k * k) ** 0.5).bfloat16().requires_grad_()
        layers.append((w, stride, k // 2, cin, hw))

    def one_pass(record=None):
        done = 0
        for batch in BATCHES:
            for w, stride, pad, cin, hw in layers:
                x = torch.randn(batch, cin, hw, hw, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
                y = torch.nn.functional.conv2d(x, w, stride=stride, padding=pad)
                y.float().square().mean().backward()
                torch.cuda.synchronize()
                done += 3  # forward, backward-data, backward-weight
                if record:
                    record(done)

    started, usage0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)

    def record(done):
        u = resource.getrusage(resource.RUSAGE_SELF)
        with open(progress_path, "a") as f:
            f.write(json.dumps({"searches": done, "elapsed_s": time.perf_counter() - started,
                                "sys_s": u.ru_stime - usage0.ru_stime, "user_s": u.ru_utime - usage0.ru_utime}) + "\n")
    with convolutions.autotuned() as plan:
        one_pass(record)  # the first pass tunes (where autotuning is on)
        tuning_s = time.perf_counter() - started
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        reserved_peak = torch.cuda.max_memory_reserved()
        used_after_tuning = torch.cuda.mem_get_info()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            one_pass()
            times.append(time.perf_counter() - t0)
    times.sort()
    free_end, total = torch.cuda.mem_get_info()
    result = {"plan": {"benchmark": plan.benchmark, "empty_cache_after_search": plan.empty_cache_after_search},
              "searches": 3 * len(SHAPES) * len(BATCHES), "hog_gib": hog_gib, "free_gib_before": free_before / 2**30,
              "tuning_pass_s": tuning_s, "tuning_sys_s": usage1.ru_stime - usage0.ru_stime,
              "tuning_user_s": usage1.ru_utime - usage0.ru_utime, "steady_pass_s_median": times[len(times) // 2],
              "reserved_peak_gib": reserved_peak / 2**30,
              "device_used_gib_after_tuning": (used_after_tuning[1] - used_after_tuning[0]) / 2**30,
              "device_used_gib_end": (total - free_end) / 2**30,
              "allocator": torch.cuda.memory.get_allocator_backend(), "torch": torch.__version__,
              "card": torch.cuda.get_device_name(0)}
    del hog
    Path(out_path).write_text(json.dumps(result, indent=1))


def last_progress(path: Path) -> dict | None:
    if not path.is_file():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else None


def run_probe(name: str, limit: float, work: Path) -> dict:
    allocator, mode, hog = PROBE[name]
    progress, out = work / f"{name}.progress", work / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--hog-gib", str(hog),
           "--progress", str(progress), "--child-out", str(out)]
    r = run_limited(cmd, environment(allocator), limit, work / f"{name}.log")
    r.update(kind="probe", allocator=allocator, mode=mode)
    if out.is_file():
        r["result"] = json.loads(out.read_text())
    last = last_progress(progress)
    if last:
        r["progress"] = dict(last, seconds_per_search=last["elapsed_s"] / max(1, last["searches"]),
                             sys_fraction=last["sys_s"] / max(1e-9, last["elapsed_s"]))
    return r


def run_product(name: str, limit: float, work: Path, comfyui: str | None, model: str = "sd15") -> dict:
    allocator, mode = PRODUCT[name]
    out = work / f"perf_{name}.json"
    cmd = [sys.executable, str(REPO / "bench" / "perf.py"), "--models", model, "--variants", "checkpointing",
           "--warmup", "2", "--iterations", "6", "--skip-trajectories", "--skip-equivalence", "--cudnn-autotune", mode,
           "--out", str(out)] + (["--comfyui", comfyui] if comfyui else [])
    r = run_limited(cmd, environment(allocator), limit, work / f"perf_{name}.log")
    r.update(kind="product", allocator=allocator, mode=mode)
    if out.is_file():
        report = json.loads(out.read_text())
        r["result"] = report.get("models", {}).get(model, {}).get("training", {}).get("checkpointing")
        r.update(card=report.get("card"), allocator_conf=report.get("allocator"), cudnn_autotune=report.get("cudnn_autotune"))
    return r


def table(results: dict) -> str:
    rows = [f"{'case':22} {'alloc':6} {'mode':14} {'wall s':>7} {'sys s':>7} {'s/search':>9} {'tune s':>7} "
            f"{'steady s':>9} {'s/it':>7} {'reserved':>9} {'used':>7}  note"]
    for name, r in results.items():
        res = r.get("result") or {}
        prog = r.get("progress") or {}
        note = "TIMED OUT" if r.get("timed_out") else ("" if r.get("returncode") == 0 else f"rc {r.get('returncode')}")
        if r.get("skipped"):
            note = r["skipped"]
        per = (res["tuning_pass_s"] / res["searches"]) if res.get("searches") else prog.get("seconds_per_search")
        rows.append(f"{name:22} {r.get('allocator', ''):6} {r.get('mode', ''):14} {r.get('wall_s', float('nan')):7.1f} "
                    f"{r.get('sys_s', float('nan')):7.1f} {per if per is not None else float('nan'):9.3f} "
                    f"{res.get('tuning_pass_s', float('nan')):7.1f} {res.get('steady_pass_s_median', float('nan')):9.4f} "
                    f"{res.get('seconds_per_iteration', float('nan')):7.3f} "
                    f"{res.get('reserved_peak_gib', res.get('peak_reserved_gib', float('nan'))):9.1f} "
                    f"{res.get('device_used_gib_after_tuning', res.get('device_used_gib_after', float('nan'))):7.1f}  {note}")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="probe,product")
    p.add_argument("--probe-cases", default=",".join(PROBE))
    p.add_argument("--product-cases", default=DEFAULT_PRODUCT)
    p.add_argument("--probe-limit", type=float, default=100.0, help="seconds per probe case")
    p.add_argument("--product-limit", type=float, default=150.0, help="seconds per product case")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole call; cases that would not fit are skipped")
    p.add_argument("--model", default="sd15", help="the product part's model (tiny: the CPU miniature in CI)")
    p.add_argument("--comfyui", default=None)
    p.add_argument("--out", default=None)
    # the probe's child process
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--hog-gib", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--progress", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        sys.path.insert(0, str(REPO))
        probe_child(args.child, args.hog_gib, args.progress, args.child_out)
        return 0
    started = time.monotonic()
    report = {"command": "python bench/async_autotune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "host": platform.node(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        plan = []
        if "probe" in args.parts.split(","):
            plan += [("probe", c, args.probe_limit) for c in args.probe_cases.split(",") if c]
        if "product" in args.parts.split(","):
            plan += [("product", c, args.product_limit) for c in args.product_cases.split(",") if c]
        for kind, name, limit in plan:
            key = f"{kind}:{name}"
            left = args.budget - (time.monotonic() - started)
            if left < min(limit, 30.0):
                report["cases"][key] = {"skipped": f"budget ({left:.0f} s left)"}
                continue
            limit = min(limit, left)
            r = run_probe(name, limit, work) if kind == "probe" else run_product(name, limit, work, args.comfyui, args.model)
            report["cases"][key] = r
            print(f"{key}: " + json.dumps({k: v for k, v in r.items() if k != "log_tail"}), flush=True)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    report["wall_seconds"] = time.monotonic() - started
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + table(report["cases"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
