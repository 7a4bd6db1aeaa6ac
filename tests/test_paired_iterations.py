"""Paired iterations (issue #17, item 3's lever, an option until measured on the GPU): the discriminators' iteration
also computes the next (student) iteration's no-grad work in one batch. The LoRA does not change in between, so
the losses and updates are those of separate iterations (fp32 on the CPU: to rounding); the draws are the same,
and a checkpoint written between the two resumes to the same run."""
import functools

import pytest
import torch

import rapm_fixtures
from headless import tiny_models
from comfy_rapm import session


@pytest.fixture(scope="module")
def teacher(host):
    return tiny_models.make_model_patcher("sd15", seed=5)


@pytest.fixture(scope="module")
def tset(host, teacher, tmp_path_factory):
    folder = tmp_path_factory.mktemp("paired") / "set"  # 3 prompts: the pairs mix different conditionings
    return rapm_fixtures.make_trajectory_set(folder, teacher, count=6, steps=4, fine_steps=2, cfg=2.0, prompts=3)


_config = functools.partial(rapm_fixtures.tiny_training_config, seed=7)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _run(teacher, tset, paired, iterations=4, on_trainer=None):
    sess = session.Session(teacher, tset, _config(paired_iterations=paired))
    calls = []
    handle = teacher.model.diffusion_model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))

    def fit(tr):
        assert tr.paired is paired
        results = [tr.run_iteration() for _ in range(iterations)]
        state = [p.detach().clone() for p in list(tr.lora.parameters()) + list(tr.discriminators.parameters())]
        extra = on_trainer(tr) if on_trainer else None
        return results, state, extra
    try:
        results, state, extra = sess.run(fit)
    finally:
        handle.remove()
    return results, state, calls, extra


def test_paired_iterations_give_the_same_losses_with_fewer_batched_passes(teacher, tset):
    plain, _, plain_calls, _ = _run(teacher, tset, paired=False)
    paired, _, paired_calls, _ = _run(teacher, tset, paired=True)
    for a, b in zip(plain, paired):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    # the student's chain at batch 2 instead of twice at batch 1; the teacher and frozen-student steps at 2N rows
    # (one batch-1 call in both: the session's probe of the backbone's feature sizes)
    assert plain_calls.count(1) == 16 + 1 and paired_calls.count(1) == 1 and paired_calls.count(2) == 8
    assert len(paired_calls) < len(plain_calls)


def test_the_precomputed_targets_and_the_student_gradients_are_those_of_a_separate_pass(teacher, tset):
    """(The parameters after AdamW steps are not compared: a first AdamW step moves each parameter by ±lr whatever
    its gradient's size, so rounding-level differences in near-zero gradient entries flip whole steps.)"""
    def check(tr):
        tr.run_iteration()  # the discriminators' iteration, with the next one's targets
        pending = tr._pending
        positions = tr.data.positions[pending.draws.index].to(tr.device, torch.float32)
        separate = tr.targets(positions, tr.data.conditioning(pending.draws.index))
        worst = max(_rel(a, b) for a, b in zip(pending.targets, separate))
        grads = []
        for targets in (pending.targets, separate):
            tr.backward(pending.draws, True, targets)
            grads.append([p.grad.detach().clone() for p in tr.lora.parameters()])
        flat = [torch.cat([g.flatten() for g in gs]) for gs in grads]
        return worst, _rel(flat[0], flat[1])
    sess = session.Session(teacher, tset, _config(paired_iterations=True))
    worst_targets, grad_diff = sess.run(check)
    assert worst_targets < 1e-5 and grad_diff < 1e-5


def test_a_checkpoint_between_the_pair_resumes_to_the_same_student_step(teacher, tset):
    """After the discriminators' iteration the next draws are made already; the checkpoint records the draw
    generator as it was before them (what an unpaired run resumes from) and before the pair's first draws, so a
    resumed run draws both again and computes the pair's targets as the uninterrupted run did: bit for bit."""
    plain, _, _, _ = _run(teacher, tset, paired=False, iterations=2)
    uninterrupted, _, _, _ = _run(teacher, tset, paired=True, iterations=2)

    saved = {}

    def keep_state(tr):
        saved.update(tr.state_tensors())
        return tr._pending.draws
    _, _, _, pending_draws = _run(teacher, tset, paired=True, iterations=1, on_trainer=keep_state)
    assert int(saved["iteration"]) == 1

    def resume(tr):
        tr.load_state_tensors(saved)
        assert tr._pending is None
        probe = torch.Generator()
        probe.set_state(tr.rng.get_state())
        return tr.run_iteration()  # the student's iteration, the pair's targets computed again
    sess = session.Session(teacher, tset, _config(paired_iterations=True))
    resumed = sess.run(resume)
    assert "rng_pair" in saved
    for key in resumed:  # the same student step as in a run never interrupted
        assert resumed[key] == uninterrupted[1][key], key
        assert resumed[key] == pytest.approx(plain[1][key], rel=1e-5, abs=1e-7), key
    generator = torch.Generator()
    generator.set_state(saved["rng"])
    index = int(torch.randint(0, 6, (1,), generator=generator))
    assert index == pending_draws.index  # the recorded state gives the pending draws again
