"""Each side's whole step as one CUDA graph (Config.step_graphs, issue #17: the per-pass graphs with grad crash
under cudaMallocAsync). On the CPU the steps run eagerly through the same code: their losses and gradients
(torch.autograd.grad inside the step) must be those of the per-pass path (loss.backward()), and the conditioning the
graph would keep must line up tensor for tensor between trajectories. The capture itself needs a GPU (bench/NOTES.md)."""
import functools

import pytest
import torch

import rapm_fixtures
from headless import tiny_models
from comfy_rapm import cuda_graphs, session


@pytest.fixture(scope="module")
def teacher(host):
    return tiny_models.make_model_patcher("sd15", seed=5)


@pytest.fixture(scope="module")
def tset(host, teacher, tmp_path_factory):
    folder = tmp_path_factory.mktemp("step_graphs") / "set"
    return rapm_fixtures.make_trajectory_set(folder, teacher, count=4, steps=4, fine_steps=2, cfg=2.0, prompts=2)


_config = functools.partial(rapm_fixtures.tiny_training_config, seed=7)


def _student_step(teacher, tset, step_graphs, **kw):
    """One discriminators' iteration, then the student's backward on the next draws: its losses and gradients."""
    sess = session.Session(teacher, tset, _config(step_graphs=step_graphs, **kw))

    def fit(tr):
        assert (tr.step_graphs is not None) is step_graphs
        tr.run_iteration()
        draws = tr.draw()
        result = tr.backward(draws, True)
        return result, [p.grad.detach().clone() for p in tr.lora.parameters()]
    return sess.run(fit)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("mode", ["rapm", "absolute_only"])
def test_the_whole_step_gives_the_losses_and_gradients_of_the_per_pass_backward(teacher, tset, mode):
    per_pass, per_pass_grads = _student_step(teacher, tset, False, mode=mode)
    whole, whole_grads = _student_step(teacher, tset, True, mode=mode)
    for key in ("loss", "huber", "generator"):
        assert whole[key] == pytest.approx(per_pass[key], rel=1e-5, abs=1e-8), key
    assert per_pass["generator"] != 0  # the adversarial term is in the comparison
    flat = [torch.cat([g.flatten() for g in grads]) for grads in (per_pass_grads, whole_grads)]
    assert flat[0].norm() > 0 and _rel(flat[1], flat[0]) < 1e-4


def test_low_memory_steps_through_step_graphs_unless_cuda_graphs_are_off(teacher, tset):
    assert session.Session(teacher, tset, _config(low_memory=True)).run(lambda tr: tr.step_graphs) is not None
    eager = session.Session(teacher, tset, _config(low_memory=True, cuda_graphs=False))
    assert eager.run(lambda tr: (tr.step_graphs, eager.graphs)) == (None, None)


def test_the_kept_conditioning_lines_up_between_trajectories(teacher, tset):
    from comfy_rapm import host
    sess = session.Session(teacher, tset, _config())

    def handles(tr):
        return [host.conditioning_tensors(tr.data.conditioning(i)) for i in (0, 1)]
    first, second = sess.run(handles)
    assert len(first) == len(second) > 0
    assert [(t.shape, t.dtype) for t in first] == [(t.shape, t.dtype) for t in second]
    assert all(t.device == torch.device("cpu") for t in first)  # the denoiser's device
    positive = sess.data[1].positive[0][0]  # trajectory 1's prompt embedding is among its handle's tensors
    assert any(t.shape == positive.shape and torch.equal(t, positive) for t in second)
    assert not any(t.shape == positive.shape and torch.equal(t, positive) for t in first)


def test_off_cuda_the_step_runs_eagerly_and_nothing_is_captured():
    calls = []
    graphs = cuda_graphs.StepGraphs(lambda handle: [handle], pause=lambda: pytest.fail("paused off CUDA"))
    x, handle = torch.ones(2), torch.zeros(2)
    out = graphs(lambda tensors, h: calls.append(h) or (tensors[0] * 2, tensors[0] + h), (x, None), handle)
    assert calls == [handle] and torch.equal(out[0], 2 * x) and torch.equal(out[1], x)
    assert graphs.graphs == {} and graphs.replays == 0 and not graphs.failed


def test_the_step_asks_nothing_of_the_device_that_a_capture_forbids(teacher, tset, monkeypatch):
    """The check StepGraphs runs before a capture (cuda_graphs.capture_blockers) finds nothing in the student's step,
    host sampling code included: the finiteness checks and .item() come after the replay."""
    from torch.utils._python_dispatch import TorchDispatchMode
    seen, found = [], []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    def checked(self, step, tensors, handle):
        with Record():
            result, blockers = cuda_graphs.capture_blockers(lambda: step(tensors, handle))
        found.extend(blockers)
        return result
    monkeypatch.setattr(cuda_graphs.StepGraphs, "__call__", checked)
    _student_step(teacher, tset, True)
    assert "convolution.default" in seen  # the UNet ran under the check
    assert found == []


def test_the_capture_check_names_host_waits_and_copies_between_host_and_device():
    x = torch.ones(3)

    def step():
        total = x.sum()
        if total.item() > 0:  # .item(): the host waits
            return x.to("meta"), bool(total > 1)  # a copy off the host; a truth value
        return x, False
    result, blockers = cuda_graphs.capture_blockers(step)
    assert result[0].device.type == "meta" and result[1] is True
    assert len(blockers) == 2  # _local_scalar_dense is named once, for both waits
    assert "_local_scalar_dense" in blockers[0] and "from cpu to meta" in blockers[1]
    assert cuda_graphs.capture_blockers(lambda: (x * 2).sum())[1] == []


