"""Miniature of the quality benchmark's pipeline (bench/quality/teacher.py, train_teacher.py,
eval.py, trajectory_fit.py): a tiny teacher built from ComfyUI's UNet, 5 training steps on the `--limit 8`
emoji set, sampling through ComfyUI's own sampler, EfficientNet-Lite0 features and the metrics, and a
save/load round trip. The whole driver's miniature is tests/test_quality_benchmark.py. The data needs `npm`
(skipped without it); select with `-m quality`."""
import importlib
import json
import shutil

import numpy as np
import pytest
import torch

import rapm_fixtures

pytestmark = pytest.mark.quality

rapm_fixtures.import_quality_benchmark()

TINY = {"model_channels": 32, "channel_mult": [1, 2], "attention_levels": [1], "num_res_blocks": 1,
        "num_head_channels": 16}


@pytest.fixture(scope="module")
def mods(host):
    """bench/quality modules, imported after ComfyUI is booted in this process."""
    teacher = importlib.import_module("teacher")
    ev = importlib.import_module("eval")
    train = importlib.import_module("train_teacher")
    dataset = importlib.import_module("dataset")
    return {"teacher": teacher, "eval": ev, "train": train, "dataset": dataset}


@pytest.fixture(scope="module")
def mini(quality_mini):
    return quality_mini


def _perturbed_tiny(teacher, seed=0):
    return rapm_fixtures.perturbed_teacher(teacher, TINY, seed)


def test_teacher_is_a_comfyui_eps_model(mods):
    T = mods["teacher"]
    import comfy.model_base
    import comfy.model_patcher
    import comfy.model_sampling

    mp = T.build_teacher(TINY)
    assert isinstance(mp, comfy.model_patcher.ModelPatcher)
    assert isinstance(mp.model, comfy.model_base.BaseModel)
    assert mp.model.model_type == comfy.model_base.ModelType.EPS
    assert isinstance(mp.model.model_sampling, comfy.model_sampling.EPS)
    fmt = mp.model.latent_format
    assert fmt.latent_channels == 3 and fmt.scale_factor == 1.0 and fmt.spacial_downscale_ratio == 1
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(mp.model.process_latent_in(x), x) and torch.equal(mp.model.process_latent_out(x), x)
    # SD's discrete schedule: scaled-linear betas 0.00085 .. 0.012, 1000 steps.
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ab = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(mp.model.model_sampling.sigmas.double(), ((1 - ab) / ab).sqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(T.alphas_cumprod(mp), ab, rtol=1e-5, atol=1e-7)
    # every parameter initialised (ComfyUI's ops skip init), the residual branches' last layers zero
    unet = mp.model.diffusion_model
    with torch.no_grad():
        for p in unet.parameters():
            p.fill_(float("nan"))
    T.init_weights(unet, 0)
    assert all(bool(p.isfinite().all()) for p in unet.parameters())
    assert float(unet.out[-1].weight.detach().abs().sum()) == 0
    full = T.build_teacher(init=False)  # the default architecture's size
    assert 10_000_000 < T.parameter_count(full) < 12_000_000
    # 100-step trailing grid: 999, 989, …, 9, then index 0
    s = T.trailing_sigmas(mp, 100)
    assert s.shape == (101,)
    sig = mp.model.model_sampling.sigmas
    assert float(s[0]) == float(sig[999]) and float(s[1]) == float(sig[989]) and float(s[-2]) == float(sig[9])
    assert float(s[-1]) == float(sig[0])


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_training_call_matches_apply_model(mods, prediction):
    """The trainer's direct UNet call is ComfyUI's BaseModel.apply_model in VP coordinates, and the trainer's
    target is what ComfyUI turns into the clean image: ε for an EPS teacher, v for a V-prediction one."""
    T = mods["teacher"]
    import comfy.model_base
    mp = rapm_fixtures.perturbed_teacher(T, dict(TINY, prediction=prediction))
    assert mp.model.model_type == getattr(comfy.model_base.ModelType, T.PREDICTIONS[prediction])
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen)
    ctx = torch.randn(3, 16, 384, generator=gen)
    t = torch.tensor([0, 400, 999])
    a = T.alphas_cumprod(mp)[t].float().view(-1, 1, 1, 1)
    z = a.sqrt() * x0 + (1 - a).sqrt() * eps
    sigma = mp.model.model_sampling.sigmas[t]
    with torch.no_grad():
        out = T.unet_prediction(mp.model, z, t, ctx)
        x = z * (1 + sigma ** 2).sqrt().view(-1, 1, 1, 1)
        denoised = mp.model.apply_model(x, sigma, c_crossattn=ctx)
    if prediction == "eps":
        expected = x - out * sigma.view(-1, 1, 1, 1)
    else:
        expected = a.sqrt() * z - (1 - a).sqrt() * out
    torch.testing.assert_close(denoised, expected, rtol=1e-4, atol=1e-4)
    assert float(out.std()) > 1e-3
    # A UNet that outputs its target exactly makes ComfyUI's denoised the clean image.
    target = T.training_target(prediction, x0, eps, a)
    exact = x - target * sigma.view(-1, 1, 1, 1) if prediction == "eps" else a.sqrt() * z - (1 - a).sqrt() * target
    torch.testing.assert_close(exact, x0, rtol=1e-4, atol=1e-4)


