"""bench/perf.py runs end to end (a miniature UNet on the CPU), so the GPU benchmark cannot rot."""
import json

import pytest

from bench import perf


def test_perf_script_runs_on_a_miniature(host, tmp_path):
    out = tmp_path / "perf.json"
    assert perf.main(["--models", "tiny", "--iterations", "2", "--warmup", "1", "--traj-fine-steps", "2", "--rank", "4",
                      "--equivalence-precision", "auto,fp32+deterministic,auto+checkpointing", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    tiny = report["models"]["tiny"]
    assert set(tiny["training"]) == set(perf.DEFAULT_VARIANTS.split(","))
    assert {"checkpointing", "reference", "low_memory+checkpointing"} <= set(tiny["training"])  # what the targets need
    assert all(r["seconds_per_iteration"] > 0 and r["wall_seconds"] >= r["seconds_per_iteration"] for r in tiny["training"].values())
    assert report["wall_seconds"] > 0
    assert tiny["trajectories"]["trajectories_per_min"] > 0
    assert tiny["equivalence_bf16"]["student"]["grad_rel_diff"] < 1e-4  # fp32 on the CPU
    # (discriminator gradients are not compared here: a hinge at its kink flips with rounding on some draws)
    assert tiny["equivalence_fp32_deterministic"]["student"]["grad_rel_diff"] < 1e-4
    # the graph-vs-eager comparison runs too (off CUDA both sides are eager through the graph wrapper)
    graphs = tiny["equivalence_bf16"]["cuda_graphs_vs_eager"]
    assert graphs["student_grad_rel_diff"] == 0 and graphs["discriminator_grad_rel_diff"] == 0 and graphs["graded"]
    assert tiny["equivalence_bf16_checkpointing"]["student"]["grad_rel_diff"] < 1e-4
    assert report["command"].startswith("python bench/perf.py") and report["torch"]


def test_perf_ablations_run_when_named(host, tmp_path):
    out = tmp_path / "perf.json"
    ablations = ["no_graded_graphs", "no_cuda_graphs", "low_memory", "low_memory+heads1x1", "checkpointing+no_paired",
                 "checkpointing+no_step_graphs", "checkpointing+targets_graph", "low_memory+no_cuda_graphs"]
    assert perf.main(["--models", "tiny", "--iterations", "2", "--warmup", "1", "--rank", "4", "--skip-trajectories",
                      "--skip-equivalence", "--variants", ",".join(ablations), "--out", str(out)]) == 0
    training = json.loads(out.read_text())["models"]["tiny"]["training"]
    assert set(training) == set(ablations) and all(r["seconds_per_iteration"] > 0 for r in training.values())
    assert all(r["pools_gib"] == {} for r in training.values())  # pools are the native CUDA allocator's
    assert training["checkpointing+no_paired"]["step_graphs"] == {"shapes": 0, "replays": 0, "failed": False, "error": None}
    assert training["checkpointing+no_step_graphs"]["step_graphs"] is None
    assert training["low_memory"]["step_graphs"] is not None  # low_memory steps through its step graphs by default
    assert training["low_memory+no_cuda_graphs"]["step_graphs"] is None


def test_perf_refuses_an_unknown_variant(host, tmp_path):
    with pytest.raises(ValueError, match="checkpoint"):
        perf.main(["--models", "tiny", "--skip-trajectories", "--skip-equivalence", "--variants", "checkpoint"])


def test_multi_gpu_trajectory_benchmark_runs_on_the_cpu(tmp_path):
    """bench/dist_trajectories.py (1 then 2 processes through torchrun) at toy size on gloo."""
    from bench import dist_trajectories
    out = tmp_path / "perf.json"
    out.write_text(json.dumps({"earlier": {"kept": True}}))
    assert dist_trajectories.main(["--model", "tiny", "--count", "4", "--batch", "2", "--fine-steps", "1", "--cpu",
                                   "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["earlier"] == {"kept": True}  # merged into the file, not overwriting it
    figures = report["trajectories_multi_gpu"]
    assert set(figures["runs"]) == {"1", "2"} and figures["runs"]["2"]["processes"] == 2
    assert figures["runs"]["1"]["rank0_computed"] == 4 and figures["runs"]["2"]["rank0_computed"] == 2
    assert all(r["trajectories_per_min"] > 0 for r in figures["runs"].values()) and figures["scaling_over_1"]["2"] > 0
    assert figures["sets_byte_identical"] is True  # on the CPU the two runs' files are the same bytes


@pytest.mark.parametrize("isolate, processes", [("unit", ["tiny/checkpointing", "tiny/default"]), ("allocator", ["tiny/all"])])
def test_perf_runs_the_measurements_under_each_allocator_in_their_own_processes(tmp_path, isolate, processes):
    """`--allocators` (issue #17): one process per allocator and model, or per measurement, the allocator set the way
    ComfyUI's launcher sets it (on the CPU the variable changes nothing; one allocator here to keep CI short, the
    ratio below)."""
    out = tmp_path / "perf.json"
    assert perf.main(["--models", "tiny", "--allocators", "cudaMallocAsync", "--variants", "checkpointing,default",
                      "--iterations", "2", "--warmup", "1", "--rank", "4", "--skip-trajectories", "--skip-equivalence",
                      "--isolate", isolate, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    entry = report["allocators"]["cudaMallocAsync"]
    assert entry["allocator"] == "backend:cudaMallocAsync" and entry["cudnn_autotune"] == "auto"
    assert sorted(entry["processes"]) == processes
    assert all(p["returncode"] == 0 and not p["timed_out"] and p["wall_s"] > 0 for p in entry["processes"].values())
    training = entry["models"]["tiny"]["training"]
    assert set(training) == {"checkpointing", "default"} and all(r["seconds_per_iteration"] > 0 for r in training.values())
    assert [row["variant"] for row in report["comparison"]] == ["checkpointing", "default"]
    assert all("ratio" not in row for row in report["comparison"])  # one allocator: nothing to compare with


def test_the_allocator_comparison_pairs_each_measurement():
    run = lambda s: {"seconds_per_iteration": s, "peak_reserved_gib": 11.0, "device_used_gib_after": 12.0}  # noqa: E731
    report = {"allocators": {
        "native": {"models": {"sd15": {"training": {"checkpointing": run(0.25), "reference": run(1.5)},
                                       "trajectories": {"seconds_per_batch": 20.0}}}},
        "cudaMallocAsync": {"models": {"sd15": {"training": {"checkpointing": run(0.30), "reference": {"error": "out of memory"}},
                                                "trajectories": {"seconds_per_batch": 21.0}}}}}}
    rows = {r["variant"]: r for r in perf.allocator_comparison(report)}
    assert rows["checkpointing"]["ratio"] == pytest.approx(1.2) and rows["trajectories"]["ratio"] == pytest.approx(1.05)
    assert "ratio" not in rows["reference"] and set(rows["reference"]["seconds_per_iteration"]) == {"native"}


def test_async_autotune_limits_each_case_and_skips_what_the_budget_cannot_hold(tmp_path):
    """bench/async_autotune.py: a case past its limit is killed with its process group and reported with its system
    time; cases that do not fit the call's budget are skipped, not started (the probe itself needs a GPU; its product
    part is perf.py --cudnn-autotune under an allocator, which the test above runs)."""
    import sys
    from bench import async_autotune
    slow = async_autotune.run_limited([sys.executable, "-c", "import time; time.sleep(30)"], {}, 1.0, tmp_path / "slow.log")
    assert slow["timed_out"] and slow["wall_s"] < 10 and slow["sys_s"] >= 0
    out = tmp_path / "autotune.json"
    assert async_autotune.main(["--parts", "probe,product", "--budget", "1", "--out", str(out)]) == 0
    cases = json.loads(out.read_text())["cases"]
    assert set(cases) == {f"probe:{c}" for c in async_autotune.PROBE} | {f"product:{c}" for c in async_autotune.DEFAULT_PRODUCT.split(",")}
    assert all(c["skipped"].startswith("budget") for c in cases.values())
    assert "async_keep_cache" in async_autotune.table(cases)


def test_the_failed_capture_check_says_it_needs_a_gpu(capsys):
    """bench/async_failed_capture.py runs on the GPU machine only (its cases are CUDA graph captures)."""
    from bench import async_failed_capture
    assert async_failed_capture.CASES == ("step_graphs", "interrupt", "graphed_calls", "unjoined", "plain")
    assert async_failed_capture.main([]) == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_the_parts_of_an_iteration_are_timed_one_by_one(host, tmp_path):
    out = tmp_path / "perf.json"
    assert perf.main(["--models", "tiny", "--warmup", "2", "--rank", "4", "--skip-trajectories", "--skip-equivalence",
                      "--variants", "", "--parts", "checkpointing", "--out", str(out)]) == 0
    parts = json.loads(out.read_text())["models"]["tiny"]["parts"]
    timed = ["targets", "teacher_delta_step", "frozen_student_step", "paired_targets", "discriminator_step",
             "discriminator_optimizer", "student_step", "student_optimizer", "iteration"]
    assert all(parts[name] > 0 for name in timed) and parts["variant"] == "checkpointing"
    assert parts["sample_evaluations"] == {"targets": 16, "discriminator_step": 12, "student_step": 24}


def test_the_compile_probe_runs_on_the_miniature(host, tmp_path):
    """bench/compile_probe.py (issue #17, item 3's torch.compile lever): dynamo's view of the LoRA-hooked UNet, the
    compiled module against the eager one (aot_eager here: the same graph, no code generation, to keep CI short)."""
    from bench import compile_probe
    out = tmp_path / "probe.json"
    assert compile_probe.main(["--model", "tiny", "--backend", "aot_eager", "--repeats", "1", "--rank", "4",
                               "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["dynamo"]["graphs"] >= 1 and report["compile_seconds_batch_1"] > 0
    assert report["max_abs_diff"] <= 1e-5 * report["eager_abs_max"]
    assert all(report["ms_per_pass"][f"{k}_batch_{b}"] > 0 for k in ("eager", "compiled") for b in (1, 8))
    from comfy_rapm import lora
    cached = lora.LoRALayer._factors
    assert compile_probe.main(["--model", "tiny", "--backend", "aot_eager", "--repeats", "1", "--rank", "4",
                               "--uncached-lora", "--out", str(out)]) == 0
    uncached = json.loads(out.read_text())
    assert uncached["cached_lora"] is False and uncached["max_abs_diff"] <= 1e-5 * uncached["eager_abs_max"]
    assert lora.LoRALayer._factors is cached  # put back


def test_reserved_memory_is_split_by_pool():
    segments = [{"segment_pool_id": (0, 0), "total_size": 2 * 2**30}, {"segment_pool_id": (0, 7), "total_size": 2**30},
                {"segment_pool_id": (0, 7), "total_size": 2**29}, {"segment_pool_id": (0, 9), "total_size": 2**30},
                {"total_size": 2**30}]  # a snapshot without pool ids: the default pool
    sizes = perf.pool_sizes_gib(segments, {(0, 7): "step_graphs"})
    assert sizes == {"default": 3.0, "step_graphs": 1.5, "pool 0.9": 1.0}