@pytest.mark.parametrize("mode", ["rapm", "relative_only"])
def test_the_discriminators_whole_step_gives_the_loss_and_gradients_of_head_by_head_backward(teacher, tset, mode):
    def discriminator_step(step_graphs):
        sess = session.Session(teacher, tset, _config(step_graphs=step_graphs, mode=mode))

        def fit(tr):
            result = tr.backward(tr.draw(), False)
            return result, [None if p.grad is None else p.grad.detach().clone() for p in tr.discriminators.parameters()]
        return sess.run(fit)
    (per_head, per_head_grads), (whole, whole_grads) = discriminator_step(False), discriminator_step(True)
    assert whole["discriminator"] == pytest.approx(per_head["discriminator"], rel=1e-6)
    assert [g is None for g in whole_grads] == [g is None for g in per_head_grads]  # relative_only: D2 keeps none
    assert any(g is None for g in per_head_grads) == (mode == "relative_only")
    for a, b in zip(per_head_grads, whole_grads):
        if a is not None:
            assert torch.equal(a, b)


def test_a_failed_calls_frames_and_their_tensors_can_be_released_inside_the_capture():
    """What cuda_graphs._capture_into does when a captured call raises: with the tracebacks of the exception and of
    those it chains dropped, the tensors the failed frames held are freed at once (inside the capture, on a GPU)."""
    import weakref
    held = []

    def inner():
        tensor = torch.ones(4)
        held.append(weakref.ref(tensor))
        raise ValueError("inner")

    def outer():
        tensor = torch.zeros(4)
        held.append(weakref.ref(tensor))
        try:
            inner()
        except ValueError as error:
            raise RuntimeError("outer") from error

    try:
        outer()
    except RuntimeError as error:
        failure = cuda_graphs._without_frames(error)
        del error
    assert all(ref() is None for ref in held) and len(held) == 2  # freed by reference counts, no collection needed
    assert str(failure) == "outer" and str(failure.__cause__) == "inner" and failure.__traceback__ is None


def test_the_targets_graph_option_runs_the_targets_through_their_own_step_graphs(teacher, tset):
    """Config.targets_graph: targets() goes through a second StepGraphs (eager on the CPU, the same values); a
    failed targets capture must not turn the steps' graphs off, so it is its own object, and off by default."""
    def targets(targets_graph):
        sess = session.Session(teacher, tset, _config(targets_graph=targets_graph))

        def fit(tr):
            assert (tr.targets_graphs is not None) is targets_graph and tr.targets_graphs is not tr.step_graphs
            called = []
            if targets_graph:
                real = tr.targets_graphs.__call__
                tr.targets_graphs = lambda step, tensors, handle: called.append(step) or real(step, tensors, handle)
            positions = tr.data.positions[1].to(tr.device, torch.float32)
            out = tr.targets(positions, tr.data.conditioning(1))
            assert len(called) == int(targets_graph)
            return out
        return sess.run(fit)
    plain, graphed = targets(False), targets(True)
    assert len(graphed) == 3 and all(torch.equal(a, b) for a, b in zip(plain, graphed))

    def paired(targets_graph):
        sess = session.Session(teacher, tset, _config(targets_graph=targets_graph, paired_iterations=True))

        def fit(tr):
            called = []
            if targets_graph:
                real = tr.targets_graphs.__call__
                tr.targets_graphs = lambda step, tensors, handle: called.append(len(tensors)) or real(step, tensors, handle)
            first, second = tr.draw(), tr.draw()
            out = tr.paired_targets(first, second)
            assert called == ([2] if targets_graph else [])  # both draws' positions, one graph
            return [t for pair in out for t in pair]
        return sess.run(fit)
    assert all(torch.equal(a, b) for a, b in zip(paired(False), paired(True)))
    assert session.Session(teacher, tset, _config(targets_graph=True, cuda_graphs=False)).run(lambda tr: tr.targets_graphs) is None


def test_low_memory_steps_slot_by_slot_through_one_step_graph(teacher, tset):
    """low_memory (CUDA graphs on by default): the student's step is one graph per slot (one shape, replayed per slot),
    the gradients summed over the slots: the losses and gradients of the eager slot-by-slot backward (cuda_graphs off)."""
    eager, eager_grads = _student_step(teacher, tset, False, low_memory=True, cuda_graphs=False)
    calls = []
    real = cuda_graphs.StepGraphs.__call__

    def counted(self, step, tensors, handle):
        calls.append(tuple(None if t is None else t.shape[0] for t in tensors))
        return real(self, step, tensors, handle)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cuda_graphs.StepGraphs, "__call__", counted)
        graphed, graphed_grads = _student_step(teacher, tset, True, low_memory=True)
    assert calls[-4:] == [(1,) * 8] * 4  # the student's turn: four one-slot steps
    for key in ("loss", "huber", "generator"):
        assert graphed[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-8), key
    flat = [torch.cat([g.flatten() for g in grads]) for grads in (eager_grads, graphed_grads)]
    assert flat[0].norm() > 0 and _rel(flat[1], flat[0]) < 1e-5
