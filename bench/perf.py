"""GPU speed and memory of RAPM on full-size SD1.5 / SDXL UNets with random weights (cost does not
depend on the values), built with ComfyUI's own model classes and dtype choice as a checkpoint
would load, measured through the same code the nodes run (comfy_rapm.session / trainer), against
the plain slot-by-slot reference of Alg. 2 (comfy_rapm/reference.py).

    python bench/perf.py --out bench/results/perf.json

With no options it measures what the issue's targets need, for SD1.5 and SDXL, in one GPU call of
under ten minutes (H100): trajectories at the node's default batch size; the node's default
training configuration (`checkpointing`), the 12 GB one (`checkpointing+heads1x1`), checkpointing off
(`default`), the low-memory mode and the reference; the SD1.5 equivalence check. The ablations
(`no_step_graphs`: per-pass graphs instead of each side's whole step, `no_graded_graphs`, `no_cuda_graphs`,
`low_memory` alone, `no_paired`) and the option `targets_graph` (the targets as one graph, the student's chain on a
second stream) run when named in --variants.
Prints a table last; writes JSON with the card, torch version, date and this command."""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

UNET = {
    "sd15": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
             "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
             "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "use_temporal_attention": False, "use_temporal_resblock": False},
    "sdxl": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
             "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
             "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False},
}
# A miniature SD1.5-shaped UNet, so CI can run this script end to end on a CPU.
UNET["tiny"] = dict(UNET["sd15"], model_channels=32, channel_mult=[1, 2], num_res_blocks=[1, 1], transformer_depth=[1, 1],
                    transformer_depth_output=[1, 1, 1, 1], num_heads=2)
RESOLUTION = {"sd15": 512, "sdxl": 1024, "tiny": 64}
POOLED = {"sd15": 768, "sdxl": 1280, "tiny": 768}
# (warm-up, timed) iterations per model unless --warmup/--iterations say otherwise: SDXL's reference
# and low-memory mode take 2-3 s per iteration, so fewer there keeps the default run in one call.
ITERATIONS = {"sd15": (4, 10), "sdxl": (2, 6), "tiny": (4, 10)}
DEFAULT_VARIANTS = "checkpointing,checkpointing+heads1x1,default,low_memory+checkpointing,reference"
VARIANT_PARTS = {"default", "low_memory", "checkpointing", "no_cuda_graphs", "no_graded_graphs", "reference", "heads1x1",
                 "no_paired", "no_step_graphs", "targets_graph"}
# no_paired: Config(paired_iterations=False), the discriminators' iteration not batched with the next one's no-grad
# work; no_step_graphs: Config(step_graphs=False), per-pass graphs instead of each side's whole step; targets_graph:
# Config(targets_graph=True), the targets as one graph, the chain on a second stream


def import_host(comfyui: str | None):
    """The comfy.* modules the product uses, without the node registry or the server."""
    from headless.comfy_host import import_comfy
    import_comfy(comfyui)


def build_model(kind: str):
    import comfy.model_base as mb
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    config = (sm.SDXL if kind == "sdxl" else sm.SD15)(dict(UNET[kind]))
    params = {"sd15": 860_000_000, "sdxl": 2_570_000_000, "tiny": 2_000_000}[kind]
    dtype = mm.unet_dtype(model_params=params, supported_dtypes=config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, mm.get_torch_device(), config.supported_inference_dtypes))
    device = mm.get_torch_device()
    # Built under inference mode, as ComfyUI's loader nodes make weights: inference tensors.
    with torch.inference_mode():
        model = (mb.SDXL if kind == "sdxl" else mb.BaseModel)(config, device=device)
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for name, p in model.diffusion_model.named_parameters():
                if p.ndim >= 2:
                    p.normal_(0, 1.0 / (p[0].numel() ** 0.5), generator=g)
                elif name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0, 0.02, generator=g)
        model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())
    count = sum(p.numel() for p in model.diffusion_model.parameters())
    return patcher, dtype, count


def conditioning(kind: str, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, 77, UNET[kind]["context_dim"], generator=g)
    extra = {"pooled_output": torch.randn(batch, POOLED[kind], generator=g)}
    if kind == "sdxl":
        extra.update(width=1024, height=1024, crop_w=0, crop_h=0, target_width=1024, target_height=1024)
    return [[cond, extra]]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_ms(fn) -> float:
    """fn() alone on the device: milliseconds from a synchronised start to a synchronised end."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1e3


def peak_gib() -> float:
    """Peak memory held by tensors (allocations made while a CUDA graph replays are not counted)."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def peak_reserved_gib() -> float:
    """Peak memory PyTorch held from the driver: tensors, CUDA graph pools and the allocator's cache —
    what the card must have (plus the CUDA context)."""
    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else float("nan")


