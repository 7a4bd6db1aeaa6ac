"""The quality benchmark's own parts (bench/quality/run_benchmark.py and what it calls) and a CPU miniature of the
whole chain over several "device calls": a tiny space-to-depth teacher trained in two calls, the headroom check
(and its refusal), ComfyUI's own samplers through the real host, trajectories through the product's store, the
five students through the RAPMTrain node at its shipped defaults, FD/KID with intervals, paired RMSE, the
classifier's fidelity, the FD curve, quality.json with every key and the labelled grid. Select with `-m quality`
(needs npm for the emoji miniature, like tests/test_quality_data.py)."""
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import rapm_fixtures

pytestmark = pytest.mark.quality

ROOT, QDIR = rapm_fixtures.ROOT, rapm_fixtures.QUALITY_DIR
rapm_fixtures.import_quality_benchmark()

# 32-px images as 12×16×16 latents (the recipe's 2×2 space-to-depth at toy size)
TINY2 = {"image_size": 32, "patch": 2, "model_channels": 32, "channel_mult": [1, 2], "attention_levels": [1],
         "num_res_blocks": 1, "num_head_channels": 16}
ROW_KEYS = ("fd_heldout", "fd_heldout_ci", "kid_heldout", "rmse_to_teacher_100", "fidelity_heldout", "fd_train")


@pytest.fixture(scope="module")
def mods(host):
    return {name: importlib.import_module(name) for name in ("teacher", "eval", "train_teacher", "dataset", "fidelity",
                                                              "pack", "run_benchmark", "quality_report")}


def test_space_to_depth_teacher_is_a_comfyui_model_of_64px_images(mods):
    T = mods["teacher"]
    mp = rapm_fixtures.perturbed_teacher(T, TINY2)
    fmt = mp.model.latent_format
    assert fmt.latent_channels == 12 and fmt.spacial_downscale_ratio == 2 and fmt.scale_factor == 1.0
    assert T.latent_shape(TINY2) == (12, 16, 16) and T.patch_of(mp) == 2
    recipe64 = T.full_config({"image_size": 64, "patch": 2})
    assert T.latent_shape(recipe64) == (12, 32, 32) and T.unet_config(recipe64)["in_channels"] == 12
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    x = T.to_model_space(images, 2)
    assert x.shape == (3, 12, 16, 16) and torch.equal(T.to_uint8(x, 2), images)  # lossless
    assert torch.equal(torch.sort(x.flatten(1))[0], torch.sort(T.to_model_space(images).flatten(1))[0])  # a permutation
    cond = T.conditioning(torch.randn(3, 16, 384), torch.ones(3, 16, dtype=torch.bool))
    neg = T.conditioning(torch.zeros(1, 16, 384))
    out = T.sample(mp, cond, neg, T.make_noise(3, 0, T.latent_shape(TINY2)), T.trailing_sigmas(mp, 2), 5.0)
    assert out.shape == (3, 12, 16, 16) and T.images(mp, out).shape == (3, 3, 32, 32)


@pytest.mark.parametrize("sampler,scheduler", [("euler", "simple"), ("dpmpp_2m", "karras"), ("uni_pc", "simple")])
def test_free_rows_are_what_the_stock_ksampler_node_returns(mods, host, sampler, scheduler):
    """teacher.ksampler (the free rows) is bit for bit the stock KSampler node on the same noise; euler/simple at 4
    steps differs from the trailing DDIM grid only by its last step (to σ = 0 instead of σ(t=0))."""
    import comfy.sample
    T = mods["teacher"]
    mp = rapm_fixtures.perturbed_teacher(T, TINY2, seed=2)
    cond = T.conditioning(torch.randn(2, 16, 384, generator=torch.Generator().manual_seed(3)))
    neg = T.conditioning(torch.zeros(1, 16, 384))
    latent = {"samples": torch.zeros((2,) + T.latent_shape(TINY2))}
    (node_out,) = host.NODE_CLASS_MAPPINGS["KSampler"]().sample(mp, 7, 4, 6.0, sampler, scheduler, cond, neg, latent)
    noise = comfy.sample.prepare_noise(latent["samples"], 7)
    ours = T.ksampler(mp, cond, neg, noise, 4, 6.0, sampler, scheduler)
    assert torch.equal(ours, node_out["samples"].float())
    chunked = T.ksampler(mp, cond, neg, noise, 4, 6.0, sampler, scheduler, batch_size=1)
    torch.testing.assert_close(chunked, ours, rtol=1e-4, atol=1e-4)  # chunks change only float rounding
    if sampler == "euler":
        ddim = T.sample(mp, cond, neg, noise, T.trailing_sigmas(mp, 4), 6.0)
        gap = float((ddim - ours).abs().max())
        assert 0 < gap < 0.2


