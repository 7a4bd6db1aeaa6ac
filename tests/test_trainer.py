"""RAPMTrain: the semantics of Alg. 2, checkpoints and resume, on tiny models on the real host."""
import functools
import os
import sys

import pytest
import torch

import rapm_fixtures
from headless import tiny_models
from comfy_rapm import checkpoints, session, settings, trainer


@pytest.fixture(scope="module")
def teacher(host):
    return tiny_models.make_model_patcher("sd15", seed=3)


@pytest.fixture(scope="module")
def tset(host, teacher, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sets") / "tiny"
    return rapm_fixtures.make_trajectory_set(folder, teacher, count=4, steps=4, fine_steps=3, cfg=2.0)


_config = functools.partial(rapm_fixtures.tiny_training_config, checkpoint_every=2)


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module):
    return [not torch.equal(a, b.detach()) for a, b in zip(before, module.parameters())]


def test_discriminator_steps_touch_only_discriminators_and_student_steps_only_the_lora(teacher, tset):
    sess = session.Session(teacher, tset, _config())

    def check(tr):
        base = [p.detach().clone() for p in teacher.model.parameters()]
        lora0, disc0 = _params(tr.lora), _params(tr.discriminators)
        tr.run_iteration()  # k = 0: discriminators
        assert not any(_changed(lora0, tr.lora))
        assert all(_changed(disc0, tr.discriminators))
        assert all(p.grad is None for p in tr.discriminators.parameters())  # not held through the student's turn
        lora1, disc1 = _params(tr.lora), _params(tr.discriminators)
        tr.run_iteration()  # k = 1: student
        assert not any(_changed(disc1, tr.discriminators))
        assert any(_changed(lora1, tr.lora))
        assert all(p.grad is None for p in tr.lora.parameters())
        assert all(p.grad is None for p in teacher.model.parameters())  # no gradient reaches base weights
        assert all(torch.equal(a, b) for a, b in zip(base, teacher.model.parameters()))
    sess.run(check)


@pytest.mark.parametrize("kernel", [None, 1])
def test_discriminator_heads_are_pcms_unless_another_size_is_asked_for(teacher, tset, kernel):
    sess = session.Session(teacher, tset, _config() if kernel is None else _config(discriminator_kernel=kernel))

    def sizes(tr):
        tr.run_iteration()  # the heads train at that size
        return {m.kernel_size for m in tr.discriminators.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels > 1}
    assert sess.run(sizes) == {(3, 3) if kernel is None else (1, 1)}  # 3×3 for an SD1.5-like model (PCM)


def test_relative_target_starts_from_the_stored_teacher_position(teacher, tset):
    sess = session.Session(teacher, tset, _config())

    def check(tr):
        with torch.no_grad():
            for layer in tr.lora.layers:  # a student that differs from the teacher
                layer.up.normal_(std=0.05)
        positions = tr.data.positions[0].float()
        cond = tr.data.conditioning(0)
        inputs, outputs, relative = tr.targets(positions, cond)

        def two_steps(start):
            mid = tr.ddim_step(start, tr.s_from, tr.s_delta, cond, tr.data.cfg, student=False)
            return tr.ddim_step(mid, tr.s_delta, tr.s_to, cond, 1.0, student=True)
        with torch.no_grad():
            from_teacher, from_student = two_steps(positions[:-1]), two_steps(inputs)
        torch.testing.assert_close(relative, from_teacher, rtol=0, atol=0)
        assert (relative - from_student)[1:].abs().max() > 1e-4  # the chains differ after the first slot
        assert torch.equal(inputs[0], positions[0])  # z_N = z̃_N
        assert torch.equal(inputs[1:], outputs[:-1])  # the student's own chain
        assert not inputs.requires_grad and not relative.requires_grad  # both detaches
    sess.run(check)


def test_slots_are_decoupled_and_slot_by_slot_backprop_gives_the_same_gradient(teacher, tset):
    sess = session.Session(teacher, tset, _config(mode="huber_only"))

    def check(tr):
        with torch.no_grad():
            for layer in tr.lora.layers:
                layer.up.normal_(std=0.05)
        positions = tr.data.positions[1].float()
        cond = tr.data.conditioning(1)
        inputs, _, relative = tr.targets(positions, cond)
        t_adv = tr.draw().t_adv
        noise = torch.zeros_like(inputs)

        def grads(j, slot_inputs):
            tr.lora.zero_grad(set_to_none=True)
            h, g = tr._student_step(tr._slot_tensors(j, slot_inputs, relative, positions[1:], tr.adversarial_sigmas(t_adv),
                                                     noise), cond)
            (h + g).backward()
            return torch.cat([p.grad.flatten() for p in tr.lora.parameters()])

        per_slot = [grads(slice(j, j + 1), inputs) for j in range(tr.steps)]
        together = grads(slice(0, tr.steps), inputs)
        total = sum(per_slot)
        assert float((total - together).norm() / together.norm()) < 1e-4  # batching only reorders float sums
        perturbed = inputs.clone()
        perturbed[2] += 0.5  # another slot's z_{n+1}
        assert torch.equal(grads(slice(0, 1), perturbed), per_slot[0])
        assert not torch.equal(grads(slice(2, 3), perturbed), per_slot[2])
    sess.run(check)