def device_used_gib() -> float:
    """Memory in use on the whole device now (driver's view: this process with its CUDA context, and any other)."""
    if not torch.cuda.is_available():
        return float("nan")
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def pool_sizes_gib(segments: list, names: dict) -> dict:
    """Reserved GiB per allocator pool from a memory snapshot's segments (`segment_pool_id`; (0, 0) is the default
    pool), named by `names` (pool handle → name) where known."""
    sizes: dict = {}
    for segment in segments:
        pool = tuple(segment.get("segment_pool_id", (0, 0)))
        name = "default" if pool == (0, 0) else names.get(pool, f"pool {pool[0]}.{pool[1]}")
        sizes[name] = sizes.get(name, 0.0) + segment["total_size"] / 2**30
    return sizes


def graph_pools_gib(sess) -> dict:
    """The native allocator's reserved memory per pool now: the default pool, the per-pass graphs', the step graphs'
    (and the graded per-pass graphs' own); {} elsewhere (cudaMallocAsync has no pools, the CPU no allocator)."""
    if not torch.cuda.is_available() or torch.cuda.memory.get_allocator_backend() != "native":
        return {}
    names = {}
    for name, graphs in (("pass_graphs", sess.graphs), ("step_graphs", sess.step_graphs)):
        if graphs is not None and graphs.pool is not None:
            names[tuple(graphs.pool)] = name
    return pool_sizes_gib(torch.cuda.memory._snapshot()["segments"], names)