def test_sampling_through_comfyui_is_ddim(mods):
    """teacher.sample (ComfyUI's sample_custom + euler) == hand-written CFG DDIM on the same grid,
    per-row conditioning follows its noise, and chunking changes nothing."""
    T = mods["teacher"]
    mp = _perturbed_tiny(T, seed=3)
    gen = torch.Generator().manual_seed(2)
    ctx = torch.randn(3, 16, 384, generator=gen)
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[:, 10:] = False
    cond = T.conditioning(ctx, mask)
    assert cond[0][0].shape == (3, 16, 384) and bool((cond[0][0][:, 10:] == 0).all())
    neg = T.conditioning(torch.zeros(1, 16, 384), torch.ones(1, 16, dtype=torch.bool))
    noise = T.make_noise(3, seed=7)
    sigmas = T.trailing_sigmas(mp, 3)
    cfg = 2.5
    out = T.sample(mp, cond, neg, noise, sigmas, cfg)
    with torch.no_grad():
        x = noise * (1 + sigmas[0] ** 2).sqrt()
        c = cond[0][0]
        u = torch.zeros_like(c)
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            sb = s.expand(3)
            dc = mp.model.apply_model(x, sb, c_crossattn=c)
            du = mp.model.apply_model(x, sb, c_crossattn=u)
            d = du + cfg * (dc - du)
            x = d + (x - d) / s * s_next
    torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-4)
    chunked = T.sample(mp, cond, neg, noise, sigmas, cfg, batch_size=2)
    # batch 2 + 1 against 3 takes other CPU kernels: 1.5e-5 apart on an AMD EPYC machine; a row given another
    # row's conditioning or noise would be off by O(1)
    torch.testing.assert_close(chunked, out, rtol=1e-4, atol=1e-4)
    img = T.to_uint8(out)
    assert img.dtype == torch.uint8 and img.shape == (3, 3, 32, 32)


def test_metrics_on_known_features(mods):
    E = mods["eval"]
    rng = np.random.default_rng(0)
    f = rng.normal(size=(200, 16))
    assert abs(E.frechet_distance(f, f)) < 1e-6
    shift = np.zeros(16)
    shift[0] = 3.0
    assert E.frechet_distance(f, f + shift) == pytest.approx(9.0, rel=1e-6)
    g = rng.normal(size=(200, 16)) * 2.0
    assert E.frechet_distance(f, g) > 5
    k_same = E.kid(f, rng.normal(size=(200, 16)), subsets=20, subset_size=100)
    k_diff = E.kid(f, g + 1.0, subsets=20, subset_size=100)
    assert abs(k_same["kid"]) < k_diff["kid"] and np.isfinite(k_same["kid_std"])
    concepts = np.arange(200) % 7
    assert E.retrieval_top1(f, concepts, f, concepts) == 1.0
    assert E.retrieval_top1(f, (concepts + 1) % 7, f, concepts) == 0.0
    a = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert E.paired_distance(a, a)["rmse"] == 0.0
    b = torch.full_like(a, 255)
    c = torch.zeros_like(a)
    assert E.paired_distance(b, c)["rmse"] == pytest.approx(1.0)


