"""Teacher trajectories per minute with 1 and with K processes (one GPU each), in one call: a
full-size SD1.5 UNet with random weights (bench/perf.py's), the node's batch size and M=25, through
the product's own code: comfy_rapm.session.trajectory_shard per shard, the trajectory store, and, with
K > 1, torchrun + headless/ranks.py (device per LOCAL_RANK, process group) + the store's multi-process
protocol (shares, journals, barrier, rank 0's manifest).

    python bench/dist_trajectories.py --out bench/results/perf.json      # a 2-GPU machine (≈ 6 min on H100s)
    python bench/dist_trajectories.py --model tiny --count 8 --batch 2 --fine-steps 2 --cpu   # a CPU check

Each run is timed from a barrier after every rank has built its model and warmed up (cuDNN autotuning)
to the set's last manifest write, so model building and process start-up are not counted. Writes (or
merges into) --out under "trajectories_multi_gpu": the rate per process count, the scaling over 1, and
whether the runs' shard files came out byte-identical (they need not on GPUs: autotuned kernels)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KEY = "trajectories_multi_gpu"
COUNT = {"sd15": 256, "sdxl": 64, "tiny": 8}  # a whole number of node-default batches per GPU at 2 GPUs


def worker(args) -> int:
    """One rank (or the only process): build the teacher, warm up, make the set, rank 0 reports."""
    from headless import ranks
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch starts CUDA: the teacher on the CPU too
    launch = ranks.start(argparse.Namespace(cpu=args.cpu, verbose=False, quiet=False, dist_timeout=args.dist_timeout))
    from bench import perf
    perf.import_host(args.comfyui)
    import torch
    from comfy_rapm import distributed, host, schedule, session, shared_store, trajectories
    kind = args.model
    patcher, dtype, params = perf.build_model(kind)
    latent = perf.RESOLUTION[kind] // 8
    shape = (4, latent, latent)
    batch = args.batch or trajectories.default_batch_size(shape)
    spec = trajectories.Spec(prompts=["p"], negative_prompt="", width=perf.RESOLUTION[kind], height=perf.RESOLUTION[kind],
                             count=args.count, steps=4, fine_steps=args.fine_steps, cfg=5.0, seed=0, batch_size=batch,
                             model=host.model_info(patcher, shape))
    slots = spec.slots()

    def run_batch(prompts, seeds):
        pos, neg = perf.conditioning(kind, len(seeds), seeds[0]), perf.conditioning(kind, len(seeds), seeds[0] + 1)
        noise = torch.cat([host.prepare_noise(torch.zeros((1,) + shape), s) for s in seeds])
        return session.trajectory_shard(patcher, pos, neg, noise, slots, spec.cfg)

    group = distributed.current()
    with torch.inference_mode():
        noise = torch.randn((batch,) + shape, generator=torch.Generator().manual_seed(0))
        session.teacher_positions(patcher, perf.conditioning(kind, batch, 1), perf.conditioning(kind, batch, 2), noise,
                                  schedule.slot_timesteps(4, 1), 5.0)  # warm-up (cuDNN autotuning), not timed
        perf.reset_peak()
        if group:
            group.barrier("waiting for every rank to build and warm up its model")
        perf.sync()
        started = time.perf_counter()
        store = shared_store.open_store(args.folder, spec)
        computed = sum(s.count for s in store.pending())
        trajectories.generate(store, run_batch)
        perf.sync()
        seconds = time.perf_counter() - started
    assert store.trajectory_set().manifest["complete"]
    rank = group.rank if group else 0
    if rank == 0:
        card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
        result = {"processes": group.world if group else 1, "seconds": seconds,
                  "trajectories_per_min": 60.0 * args.count / seconds, "count": args.count, "batch_size": batch,
                  "rank0_computed": computed, "card": card, "device": launch.device if launch else card,
                  "unet_parameters": params, "unet_dtype": str(dtype), "peak_reserved_gib_rank0": perf.peak_reserved_gib() if torch.cuda.is_available() else None}
        Path(args.result).write_text(json.dumps(result) + "\n")
    return 0


def _write_json_merged(path: Path, key: str, value: dict) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = value
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def driver(args, argv) -> int:
    import torch
    processes = [int(p) for p in args.processes.split(",")]
    if 1 not in processes:
        raise SystemExit("--processes must include 1 (the scaling is over one process)")
    if not args.cpu and torch.cuda.device_count() < max(processes):
        raise SystemExit(f"--processes {args.processes} needs {max(processes)} GPUs; {torch.cuda.device_count()} visible "
                         "(or pass --cpu)")
    count = args.count or COUNT[args.model]
    report = {"command": "python bench/dist_trajectories.py " + " ".join(argv), "torch": torch.__version__,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": args.model,
              "fine_steps": args.fine_steps, "count": count, "runs": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for k in processes:
            result = Path(tmp) / f"result_{k}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(k),
                   str(Path(__file__).resolve()), "--worker", "--folder", str(Path(tmp) / f"set_{k}"), "--result",
                   str(result), "--model", args.model, "--count", str(count), "--batch", str(args.batch),
                   "--fine-steps", str(args.fine_steps), "--dist-timeout", str(args.dist_timeout)]
            cmd += ["--cpu"] if args.cpu else []
            cmd += ["--comfyui", args.comfyui] if args.comfyui else []
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=str(REPO), env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
            if proc.returncode != 0 or not result.is_file():
                print(f"[{k} process(es)] failed with exit code {proc.returncode}", file=sys.stderr)
                return 1
            run = json.loads(result.read_text())
            run["wall_seconds_with_start_up"] = time.perf_counter() - t0
            report["runs"][str(k)] = run
            report.setdefault("card", run["card"])
            report.setdefault("batch_size", run["batch_size"])
            print(f"[{k} process(es)] {run['trajectories_per_min']:.1f} trajectories/min "
                  f"({run['count']} in {run['seconds']:.1f} s)", flush=True)
        base = report["runs"]["1"]["trajectories_per_min"]
        report["scaling_over_1"] = {k: r["trajectories_per_min"] / base for k, r in report["runs"].items()}
        sets = [Path(tmp) / f"set_{k}" for k in processes]
        first = {p.name: p.read_bytes() for p in sorted(sets[0].iterdir())}
        report["sets_byte_identical"] = all({p.name: p.read_bytes() for p in sorted(s.iterdir())} == first for s in sets[1:])
    report["wall_seconds"] = time.perf_counter() - started
    for k, x in report["scaling_over_1"].items():
        print(f"{k} process(es): {report['runs'][k]['trajectories_per_min']:.1f} trajectories/min, {x:.2f}x")
    print(f"sets byte-identical across runs: {report['sets_byte_identical']}")
    if args.out:
        _write_json_merged(Path(args.out), KEY, report)
        print(f"wrote {args.out} [{KEY!r}]")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15", choices=["sd15", "sdxl", "tiny"])
    p.add_argument("--processes", default="1,2", help="process counts to run, one GPU each (default 1,2)")
    p.add_argument("--count", type=int, default=0, help=f"trajectories per run (default per model: {COUNT})")
    p.add_argument("--batch", type=int, default=0, help="batch size (default: the node's, 32 for SD1.5)")
    p.add_argument("--fine-steps", type=int, default=25)
    p.add_argument("--cpu", action="store_true", help="processes on the CPU with gloo (a check of the script)")
    p.add_argument("--dist-timeout", type=float, default=600.0)
    p.add_argument("--comfyui", default=None)
    p.add_argument("--out", default=None, help="JSON file to write or merge the figures into")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return worker(args) if args.worker else driver(args, argv)


if __name__ == "__main__":
    sys.exit(main())