def test_fd_interval_and_kid(mods):
    E = mods["eval"]
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(64, 8))
    real = rng.normal(size=(300, 8)) @ basis.T + 0.1 * rng.normal(size=(300, 64))

    def gen(n):
        return 1.2 * rng.normal(size=(n, 8)) @ basis.T + 0.1 * rng.normal(size=(n, 64)) + 0.2
    stats = E.RealStats(real, device="cpu")
    for n in (40, 500):  # fewer and more samples than feature dimensions
        g = gen(n)
        assert stats.fd(g) == pytest.approx(E.frechet_distance(real, g), rel=1e-6)  # eigenvalue rounding near rank 8
    small, large = stats.bootstrap(gen(100), 40), stats.bootstrap(gen(1600), 40)
    for ci in (small, large):
        assert ci["low"] < ci["fd"] < ci["high"] and ci["bias"] > 0  # resampling duplicates: FD rises
        assert ci["percentile"][0] > ci["low"]
    assert large["high"] - large["low"] < 0.5 * (small["high"] - small["low"])
    g = gen(200)
    k = E.kid(real, g, subsets=4, subset_size=50, seed=3, device="cpu")
    pick = np.random.default_rng(3)  # the same draws, the formula by hand in numpy
    vals = []
    for _ in range(4):
        x, y = real[pick.choice(300, 50, replace=False)], g[pick.choice(200, 50, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / 64 + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        vals.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (50 * 49) - 2 * kxy.mean())
    assert k["kid"] == pytest.approx(np.mean(vals), rel=1e-9)


def test_fidelity_classifier_fails_on_noise(mods, quality_mini):
    """Fitted on the training split's real images; on held-out real images it finds the style; on noise images it
    is no better than always answering the most frequent class."""
    E, F, ds = mods["eval"], mods["fidelity"], mods["dataset"]
    data = ds.load_dataset(quality_mini)
    feats = E.features(data["images"])
    labels = F.labels(data)
    train = (data["split"] == 0).numpy()
    probe = F.fit(feats[train], {k: v[train] for k, v in labels.items()}, groups=data["concept"].numpy()[train])
    held = ~train
    real = probe.accuracy(feats[held], {k: v[held] for k, v in labels.items()})
    assert real["style"] >= 0.75
    noise = torch.randint(0, 256, (48,) + tuple(data["images"].shape[1:]), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    targets = {"style": np.arange(48) % 3, "category": np.full(48, labels["category"][0])}
    on_noise = probe.accuracy(E.features(noise), targets)
    assert on_noise["style"] <= probe.chance(targets)["style"] + 0.2 < real["style"]
    assert probe.describe()["classes"]["style"] == 3


def test_student_settings_are_the_nodes_input_defaults(mods, host):
    """pack.node_defaults reads RAPMTrain's INPUT_TYPES (required and optional, combos → first option), the same
    in a booted host and in a bare process that only has comfy.* (the GPU machine)."""
    pack = mods["pack"]
    defaults = pack.node_defaults("RAPMTrain")
    types = host.NODE_CLASS_MAPPINGS["RAPMTrain"].INPUT_TYPES()
    for section in ("required", "optional"):
        for key, spec in types[section].items():
            if len(spec) > 1 and "default" in spec[1]:
                assert defaults[key] == spec[1]["default"], key
            elif isinstance(spec[0], list):
                assert defaults[key] == spec[0][0], key
    assert "model" not in defaults and "trajectories" not in defaults
    code = ("import json, sys; sys.path[:0] = [%r, %r]; import teacher; teacher.comfy_init(cpu=True); import pack; "
            "print(json.dumps(pack.node_defaults('RAPMTrain')))" % (str(QDIR), str(ROOT)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == json.loads(json.dumps(defaults))
    search = mods["run_benchmark"].parse_search("fast:learning_rate=1e-4,lora_alpha=64", defaults)
    assert search == {"fast": {"learning_rate": 1e-4, "lora_alpha": 64.0}}
    with pytest.raises(SystemExit, match="not an input of RAPMTrain"):
        mods["run_benchmark"].parse_search("x:lr=1", defaults)


def test_teacher_training_resumes_bit_exactly(mods, quality_mini, tmp_path):
    train = mods["train_teacher"]
    base = ["--data", str(quality_mini), "--cpu", "--max-steps", "4", "--batch-size", "8", "--warmup", "2",
            "--config", json.dumps(TINY2), "--no-preview", "--checkpoint-every", "3", "--log-every", "2"]
    assert train.main(base + ["--out", str(tmp_path / "straight")]) == 0
    split = tmp_path / "split"
    assert train.main(base + ["--out", str(split), "--steps-this-call", "1"]) == train.NOT_FINISHED
    assert train.main(base + ["--out", str(split), "--steps-this-call", "2"]) == train.NOT_FINISHED
    assert (split / train.STATE).exists() and not (split / "teacher.safetensors").exists()
    with pytest.raises(SystemExit, match="other settings"):
        train.main(base + ["--lr", "1e-3", "--out", str(split)])
    assert train.main(base + ["--out", str(split)]) == 0
    assert (split / "teacher.safetensors").read_bytes() == (tmp_path / "straight" / "teacher.safetensors").read_bytes()
    assert not (split / train.STATE).exists()
    doc = json.loads((split / "teacher.json").read_text())
    straight = json.loads((tmp_path / "straight" / "teacher.json").read_text())
    assert doc["sha256"] == straight["sha256"] and doc["info"]["steps"] == 4
    assert [(e["step"], e["loss"]) for e in doc["info"]["loss_log"]] == [(e["step"], e["loss"]) for e in straight["info"]["loss_log"]]
    assert [e["step"] for e in doc["info"]["loss_log"]] == [2, 4]
    assert train.main(base + ["--out", str(split)]) == 0  # finished: nothing to do


def test_benchmark_miniature_over_calls(mods, quality_mini, tmp_path):
    """The GPU plan's calls at toy size on one WORK folder: the teacher over two calls, a headroom refusal, the
    free rows and the students' training, then the scoring call; quality.json has every row and key."""
    rb = mods["run_benchmark"]
    work, out = tmp_path / "work", tmp_path / "out"
    teacher_args = f"--config '{json.dumps(TINY2)}' --max-steps 12 --batch-size 8 --steps-this-call 6"
    common = ["--data", str(quality_mini), "--work", str(work), "--out", str(out), "--cpu-smoke",
              "--teacher-args", teacher_args, "--search", "fast:learning_rate=0.001"]
    assert rb.main(common + ["--until", "teacher"]) == rb.EXIT_TEACHER_UNFINISHED
    assert rb.main(common + ["--until", "teacher"]) == 0
    assert (out / "teacher" / "teacher.json").is_file() and not (out / "quality.json").exists()
    assert rb.main(common + ["--headroom-goal", "1000"]) == rb.EXIT_NO_HEADROOM
    room = json.loads((work / "headroom.json").read_text())
    assert room["cfg"] is None and [e["cfg"] for e in room["tried"]] == [6.0, 7.5] and "change the teacher" in room["advice"]
    partial = json.loads((out / "quality.json").read_text())
    assert set(partial["rows"]) == {"teacher_ddim_100", "teacher_ddim_4"} and not partial["complete"]

    # free rows, trajectories, students trained half-way, not scored
    assert rb.main(common + ["--ignore-headroom", "--iterations", "2"]) == 0
    report = json.loads((out / "quality.json").read_text())
    assert set(report["missing"]) == set(rb.STUDENTS)
    teacher_row = (work / "rows" / "teacher_ddim_8_cfg6.json").read_text()
    assert rb.main(common + ["--ignore-headroom", "--iterations", "4", "--finish"]) == 0  # students resume, then scored
    assert (work / "rows" / "teacher_ddim_8_cfg6.json").read_text() == teacher_row  # scored once

    report = json.loads((out / "quality.json").read_text())
    assert list(report["rows"]) == list(rb.ROWS) and report["complete"]
    for key, row in report["rows"].items():
        assert all(row[k] is not None for k in ROW_KEYS), key
        assert row["fd_heldout_ci"][0] < row["fd_heldout"] < row["fd_heldout_ci"][1]
        assert set(row["fidelity_heldout"]) == {"style", "category"}
        if key in rb.STUDENTS:
            assert row["iterations"] == 4 and row["settings"] == "defaults" and row["cfg"] == 1.0
    assert report["rows"]["teacher_ddim_100"]["rmse_to_teacher_100"] == 0.0
    assert report["rows"]["teacher_ddim_4"]["rmse_to_teacher_100"] > 0
    assert {"card", "command", "date", "teacher"} <= set(report) and len(report["command"]) == 5
    t = report["teacher"]
    assert t["checksum"] == json.loads((work / "teacher" / "teacher.json").read_text())["sha256"]
    assert t["resolution"] == 32 and t["cfg"] == 6.0 and t["parameters"] > 0  # 6.0: the trajectory node's default
    assert [p["iteration"] for p in report["curve"]] == [2, 4]
    assert set(report["search"]) == {"search_fast", "rapm_4 (defaults)"}
    assert report["search"]["search_fast"]["fd_train"] > 0
    assert "fd_heldout" not in json.loads((work / "rows" / "search_fast.json").read_text())  # training prompts only
    run = json.loads((work / "students" / "rapm_runs" / "rapm_4" / "run.json").read_text())
    defaults = mods["pack"].node_defaults("RAPMTrain")
    from comfy_rapm import presets  # the node's default learning rate, 0, is the teacher family's (SD1.5-like here)
    assert defaults["learning_rate"] == 0 and run["identity"]["config"]["learning_rate"] == presets.SD15.learning_rate
    assert run["identity"]["config"]["lora_rank"] == defaults["lora_rank"]
    assert set(report["goals"]) >= {"teacher_headroom", "rapm_4_vs_teacher_100", "rapm_4_vs_best_free_4",
                                    "rapm_2_vs_best_free_4", "rapm_4_better_than_huber_only_4"}
    md = (out / "quality.md").read_text()
    assert all(f"| {key} |" in md for key in rb.ROWS)
    from PIL import Image
    with Image.open(out / "quality_grid.png") as im:
        assert im.height == 2 + (len(rb.ROWS) + 1) * (32 + 2)  # a line for the real images and one per row
    assert "curve_fit" not in report  # two curve points: too few to fit
    written = (out / "quality.md").read_text()
    assert rb.main(["--rerender", str(out / "quality.json")]) == 0
    assert (out / "quality.md").read_text() == written and json.loads((out / "quality.json").read_text()) == report
    assert all("equivalent_ddim_steps" in report["rows"][k] for k in rb.STUDENTS)
    assert report["matched"]["iterations"] == 4  # every run at 4: the main rows are the matched ones
    assert report["matched"]["rows"]["rapm_4"]["fd_heldout"] == report["rows"]["rapm_4"]["fd_heldout"]

    # one ablation that stopped at 2 (a slower run at a call's end): the others are scored again at 2
    (work / "students" / "relative_only_4" / "lora_4.safetensors").unlink()
    assert rb.main(common + ["--ignore-headroom", "--iterations", "4", "--finish"]) == 0  # nothing left to train
    report = json.loads((out / "quality.json").read_text())
    matched = report["matched"]
    assert matched["iterations"] == 2 and set(matched["rows"]) == {"rapm_4", *rb.ABLATIONS}
    assert all(r["iterations"] == 2 for r in matched["rows"].values())
    assert (work / "rows" / "rapm_4_at2.json").is_file() and not (work / "rows" / "relative_only_4_at2.json").exists()
    assert matched["rows"]["relative_only_4"]["fd_heldout"] == report["rows"]["relative_only_4"]["fd_heldout"]
    assert "each at 2 iterations" in report["goals"]["rapm_4_better_than_huber_only_4"]["goal"]
    gap = (matched["rows"]["huber_only_4"]["fd_heldout_ci"][0] - matched["rows"]["rapm_4"]["fd_heldout_ci"][1])
    assert report["goals"]["rapm_4_better_than_huber_only_4"]["value"] == gap


def test_matched_iteration_is_the_most_all_runs_reached(mods):
    m = mods["run_benchmark"].matched_iteration
    assert m({"a": {1000: 0, 2000: 0, 2500: 0}, "b": {1000: 0, 2000: 0, 3000: 0, 3100: 0}}) == 2000
    assert m({"a": {1000: 0}, "b": {}}) is None  # one run with LoRAs: nothing to compare
    assert m({"a": {1500: 0}, "b": {1000: 0}}) is None


def test_equivalent_ddim_steps_and_curve_fit(mods):
    rb = mods["quality_report"]
    ladder = {4: 118.85, 8: 84.85, 16: 70.56, 32: 62.26, 100: 56.64}
    assert rb.equivalent_ddim_steps(84.85, ladder) == pytest.approx(8)
    assert rb.equivalent_ddim_steps(81.63, ladder) == pytest.approx(9.35, abs=0.01)  # the 2026-12-02 RAPM-4
    assert rb.equivalent_ddim_steps(77.705, ladder) == pytest.approx(16 ** 0.5 * 8 ** 0.5 * 1.0, rel=1e-6)
    assert rb.equivalent_ddim_steps(50.0, ladder) is None and rb.equivalent_ddim_steps(130.0, ladder) is None
    points = [(k, 70.0 + 20000.0 / k) for k in (1000, 2000, 4000)]
    fit = rb.curve_fit(points, 20000)
    assert fit["asymptote"] == pytest.approx(70.0) and fit["fd_at"] == pytest.approx(71.0)
    assert fit["max_residual"] < 1e-9 and rb.curve_fit(points[:2], 20000) is None


def test_teacher_sweep_trains_candidates_side_by_side_then_checks_their_headroom(mods, quality_mini, tmp_path):
    """bench/quality/teacher_sweep.py at toy size: two candidates in parallel processes, one on a downsampled copy of
    the data; the training call returns their previews, the headroom call their grids and tried guidance scales,
    and `weights` one candidate's teacher files."""
    q, out = tmp_path / "q", tmp_path / "out"
    q.mkdir()
    (q / "data").symlink_to(quality_mini)
    tiny16 = dict(TINY2, image_size=16, patch=1)
    candidates = {"s2d": {"size": 32, "config": TINY2, "args": []},
                  "px16_v": {"size": 16, "config": dict(tiny16, prediction="v"), "args": ["--low-t-fraction", "0.5"]}}
    base = [sys.executable, str(QDIR / "teacher_sweep.py")]
    common = ["--q", str(q), "--candidates", json.dumps(candidates), "--teacher-args", "--max-steps 4 --batch-size 8",
              "--benchmark-args", "--cpu-smoke --headroom-goal 1000 --cfg-fallback", "--budget-seconds", "3000"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for stage in ("train", "headroom"):
        res = subprocess.run(base + [stage, "--out", str(out / stage)] + common, capture_output=True, text=True,
                             timeout=900, env=env)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    trained = json.loads((out / "train" / "sweep.json").read_text())["candidates"]
    assert {n: (c["exit"], c["finished"], c["steps"]) for n, c in trained.items()} == {"s2d": (0, True, 4),
                                                                                       "px16_v": (0, True, 4)}
    assert (out / "train" / "s2d_preview.png").is_file() and (out / "train" / "px16_v_preview.png").is_file()
    assert json.loads((q / "data16" / "dataset.json").read_text())["size"] == 16
    checked = json.loads((out / "headroom" / "sweep.json").read_text())["candidates"]
    for name, c in checked.items():
        assert c["exit"] == 4 and [t["cfg"] for t in c["headroom"]["tried"]] == [6.0], name  # goal 1000: short
        assert (out / "headroom" / f"{name}_grid.png").is_file()
    v = json.loads((q / "sweep" / "px16_v" / "teacher" / "teacher.json").read_text())
    assert v["comfyui"]["model_type"] == "V_PREDICTION" and v["info"]["identity"]["low_t_fraction"] == 0.5
    res = subprocess.run(base + ["weights", "px16_v", "--out", str(out / "w"), "--q", str(q),
                                 "--candidates", json.dumps(candidates)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (out / "w" / "px16_v_teacher.json").is_file() and list((out / "w").glob("px16_v_teacher.safetensors*"))
    with pytest.raises(SystemExit, match="16-px images but .* 32-px ones"):  # a candidate scored on the wrong set
        mods["run_benchmark"].main(["--data", str(quality_mini), "--work", str(tmp_path / "wrong"), "--out",
                                    str(tmp_path / "wrong_out"), "--teacher", str(q / "sweep" / "px16_v" / "teacher"),
                                    "--cpu-smoke", "--until", "headroom"])