def test_pipeline_miniature(mods, mini, tmp_path):
    """Train 5 steps (batch 32) on the miniature's train split, save, reload, sample 4 images
    with 2 steps through ComfyUI, and score them with EfficientNet-Lite0 features."""
    T, E, train, ds = mods["teacher"], mods["eval"], mods["train"], mods["dataset"]
    out = tmp_path / "teacher"
    rc = train.main(["--data", str(mini), "--out", str(out), "--cpu", "--max-steps", "5", "--batch-size", "32",
                     "--warmup", "2", "--log-every", "1", "--config", json.dumps(TINY), "--no-preview"])
    assert rc == 0
    doc = json.loads((out / T.CONFIG_NAME).read_text())
    assert doc["format"] == T.FORMAT and doc["dtype"] == "float16" and doc["info"]["steps"] == 5
    assert doc["info"]["ema_weights"] is True
    losses = [e["loss"] for e in doc["info"]["loss_log"]]
    assert len(losses) == 5 and all(np.isfinite(losses))

    data = ds.load_dataset(mini)
    # only train rows were used
    assert doc["info"]["data"]["train_images"] == int((data["split"] == 0).sum())

    # save / load round trip: strict, bit-exact in float16, and through the metadata alone
    mp, doc2 = T.load_teacher(out)
    assert doc2["sha256"] == doc["sha256"]
    from safetensors.torch import load_file
    stored = load_file(str(out / T.WEIGHTS_NAME))
    state = mp.model.diffusion_model.state_dict()
    assert set(stored) == set(state)
    assert all(torch.equal(stored[k].float(), state[k].float()) for k in stored)
    assert all(v.dtype == torch.float16 for v in stored.values())
    only_weights = tmp_path / "weights_only"
    only_weights.mkdir()
    shutil.copy(out / T.WEIGHTS_NAME, only_weights / T.WEIGHTS_NAME)
    mp_meta, _ = T.load_teacher(only_weights / T.WEIGHTS_NAME)
    assert all(torch.equal(v, mp_meta.model.diffusion_model.state_dict()[k]) for k, v in state.items())
    mp.model.diffusion_model.load_state_dict({k: v.float() for k, v in stored.items()})
    resaved = T.save_teacher(mp, tmp_path / "resaved")
    assert load_file(str(resaved)).keys() == stored.keys()

    # 4 prompts (2 train, 2 held-out where there are), 2 steps through ComfyUI, CFG 3
    split = data["split"]
    rows = torch.cat([torch.nonzero(split == 0).flatten()[:2], torch.nonzero(split != 0).flatten()[:2]])
    rows = rows[:4]
    cond = T.conditioning(data["hidden"][rows], data["attention_mask"][rows])
    neg = T.empty_conditioning(data)
    noise = T.make_noise(len(rows), seed=0)
    x = E.sample(mp, cond, neg, noise, T.trailing_sigmas(mp, 2), 3.0)
    gen = T.to_uint8(x)
    assert gen.shape == (len(rows), 3, 32, 32)
    again = T.to_uint8(E.sample(mp, cond, neg, noise, T.trailing_sigmas(mp, 2), 3.0))
    assert torch.equal(again, gen)  # deterministic given the noise

    real = data["images"]
    f_real = E.features(real)
    f_gen = E.features(gen)
    assert f_real.shape == (real.shape[0], E.FEATURE_DIM) and np.isfinite(f_real).all() and np.isfinite(f_gen).all()
    assert E.frechet_distance(f_real, f_real) < 1e-3 * max(1.0, E.frechet_distance(f_real, f_gen))
    fd = E.frechet_distance(f_real, f_gen)
    assert np.isfinite(fd) and fd > 0
    k = E.kid(f_real, f_gen, subsets=10)
    assert np.isfinite(k["kid"]) and np.isfinite(k["kid_std"]) and k["subset_size"] == len(rows)
    top1 = E.retrieval_top1(f_gen, data["concept"][rows].numpy(), f_real, data["concept"].numpy())
    assert 0.0 <= top1 <= 1.0
    assert E.retrieval_top1(f_real, data["concept"].numpy(), f_real, data["concept"].numpy()) == 1.0
    pd = E.paired_distance(gen, again)
    assert pd["rmse"] == 0.0
    assert E.paired_distance(gen, real[rows])["rmse"] > 0
    m = E.evaluate(gen, data["concept"][rows].numpy(), real[rows], data["concept"][rows].numpy(),
                   reference_uint8=gen, kid_subsets=5)
    assert np.isfinite(m["fd"]) and m["paired"]["rmse"] == 0.0

    grid = E.sample_grid(torch.cat([real[rows], gen]), tmp_path / "grid.png", nrow=4)
    raw = grid.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(grid) as im:
        assert im.size == (2 + 4 * 34, 2 + 2 * 34) and im.mode == "RGB"
        px = np.asarray(im)
    np.testing.assert_array_equal(px[2:34, 2:34], real[rows[0]].permute(1, 2, 0).numpy())