class _ToyLoRA(torch.nn.Module):
    """One scalar 'adapter' for the linear toy: the student's denoiser is (c + a)·x."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.05))
        self.enabled = True

    def set_enabled(self, enabled):
        self.enabled = enabled


def test_huber_only_loss_matches_a_hand_computation_on_a_linear_toy(host):
    import comfy.model_sampling as cms
    ms = type("MS", (cms.ModelSamplingDiscrete, cms.EPS), {})(None)
    g = torch.Generator().manual_seed(0)
    positions = torch.randn(5, 2, 3, 3, generator=g)
    c_teacher, c_student, cfg, delta, huber_c = 0.3, 0.6, 2.0, 20, 0.01
    lora = _ToyLoRA()

    def model(x, sigma, cond, guidance):
        if lora.enabled:
            return (c_student + lora.a) * x
        cond_out, uncond_out = c_teacher * x, 0.1 * x  # CFG of two linear predictions
        return uncond_out + guidance * (cond_out - uncond_out)

    config = settings.Config(iterations=2, delta=delta, huber_c=huber_c, mode="huber_only", absolute_weight=[1, 2, 0.5, 1],
                            learning_rate=0.0)
    data = trainer.TrainingData([positions], lambda i: None, [999, 749, 499, 249, 0], cfg)
    tr = trainer.Trainer(config, data, ms, lora, None, model, None, torch.device("cpu"))
    tr.iteration = 1
    result = tr.run_iteration()

    # by hand, in plain float64 arithmetic
    sig = lambda t: float(ms.sigmas[t])  # noqa: E731
    vp = lambda x, s: x / (1 + s * s) ** 0.5  # noqa: E731
    ve = lambda z, s: z * (1 + s * s) ** 0.5  # noqa: E731
    step = lambda z, s0, s1, c: vp(c * ve(z, s0) + (s1 / s0) * (ve(z, s0) - c * ve(z, s0)), s1)  # noqa: E731
    teacher_c = 0.1 + cfg * (c_teacher - 0.1)
    student_c = c_student + 0.05
    ts = [999, 749, 499, 249, 0]
    w = [1, 2, 0.5, 1]
    p = positions.double()
    z, expected = p[0], 0.0
    H = lambda a, b: float((torch.sqrt((a - b) ** 2 + huber_c ** 2) - huber_c).mean())  # noqa: E731
    for j in range(4):
        s0, s1, sd = sig(ts[j]), sig(ts[j + 1]), sig(ts[j] - delta)
        z_phi = step(z, s0, s1, student_c)
        relative = step(step(p[j], s0, sd, teacher_c), sd, s1, student_c)
        expected += H(z_phi, relative) + w[j] * H(z_phi, p[j + 1])
        z = z_phi
    assert result["huber"] == pytest.approx(expected, rel=1e-5)
    assert result["generator"] == 0.0


def test_training_lowers_the_four_step_error_against_the_teacher_endpoints(host, tmp_path):
    teacher = tiny_models.make_model_patcher("sd15", seed=5)
    tset = rapm_fixtures.make_trajectory_set(tmp_path / "set", teacher, count=6, steps=4, fine_steps=4, cfg=2.0,
                                             batch_size=3, prompts=3)
    sess = session.Session(teacher, tset, _config(iterations=130, lora_rank=8, lora_alpha=8.0, learning_rate=2e-3,
                                                   discriminator_learning_rate=2e-4, checkpoint_every=1000))

    def endpoint_error(tr):
        err = 0.0
        with torch.no_grad():
            for i, positions in enumerate(tr.data.positions):
                z = positions[0:1].float()
                cond = tr.data.conditioning(i)
                for j in range(tr.steps):
                    z = tr.ddim_step(z, tr.s_from[j:j + 1], tr.s_to[j:j + 1], cond, 1.0, student=True)
                err += float(((z[0] - positions[-1]) ** 2).mean())
        return err / len(tr.data.positions)

    def fit(tr):
        before = endpoint_error(tr)
        checkpoints.train(tr, None)
        return before, endpoint_error(tr)
    before, after = sess.run(fit)
    assert after < 0.6 * before, (before, after)  # 130 iterations: 0.27 here (200: 0.21)


def _node_train(host, model, tset, name, iterations, **kw):
    args = dict(lora_rank=4, lora_alpha=4.0, learning_rate=1e-3, discriminator_learning_rate=1e-3, delta=0,
                absolute_weight="1.0", huber_c=0.001, adversarial_weight=0.1, mode="rapm", seed=1, checkpoint_every=3,
                name=name)
    args.update(kw)
    with torch.inference_mode():
        return host.NODE_CLASS_MAPPINGS["RAPMTrain"]().train(model, tset, iterations, **args)


@pytest.mark.parametrize("where", ["flag", "hook"])
def test_cancel_writes_a_checkpoint_and_resuming_is_bit_exact(host, teacher, tset, every_progress_update, where):
    """Cancel as each host delivers it: the interrupt flag set (0.3.75's server: raised by the next op or the
    node's own check), or the progress hook itself raising after an iteration (0.3.52's server)."""
    import comfy.model_management
    import comfy.utils
    import folder_paths
    _, uninterrupted, loss_a = _node_train(host, teacher, tset, "straight", 8)
    name = f"cancelled_{where}"

    def cancel_at_five(value, total, preview, node_id=None):
        if value == 5:
            comfy.model_management.interrupt_current_processing(True)
            if where == "hook":
                comfy.model_management.throw_exception_if_processing_interrupted()
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(cancel_at_five)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _node_train(host, teacher, tset, name, 8)
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(old)
    folder = os.path.join(folder_paths.get_output_directory(), "rapm_runs", name)
    from safetensors import safe_open
    with safe_open(os.path.join(folder, "checkpoint.safetensors"), "pt") as f:
        assert f.metadata()["rapm_iteration"] == "5"
        assert {"rng", "iteration"} <= set(f.keys())
        assert any(k.startswith("opt.student.") for k in f.keys()) and any(k.startswith("opt.disc.") for k in f.keys())
        assert any(k.startswith("disc.relative.") for k in f.keys()) and any(k.startswith("disc.absolute.") for k in f.keys())
    assert checkpoints.Run(folder, {}).saved_iteration() == 5
    assert checkpoints.Run(os.path.join(folder, "missing"), {}).saved_iteration() == 0

    _, resumed, loss_b = _node_train(host, teacher, tset, name, 8)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert loss_b["loss"] == loss_a["loss"] and len(loss_a["loss"]) == 4
    assert any(v.abs().sum() > 0 for k, v in resumed.items() if "lora_up" in k)


def test_other_settings_under_an_existing_run_name_are_refused(host, teacher, tset):
    _node_train(host, teacher, tset, "settled", 1)
    with pytest.raises(ValueError, match="RAPMTrain: input 'name'.*learning_rate"):
        _node_train(host, teacher, tset, "settled", 1, learning_rate=5e-4)


def test_discriminator_heads_input_reaches_the_checkpoint_and_is_part_of_the_run(host, teacher, tset):
    import folder_paths
    from safetensors import safe_open
    _node_train(host, teacher, tset, "small_heads", 2, discriminator_heads="1x1")
    folder = os.path.join(folder_paths.get_output_directory(), "rapm_runs", "small_heads")
    with safe_open(os.path.join(folder, "checkpoint.safetensors"), "pt") as f:
        convs = {tuple(f.get_slice(k).get_shape()[2:]) for k in f.keys()
                 if k.startswith("disc.") and k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 4}
    assert convs == {(1, 1)}
    with pytest.raises(ValueError, match="RAPMTrain: input 'name'.*discriminator_kernel"):
        _node_train(host, teacher, tset, "small_heads", 2)  # auto = 3x3 for this SD1.5-like model
    _node_train(host, teacher, tset, "pcm_heads", 1)
    _node_train(host, teacher, tset, "pcm_heads", 2, discriminator_heads="3x3")  # the same run: resumes
    with pytest.raises(ValueError, match="RAPMTrain: input 'discriminator_heads'.*2x2"):
        _node_train(host, teacher, tset, "bad_heads", 1, discriminator_heads="2x2")


@pytest.mark.parametrize("inputs, fix", [
    (dict(gradient_checkpointing=False), "turn on gradient_checkpointing"),
    (dict(), "set discriminator_heads to 1x1 \\(then also turn on low_memory\\)"),
    (dict(discriminator_heads="1x1"), "turn on low_memory"),
    (dict(discriminator_heads="1x1", low_memory=True), "lower lora_rank"),
])
def test_out_of_memory_names_the_next_memory_setting_and_keeps_the_checkpoint(host, teacher, tset, monkeypatch,
                                                                               inputs, fix):
    import comfy.model_management
    import folder_paths
    name = "oom_" + "_".join(f"{k}{v}" for k, v in inputs.items())
    _node_train(host, teacher, tset, name, 3, **inputs)
    node_trainer = sys.modules[host.NODE_CLASS_MAPPINGS["RAPMTrain"].__module__].trainer  # the host's import of it
    real_iteration = node_trainer.Trainer.run_iteration

    def out_of_memory(self):
        if self.iteration == 4:
            raise comfy.model_management.OOM_EXCEPTION("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_iteration(self)
    monkeypatch.setattr(node_trainer.Trainer, "run_iteration", out_of_memory)
    with pytest.raises(RuntimeError, match=f"RAPMTrain: out of GPU memory. Fix: {fix}.*resume"):
        _node_train(host, teacher, tset, name, 6, **inputs)
    folder = os.path.join(folder_paths.get_output_directory(), "rapm_runs", name)
    assert checkpoints.Run(folder, {}).saved_iteration() == 3


def test_a_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(teacher, tset, tmp_path):
    sess = session.Session(teacher, tset, _config(iterations=10, checkpoint_every=3))
    run = checkpoints.Run(tmp_path / "run", {"x": 1})
    run.open()

    def poison(k, result):
        if k == 4:
            with torch.no_grad():
                sess.lora.layers[0].up.fill_(float("nan"))
    with pytest.raises(trainer.NonFiniteLoss, match="iteration 5"):
        sess.run(lambda tr: checkpoints.train(tr, run, poison))
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "run" / "checkpoint.safetensors"))
    assert int(saved["iteration"]) == 3
    assert all(torch.isfinite(v).all() for k, v in saved.items() if v.is_floating_point())


def test_incompatible_trajectories_are_refused_before_training(host, tset):
    other = tiny_models.make_model_patcher("sd15", seed=11)
    with pytest.raises(ValueError, match="RAPMTrain: input 'trajectories'.*teacher weights"):
        _node_train(host, other, tset, "wrong_teacher", 2)


def test_student_graded_graphs_stay_off_under_the_cuda_malloc_async_allocator(teacher, tset, monkeypatch):
    """ComfyUI's launcher picks cudaMallocAsync by default; with the student's and the backbone's per-pass graphs with
    grad both graphed the process crashed under it (each alone ran). The default, each side's whole step as one graph,
    runs there; with per-pass graphs (step_graphs off) a session keeps the no-grad and the backbone's graphs, runs the
    student's passes with grad eagerly and says why (on the node's progress line too)."""
    from comfy_rapm import cuda_graphs
    per_pass = _config(step_graphs=False)
    native = session.Session(teacher, tset, per_pass)
    assert native.student_graphs_off_reason is None and native.config.uses_cuda_graphs and native.config.uses_graded_graphs \
        and native.student_graphs
    graphs = native.run(lambda tr: native.graphs)
    assert graphs.graded and graphs.graded_parameters
    monkeypatch.setattr(cuda_graphs, "allocator_backend", lambda: "cudaMallocAsync")
    default = session.Session(teacher, tset, _config())
    assert default.student_graphs_off_reason is None and default.config.uses_step_graphs
    assert default.run(lambda tr: tr.step_graphs) is not None
    sess = session.Session(teacher, tset, per_pass)
    assert sess.config.uses_cuda_graphs and sess.config.uses_graded_graphs and not sess.student_graphs
    assert "cudaMallocAsync" in sess.student_graphs_off_reason
    graphs = sess.run(lambda tr: sess.graphs)
    assert graphs is not None and graphs.graded and not graphs.graded_parameters
    low = session.Session(teacher, tset, _config(low_memory=True))  # its step graphs: nothing to explain
    assert low.student_graphs_off_reason is None and low.config.uses_step_graphs


def test_the_nodes_text_line_starts_fresh_and_after_cancel_says_a_checkpoint_was_written(host, teacher, tset,
                                                                                         every_progress_update):
    import comfy.model_management
    import comfy.utils
    import server
    texts = []

    class Screen:  # what the front end shows on node 7
        def send_progress_text(self, text, node_id, sid=None):
            texts.append((node_id, text))

    def cancel_at_three(value, total, preview, node_id=None):
        if value == 3:
            comfy.model_management.interrupt_current_processing(True)
    saved_server, saved_hook = getattr(server.PromptServer, "instance", None), comfy.utils.PROGRESS_BAR_HOOK
    server.PromptServer.instance = Screen()
    comfy.utils.set_progress_bar_global_hook(cancel_at_three)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _node_train(host, teacher, tset, "texts", 6, unique_id="7")
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(saved_hook)
        server.PromptServer.instance = saved_server
    assert {node for node, _ in texts} == {"7"}
    assert texts[0][1].startswith("0/6 it") and "loading" in texts[0][1]  # replaces the last run's line at once
    assert texts[1][1].startswith("0/6 it") and "started" in texts[1][1]
    last = texts[-1][1]
    assert last.startswith("Cancelled at 3/6 it: checkpoint saved in ") and "same name (texts)" in last
    assert checkpoints.Run(last.split("checkpoint saved in ")[1].split(". Queue")[0], {}).saved_iteration() == 3