def reset_peak():
    gc.collect()  # a finished session's graphs and tensors, before the cache is emptied
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure_trajectories(patcher, kind, batch, steps, fine_steps):
    """Teacher trajectories through session.teacher_positions (the node's code), timed per batch."""
    from comfy_rapm import schedule, session
    latent = RESOLUTION[kind] // 8
    slots = schedule.slot_timesteps(steps, fine_steps)
    pos, neg = conditioning(kind, batch, 1), conditioning(kind, batch, 2)
    noise = torch.randn(batch, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        session.teacher_positions(patcher, pos, neg, noise, schedule.slot_timesteps(steps, 1), 5.0)  # warm-up
        reset_peak()
        sync()
        t0 = time.perf_counter()
        out = session.teacher_positions(patcher, pos, neg, noise, slots, 5.0)
        sync()
        seconds = time.perf_counter() - t0
    assert torch.isfinite(out).all()
    return {"batch_size": batch, "steps": steps, "fine_steps": fine_steps, "seconds_per_batch": seconds,
            "trajectories_per_min": 60.0 * batch / seconds, "peak_gib": peak_gib(), "peak_reserved_gib": peak_reserved_gib(),
            "minutes_per_1000": 1000 / (60.0 * batch / seconds)}


def synthetic_set(folder, patcher, kind, count, steps):
    """A trajectory set on disk with random positions (training cost does not depend on them)."""
    from comfy_rapm import host, trajectories
    latent = RESOLUTION[kind] // 8
    shape = (4, latent, latent)
    spec = trajectories.Spec(prompts=["p"], negative_prompt="", width=RESOLUTION[kind], height=RESOLUTION[kind],
                             count=count, steps=steps, fine_steps=25, cfg=5.0, seed=0, batch_size=count,
                             model=host.model_info(patcher, shape))
    store = trajectories.Store.open(folder, spec)

    def run_batch(prompts, seeds):
        pos, neg = conditioning(kind, len(seeds), 1), conditioning(kind, len(seeds), 2)
        positions = torch.randn((len(seeds), steps + 1) + shape, generator=torch.Generator().manual_seed(0))
        pt, pe = trajectories.conditioning_tensors(pos, "positive")
        nt, ne = trajectories.conditioning_tensors(neg, "negative")
        return dict(positions=positions, **pt, **nt), {"positive_extra": pe, "negative_extra": ne}
    trajectories.generate(store, run_batch)
    return trajectories.TrajectorySet(folder)


def make_config(kind, iterations, rank, **overrides):
    """The node's configuration for this model family (comfy_rapm/presets.py), with `overrides` on top."""
    from comfy_rapm import presets, settings
    preset = presets.for_teacher(kind == "sdxl")
    family = presets.resolve(preset, 1000, discriminator_kernel=overrides.pop("discriminator_kernel", None))
    return settings.Config(iterations=iterations, lora_rank=rank, lora_alpha=preset.lora_alpha,
                           discriminator_learning_rate=preset.discriminator_learning_rate, checkpoint_every=10**9,
                           **family, **overrides)


def reference_iteration(tr):
    from comfy_rapm.reference import reference_backward
    student_turn = tr.iteration % 2 == 1
    draws = tr.draw()
    reference_backward(tr, draws, student_turn)
    (tr.student_opt if student_turn else tr.disc_opt).step()
    tr.iteration += 1


def variant_parts(variant: str) -> set:
    parts = set(variant.split("+"))  # default, or options joined by '+'
    unknown = parts - VARIANT_PARTS
    if unknown:
        raise ValueError(f"unknown variant part(s) {sorted(unknown)} in {variant!r}")
    return parts


def variant_config(kind, variant, iterations, rank):
    parts = variant_parts(variant)
    return make_config(
        kind, iterations, rank, low_memory="low_memory" in parts, gradient_checkpointing="checkpointing" in parts,
        cuda_graphs=False if parts & {"no_cuda_graphs", "reference"} else None,
        graded_graphs=False if "no_graded_graphs" in parts else None,
        discriminator_kernel=1 if "heads1x1" in parts else None, paired_iterations="no_paired" not in parts,
        step_graphs="no_step_graphs" not in parts, targets_graph="targets_graph" in parts)


def step_graphs_report(steps) -> dict | None:
    """What a cuda_graphs.StepGraphs did: its shapes, replays and whether (and why) a capture failed."""
    return None if steps is None else {"shapes": len(steps.graphs), "replays": steps.replays, "failed": steps.failed,
                                       "error": steps.error}


def measure_training(patcher, tset, kind, variant, warmup, iterations, rank):
    from comfy_rapm import session
    parts = variant_parts(variant)
    reset_peak()
    sess = session.Session(patcher, tset, variant_config(kind, variant, warmup + iterations, rank))
    step = reference_iteration if "reference" in parts else (lambda tr: tr.run_iteration())

    def fit(tr):
        for _ in range(warmup):
            step(tr)
        sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(iterations):
            step(tr)
        sync()
        used = device_used_gib()  # graphs and their pools still held: the driver's view, whatever the allocator
        graphs = sess.graphs
        return (time.perf_counter() - t0) / iterations, {"device_used_gib_after": used, "pools_gib": graph_pools_gib(sess),
            "step_graphs": step_graphs_report(sess.step_graphs),
            **({"targets_graphs": step_graphs_report(sess.targets_graphs)} if sess.targets_graphs is not None else {}),
            "cuda_graphs": None if graphs is None else {"shapes": len(graphs.graphs), "replays": graphs.replays,
                                                        "failed": graphs.failed, "graded": graphs.graded,
                                                        "busy": graphs.busy, "error": graphs.error}}
    try:
        seconds, extra = sess.run(fit)
        result = {"seconds_per_iteration": seconds, "peak_gib": peak_gib(), "peak_reserved_gib": peak_reserved_gib(), "iterations_timed": iterations,
                  "warmup": warmup, "lora_rank": rank, "lora_parameters": sum(p.numel() for p in sess.lora.parameters()),
                  **extra}
    except torch.OutOfMemoryError:
        result = {"error": "out of memory", "peak_gib": peak_gib()}
    del sess
    return result


def measure_parts(patcher, tset, kind, variant, warmup, repeats, rank):
    """Where an iteration's time goes: after `warmup` iterations of `variant` (graphs captured), each part of an
    iteration run alone, synchronised before and after, its median over `repeats` in ms. In an iteration the parts
    partly overlap (the host queues the next while the device runs one), so their sum exceeds it by that overlap.
    `sample_evaluations`: UNet evaluations per part (a backward counts two), the unit of the floor in bench/NOTES.md."""
    from statistics import median
    from comfy_rapm import session
    reset_peak()
    sess = session.Session(patcher, tset, variant_config(kind, variant, warmup + 4 * repeats + 2, rank))

    def fit(tr):
        n, cfg = tr.steps, tr.config
        for _ in range(warmup):
            tr.run_iteration()
        times: dict[str, list] = {}

        def record(name, fn):
            times.setdefault(name, []).append(timed_ms(fn))

        for _ in range(repeats):
            draws, following = tr.draw(), tr.draw()
            positions = tr.data.positions[draws.index].to(tr.device, torch.float32)
            cond = tr.data.conditioning(draws.index)
            holder = {}
            with torch.no_grad():
                record("targets", lambda: holder.update(targets=tr.targets(positions, cond)))
                record("teacher_delta_step", lambda: holder.update(delta=tr.ddim_step(
                    positions[:-1], tr.s_from, tr.s_delta, cond, tr.data.cfg, student=False)))
                record("frozen_student_step", lambda: tr.ddim_step(holder["delta"], tr.s_delta, tr.s_to, cond, 1.0,
                                                                   student=True))
                record("paired_targets", lambda: tr.paired_targets(draws, following))
            targets = holder["targets"]
            if cfg.uses_gan:
                record("discriminator_step", lambda: tr.backward(draws, False, targets))
                record("discriminator_optimizer", lambda: tr.optimizer_step(False))
            record("student_step", lambda: tr.backward(draws, True, targets))
            record("student_optimizer", lambda: tr.optimizer_step(True))
            record("iteration_pair", lambda: (tr.run_iteration(), tr.run_iteration()))
        out = {name: median(values) for name, values in times.items()}
        out["iteration"] = out.pop("iteration_pair") / 2
        out["chain_and_rest_of_targets"] = out["targets"] - out["teacher_delta_step"] - out["frozen_student_step"]
        out["sample_evaluations"] = {"targets": n + 2 * n + n, "discriminator_step": 3 * n if cfg.uses_gan else 0,
                                     "student_step": 3 * n + (3 * n if cfg.uses_gan else 0)}
        return out
    try:
        result = sess.run(fit)
        result.update(variant=variant, repeats=repeats, warmup=warmup, unit="ms")
    except torch.OutOfMemoryError:
        result = {"error": "out of memory"}
    del sess
    return result


def profile_training(patcher, tset, kind, warmup, rank, out_path=None):
    """torch.profiler over one discriminator and one student iteration of the default variant: the
    GPU's busy time vs the wall time, the top CUDA kernels and the time per labelled model call."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from comfy_rapm import session
    sess = session.Session(patcher, tset, make_config(kind, warmup + 2, rank))

    def labelled(name, fn):
        def call(*args, **kwargs):
            grad = "grad" if torch.is_grad_enabled() else "nograd"
            lora = "student" if sess.lora.enabled else "teacher"
            with record_function(f"rapm/{name}/{lora}/{grad}/b{args[0].shape[0]}"):
                return fn(*args, **kwargs)
        return call

    def run(tr):
        tr.model = labelled("unet", tr.model)
        tr.features = labelled("backbone", tr.features)
        for _ in range(warmup):
            tr.run_iteration()
        sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(2):
                with record_function("rapm/iteration"):
                    tr.run_iteration()
            sync()
            wall = time.perf_counter() - t0
        return prof, wall
    prof, wall = sess.run(run)
    events = prof.key_averages()
    device_time = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))  # noqa: E731
    kernels = sum(device_time(e) for e in events) / 1e6
    lines = [f"[{kind}] profile of 2 iterations (D + student): wall {wall:.3f} s, GPU kernels {kernels:.3f} s "
             f"({100 * kernels / wall:.0f}% busy), {sum(e.count for e in events if device_time(e) > 0)} kernel launches"]
    labels = [e for e in events if e.key.startswith("rapm/")]
    lines.append(f"{'call':45} {'count':>5} {'CPU ms':>9} {'GPU ms':>9}")
    for e in sorted(labels, key=lambda e: -e.cpu_time_total):
        gpu = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
        lines.append(f"{e.key:45} {e.count:5d} {e.cpu_time_total / 1e3:9.1f} {gpu / 1e3:9.1f}")
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    lines.append(events.table(sort_by=sort, row_limit=30, max_name_column_width=60))
    text = "\n".join(lines)
    print(text, flush=True)
    if out_path:
        Path(out_path).write_text(text + "\n")
    del sess
    return {"wall_seconds_2_iterations": wall, "gpu_kernel_seconds": kernels}


def gradients(tr, student_turn: bool) -> list[torch.Tensor]:
    module = tr.lora if student_turn else tr.discriminators
    return [p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
            for p in module.parameters()]


def rel_diff(a: list, b: list) -> float:
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    return num / max(sum(float(y.pow(2).sum()) for y in b) ** 0.5, 1e-30)


@contextlib.contextmanager
def strict_kernels(enabled: bool):
    """Deterministic kernels and no TF32 (fp32 convolutions and matmuls in full fp32), restored on exit; cuBLAS
    also needs CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before it starts."""
    if not enabled:
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled())
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic,
         torch.backends.cudnn.benchmark) = saved[:4]
        torch.use_deterministic_algorithms(saved[4])


def check_equivalence(patcher, tset, kind, rank, precision="auto", gradient_checkpointing=False, step_graphs=True,
                      targets_graph=False):
    """Product vs reference on the same draws: loss and gradients (bf16 with precision auto); with
    CUDA graphs, graph replays vs eager for the no-grad passes and for both sides' gradients (with `step_graphs`,
    each side's whole step as one graph; else per-pass graphs; with `targets_graph`, the targets as one graph)."""
    from comfy_rapm.reference import compare_with_product
    from comfy_rapm import session
    sess = session.Session(patcher, tset, make_config(kind, 2, rank, precision=precision,
                                                      gradient_checkpointing=gradient_checkpointing,
                                                      step_graphs=step_graphs, targets_graph=targets_graph))

    def check(tr):
        torch.manual_seed(0)  # the same student in every run
        with torch.no_grad():
            for layer in tr.lora.layers:
                layer.up.normal_(std=1e-3)
        out = {}
        if sess.graphs is not None:  # the no-grad part of an iteration, replayed from graphs vs eager
            positions = tr.data.positions[0].to(tr.device, torch.float32)
            cond = tr.data.conditioning(0)
            targets_graphs = tr.targets_graphs
            sess.graphs.enabled, tr.targets_graphs = False, None
            eager = tr.targets(positions, cond)
            sess.graphs.enabled, tr.targets_graphs = True, targets_graphs
            graphed = [tuple(t.clone() for t in tr.targets(positions, cond)) for _ in range(2)][-1]  # capture, replay
            sess.graphs.enabled, tr.targets_graphs = False, None
            eager_again = tr.targets(positions, cond)
            sess.graphs.enabled, tr.targets_graphs = True, targets_graphs
            rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
            out["cuda_graphs_vs_eager"] = {"rel_diff": max(rel(g, e) for g, e in zip(graphed, eager_again)),
                                           "eager_repeat_rel_diff": max(rel(a, e) for a, e in zip(eager, eager_again)),
                                           "replays": sess.graphs.replays, "failed": sess.graphs.failed}
            step_graphs = tr.step_graphs
            for student_turn in (True, False):  # both sides' gradients: graphs (capture, then replay) vs eager
                draws = tr.draw()
                sess.graphs.enabled, tr.step_graphs = True, step_graphs
                for _ in range(2):
                    tr.backward(draws, student_turn)
                graphed_grads = gradients(tr, student_turn)
                sess.graphs.enabled, tr.step_graphs = False, None
                tr.backward(draws, student_turn)
                eager_grads = gradients(tr, student_turn)
                tr.backward(draws, student_turn)  # eager again: how far eager differs from itself (atomics)
                eager_again = gradients(tr, student_turn)
                sess.graphs.enabled, tr.step_graphs = True, step_graphs
                side = "student" if student_turn else "discriminator"
                out["cuda_graphs_vs_eager"][f"{side}_grad_rel_diff"] = rel_diff(graphed_grads, eager_grads)
                out["cuda_graphs_vs_eager"][f"{side}_grad_eager_repeat_rel_diff"] = rel_diff(eager_again, eager_grads)
            out["cuda_graphs_vs_eager"].update(shapes=len(sess.graphs.graphs), graded=sess.graphs.graded,
                                               failed=sess.graphs.failed, error=sess.graphs.error)
            for name, kept in (("step_graphs", step_graphs), ("targets_graphs", targets_graphs)):
                if kept is not None:
                    out["cuda_graphs_vs_eager"][name] = step_graphs_report(kept)
        out["reference_compared_with_graphs"] = sess.graphs is not None
        for student_turn in (True, False):
            c = compare_with_product(tr, student_turn)
            out["student" if student_turn else "discriminator"] = {
                "loss_rel_diff": abs(c["product_loss"] - c["reference_loss"]) / abs(c["reference_loss"]),
                "grad_rel_diff": c["grad_rel_diff"]}
        return out
    try:
        return sess.run(check)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    finally:
        del sess


ALLOCATOR_CONF = {"native": None, "cudaMallocAsync": "backend:cudaMallocAsync"}


def run_allocators(args, argv: list[str]) -> int:
    """`--allocators`: this command under each allocator (the environment variable ComfyUI's launcher sets), one
    process per allocator and model (`--isolate allocator`: cuDNN's autotuning, ~1 min natively, runs once) or per
    measurement (`--isolate unit`: a hang or crash costs one measurement), merged into one report with the ratio
    cudaMallocAsync / native."""
    from bench.async_autotune import run_limited
    allocators = [a for a in args.allocators.split(",") if a]
    unknown = set(allocators) - set(ALLOCATOR_CONF)
    if unknown:
        raise ValueError(f"--allocators: unknown {sorted(unknown)}; use {', '.join(ALLOCATOR_CONF)}")
    common = ["--rank", str(args.rank), "--traj-fine-steps", str(args.traj_fine_steps), "--cudnn-autotune", args.cudnn_autotune,
              "--equivalence-precision", args.equivalence_precision]
    for flag, value in (("--warmup", args.warmup), ("--iterations", args.iterations), ("--traj-batch", args.traj_batch),
                        ("--resolution", args.resolution), ("--comfyui", args.comfyui)):
        if value is not None:
            common += [flag, str(value)]
    if args.force_cuda_graphs:
        common.append("--force-cuda-graphs")
    report = {"command": "python bench/perf.py " + " ".join(argv), "allocators": {},
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    started = time.perf_counter()

    def save():
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        for allocator in allocators:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
            if ALLOCATOR_CONF[allocator]:
                env["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_CONF[allocator]
            entry = report["allocators"][allocator] = {"models": {}, "processes": {}}
            for kind in args.models.split(","):
                equivalence = not args.skip_equivalence and kind in args.equivalence_models.split(",")
                if args.isolate == "allocator":
                    units = [("all", ["--variants", args.variants, "--equivalence-models", kind]
                              + (["--skip-trajectories"] if args.skip_trajectories else [])
                              + ([] if equivalence else ["--skip-equivalence"]))]
                else:
                    units = [] if args.skip_trajectories else [("trajectories", ["--variants", "", "--skip-equivalence"])]
                    units += [(v, ["--variants", v, "--skip-trajectories", "--skip-equivalence"]) for v in args.variants.split(",") if v]
                    if equivalence:
                        units.append(("equivalence", ["--variants", "", "--skip-trajectories", "--equivalence-models", kind]))
                limit = args.unit_timeout or (300.0 if args.isolate == "unit" else 580.0)
                for unit, flags in units:
                    out = Path(tmp) / f"{allocator}_{kind}_{unit}.json".replace("+", "_")
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--models", kind, *flags, *common, "--out", str(out)]
                    process = run_limited(cmd, env, limit, Path(tmp) / (out.stem + ".log"))
                    entry["processes"][f"{kind}/{unit}"] = process
                    if out.is_file():
                        child = json.loads(out.read_text())
                        for key in ("card", "torch", "allocator", "allocator_backend", "cudnn_autotune"):
                            entry.setdefault(key, child.get(key))
                        model = entry["models"].setdefault(kind, {})
                        for key, value in child.get("models", {}).get(kind, {}).items():
                            if key == "training":
                                model.setdefault("training", {}).update(value)
                            else:
                                model[key] = value
                    state = "TIMED OUT" if process["timed_out"] else f"rc {process['returncode']}"
                    print(f"[{allocator}] {kind}/{unit}: {state}, {process['wall_s']:.0f} s wall, {process['sys_s']:.0f} s system",
                          flush=True)
                    save()
    report["wall_seconds"] = time.perf_counter() - started
    report["comparison"] = allocator_comparison(report)
    save()
    print(f"\n{report['wall_seconds'] / 60:.1f} min; {'model':6} {'variant':26} " + " ".join(f"{a + ' s/it':>22}" for a in allocators)
          + "  ratio   reserved / device-used GiB")
    for row in report["comparison"]:
        times = " ".join(f"{row['seconds_per_iteration'].get(a, float('nan')):22.3f}" for a in allocators)
        memory = "  ".join(f"{a}: {row['peak_reserved_gib'].get(a, float('nan')):.1f} / {row['device_used_gib_after'].get(a, float('nan')):.1f}"
                           for a in allocators)
        variant = row["variant"] + (" (s per batch)" if row["variant"] == "trajectories" else "")
        print(f"{row['model']:6} {variant:26} {times}  {row.get('ratio', float('nan')):5.2f}   {memory}")
    return 0


def allocator_comparison(report: dict) -> list[dict]:
    """One row per model and measurement: s/it (trajectories: s per batch) under each allocator, memory, and the ratio
    cudaMallocAsync / native where both ran."""
    rows = []
    allocators = report["allocators"]
    names = {(kind, variant) for a in allocators.values() for kind, m in a["models"].items() for variant in m.get("training", {})}
    names |= {(kind, "trajectories") for a in allocators.values() for kind, m in a["models"].items() if "trajectories" in m}
    for kind, variant in sorted(names):
        row = {"model": kind, "variant": variant, "seconds_per_iteration": {}, "peak_reserved_gib": {}, "device_used_gib_after": {}}
        for allocator, entry in allocators.items():
            m = entry["models"].get(kind, {})
            r = m.get("trajectories") if variant == "trajectories" else m.get("training", {}).get(variant)
            if not r or "error" in r:
                continue
            row["seconds_per_iteration"][allocator] = r.get("seconds_per_batch", r.get("seconds_per_iteration"))
            row["peak_reserved_gib"][allocator] = r.get("peak_reserved_gib", float("nan"))
            row["device_used_gib_after"][allocator] = r.get("device_used_gib_after", float("nan"))
        times = row["seconds_per_iteration"]
        if "native" in times and "cudaMallocAsync" in times and times["native"]:
            row["ratio"] = times["cudaMallocAsync"] / times["native"]
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sd15,sdxl")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help="comma-separated; each 'default' or parts joined by '+': " + ", ".join(sorted(VARIANT_PARTS - {"default"})))
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first; default per model (warm-up, timed): " + str(ITERATIONS))
    p.add_argument("--iterations", type=int, default=None,
                   help="timed iterations (an even number: D and student steps); default per model (warm-up, timed): " + str(ITERATIONS))
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--traj-batch", default=None, help="batch sizes, comma-separated; default: the node's default")
    p.add_argument("--traj-fine-steps", type=int, default=25)
    p.add_argument("--skip-trajectories", action="store_true")
    p.add_argument("--skip-equivalence", action="store_true")
    p.add_argument("--equivalence-models", default="sd15,tiny",
                   help="models the equivalence check runs on (SDXL's reference and product at once need ~50 GiB)")
    p.add_argument("--equivalence-precision", default="auto", help="comma-separated: auto (bf16 on the GPU), fp32; options joined by '+': checkpointing "
                   "(gradient checkpointing on), deterministic (deterministic kernels, no TF32), per_pass (per-pass graphs "
                   "instead of each side's whole step as one graph), targets_graph (Config.targets_graph), e.g. fp32+deterministic")
    p.add_argument("--parts", default=None, metavar="VARIANT",
                   help="also time each part of an iteration of this variant alone (measure_parts), e.g. checkpointing")
    p.add_argument("--profile", default=None, help="also profile two iterations of the default variant; write the table here")
    p.add_argument("--resolution", type=int, default=None, help="override the pixel size (smoke tests only)")
    p.add_argument("--force-cuda-graphs", action="store_true",
                   help="use CUDA graphs even where the product turns them off (a non-native allocator): to investigate")
    p.add_argument("--cudnn-autotune", default="auto", choices=["auto", "on", "off", "on_keep_cache"],
                   help="cuDNN autotuning (comfy_rapm/convolutions.py): auto = the product's choice (on natively, off under "
                        "cudaMallocAsync); the others force it for A/B runs")
    p.add_argument("--allocators", default=None,
                   help="comma-separated: native, cudaMallocAsync. Runs every measurement (trajectories, each variant, the "
                        "equivalence check) in its own process under each allocator and compares them")
    p.add_argument("--isolate", choices=["allocator", "unit"], default="allocator",
                   help="with --allocators: one process per allocator and model, or per measurement")
    p.add_argument("--unit-timeout", type=float, default=None,
                   help="with --allocators: seconds per process (default 580 per allocator and model, 300 per measurement)")
    p.add_argument("--comfyui", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.allocators:
        return run_allocators(args, argv if argv is not None else sys.argv[1:])
    import_host(args.comfyui)
    from comfy_rapm import convolutions
    convolutions.mode = args.cudnn_autotune
    if args.force_cuda_graphs:
        from comfy_rapm import cuda_graphs
        cuda_graphs.parameter_graphs_unsupported_reason = lambda: None
    if args.resolution:
        RESOLUTION.update({k: args.resolution for k in RESOLUTION})
    from comfy_rapm import trajectories
    chosen = [int(b) for b in args.traj_batch.split(",")] if args.traj_batch else []
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    report = {"command": "python bench/perf.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "card": card, "torch": torch.__version__, "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "native"),
              "allocator_backend": torch.cuda.memory.get_allocator_backend() if torch.cuda.is_available() else "none (CPU)",
              "cudnn_autotune": args.cudnn_autotune,
              "forced_cuda_graphs": args.force_cuda_graphs, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "models": {}}
    def save():  # after every measurement, so a run cut short still leaves what it measured
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")

    started_run = time.perf_counter()
    for kind in args.models.split(","):
        entry = report["models"][kind] = {}
        t0 = time.perf_counter()
        patcher, dtype, count = build_model(kind)
        warmup, iterations = ITERATIONS[kind]
        warmup = warmup if args.warmup is None else args.warmup
        iterations = iterations if args.iterations is None else args.iterations
        entry.update(unet_parameters=count, unet_dtype=str(dtype), resolution=RESOLUTION[kind], steps=4)
        print(f"[{kind}] built {count / 1e6:.0f}M params {dtype} in {time.perf_counter() - t0:.1f}s", flush=True)
        if not args.skip_trajectories:
            latent = RESOLUTION[kind] // 8
            batches = chosen or [trajectories.default_batch_size((latent, latent))]
            for batch in batches:
                key = "trajectories" if batch == batches[0] else f"trajectories_batch_{batch}"
                entry[key] = measure_trajectories(patcher, kind, batch, 4, args.traj_fine_steps)
                print(f"[{kind}] trajectories {entry[key]}", flush=True)
                save()
        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
            tset = synthetic_set(os.path.join(tmp, "set"), patcher, kind, count=8, steps=4)
            if args.parts:
                entry["parts"] = measure_parts(patcher, tset, kind, args.parts, warmup, 5, args.rank)
                print(f"[{kind}] parts {entry['parts']}", flush=True)
                save()
            if args.profile:
                entry["profile"] = profile_training(patcher, tset, kind, warmup, args.rank,
                                                    args.profile.replace("{model}", kind))
            entry["training"] = {}
            for variant in [v for v in args.variants.split(",") if v]:
                if kind == "sdxl" and "heads1x1" in variant.split("+"):
                    print(f"[{kind}] {variant}: skipped, the same as without heads1x1 (PCM's SDXL heads are 1x1)", flush=True)
                    continue
                started = time.perf_counter()
                r = measure_training(patcher, tset, kind, variant, warmup, iterations, args.rank)
                r["wall_seconds"] = time.perf_counter() - started  # set-up, captures and warm-up included
                entry["training"][variant] = r
                print(f"[{kind}] {variant}: {r}", flush=True)
                save()
            # last: a check that runs out of memory must not leave its memory to the measurements
            equivalence = not args.skip_equivalence and kind in args.equivalence_models.split(",")
            for item in args.equivalence_precision.split(",") if equivalence else []:
                precision, *options = item.split("+")
                if set(options) - {"checkpointing", "deterministic", "per_pass", "targets_graph"}:
                    raise ValueError(f"--equivalence-precision {item!r}: options are +checkpointing, +deterministic, "
                                     "+per_pass, +targets_graph")
                key = "_".join(["equivalence_bf16" if precision == "auto" else f"equivalence_{precision}"] + options)
                reset_peak()
                started = time.perf_counter()
                with strict_kernels("deterministic" in options):
                    entry[key] = check_equivalence(patcher, tset, kind, args.rank, precision, "checkpointing" in options,
                                                   "per_pass" not in options, "targets_graph" in options)
                entry[key]["wall_seconds"] = time.perf_counter() - started
                print(f"[{kind}] {key} {entry[key]}", flush=True)
                save()
        del patcher
        reset_peak()
    report["wall_seconds"] = time.perf_counter() - started_run
    save()
    print(f"\ncard: {card}  torch {torch.__version__}  {report['wall_seconds'] / 60:.1f} min")
    print(f"{'model':6} {'variant':26} {'s/it':>8} {'peak GiB':>9} {'reserved':>9}  20K it (h)")
    for kind, entry in report["models"].items():
        for variant, r in entry.get("training", {}).items():
            if "error" in r:
                print(f"{kind:6} {variant:26} {r['error']:>8}")
            else:
                print(f"{kind:6} {variant:26} {r['seconds_per_iteration']:8.3f} {r['peak_gib']:9.2f} {r['peak_reserved_gib']:9.2f}  {r['seconds_per_iteration'] * 20000 / 3600:.2f}")
        t = entry.get("trajectories")
        if t:
            print(f"{kind:6} trajectories (batch {t['batch_size']})  {t['trajectories_per_min']:.1f}/min, peak {t['peak_gib']:.2f} GiB, 1000 in {t['minutes_per_1000']:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