def test_trajectory_rows_repeat_prompts_past_one_per_prompt():
    import run_benchmark
    split = torch.tensor([0, 1, 0, 0, 2, 0, 0])  # five training rows
    one = run_benchmark.trajectory_rows(split, 3)
    assert one.tolist() == run_benchmark.shuffled_train_rows(split)[:3].tolist()
    many = run_benchmark.trajectory_rows(split, 12)
    assert len(many) == 12 and sorted(many[:5].tolist()) == [0, 2, 3, 5, 6]
    assert many[5:10].tolist() == many[:5].tolist() and many[10:].tolist() == many[:2].tolist()


def test_trajectory_fit_miniature(mods, mini, tmp_path):
    """bench/quality/trajectory_fit.py: with one fine step per slot the trajectories are the teacher's own
    N-step DDIM, so its chain and its steps must fit them exactly; a student LoRA must not; the three sets
    have different noise."""
    import trajectory_fit
    from safetensors.torch import save_file
    from comfy_rapm import host, lora as lora_mod
    T = mods["teacher"]
    mp = _perturbed_tiny(T)
    T.save_teacher(mp, tmp_path / "teacher")
    with torch.inference_mode(False):
        adapters = lora_mod.LoRA(host.weight_modules(mp), rank=2, alpha=2, seed=0)
        for layer in adapters.layers:
            torch.nn.init.normal_(layer.up, std=0.05)
        save_file(adapters.comfy_state_dict(torch.float32), str(tmp_path / "student.safetensors"))
    out = tmp_path / "fit.json"
    assert trajectory_fit.main(["--data", str(mini), "--teacher", str(tmp_path / "teacher"), "--cpu",
                                "--lora", f"student={tmp_path / 'student.safetensors'}", "--work", str(tmp_path / "w"),
                                "--out", str(out), "--count", "3", "--steps", "2", "--fine-steps", "1",
                                "--batch-size", "2"]) == 0
    report = json.loads(out.read_text())
    assert list(report["sets"]) == ["seen", "new_noise", "heldout"]
    for s in report["sets"].values():
        assert s["count"] == 3 and s["timesteps"][0] == 999
        teacher, student = s["models"]["teacher 2-step DDIM"], s["models"]["student"]
        assert max(teacher["chain_rmse"] + teacher["step_rmse"]) < 1e-5 and teacher["end_rmse_uint8"] < 0.01
        assert len(student["chain_rmse"]) == 2 and min(student["chain_rmse"]) > 1e-3
        assert student["step_rmse"][0] == pytest.approx(student["chain_rmse"][0])  # both start at z̃_N
    from comfy_rapm.trajectories import TrajectorySet
    first = {name: TrajectorySet(tmp_path / "w" / f"{name}_N2").load()[0].positions[0] for name in report["sets"]}
    assert not torch.equal(first["seen"], first["new_noise"])
