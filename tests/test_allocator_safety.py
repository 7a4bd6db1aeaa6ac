"""Issue #17, item 1: under PyTorch's cudaMallocAsync allocator (ComfyUI's default) the nodes take the safe path
for cuDNN autotuning, set cuDNN's flags only inside their run, and log it once; the training node's progress line names
the safe paths that are slower."""
import dataclasses
import pytest
import torch

from comfy_rapm import convolutions, cuda_graphs


@pytest.mark.parametrize("backend, cuda, mode, already_on, expected", [
    ("native", True, "auto", False, (True, True, False)),           # full speed, as before
    ("cudaMallocAsync", True, "auto", False, (False, True, True)),  # the safe path, and it says so
    ("cudaMallocAsync", True, "auto", True, (False, True, True)),   # even where someone turned autotuning on
    ("native", False, "auto", True, (True, True, False)),           # no GPU: the flag stays as it was
    ("native", False, "auto", False, (False, True, False)),
    ("cudaMallocAsync", True, "on", False, (True, True, False)),    # the benchmarks' A/B modes
    ("cudaMallocAsync", True, "on_keep_cache", False, (True, False, False)),
    ("native", True, "off", False, (False, True, False)),
])
def test_the_plan_for_each_allocator_and_mode(backend, cuda, mode, already_on, expected):
    p = convolutions.plan(backend, cuda, mode, already_on)
    assert (p.benchmark, p.empty_cache_after_search, p.notice is not None) == expected
    if p.notice:
        assert "cudaMallocAsync" in p.notice and "heuristics" in p.notice


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="on_keep_cache"):
        convolutions.plan("native", True, "sometimes")


@pytest.mark.parametrize("backend, inside", [("native", True), ("cudaMallocAsync", False)])
def test_the_context_sets_cudnn_flags_inside_and_restores_them(monkeypatch, backend, inside):
    monkeypatch.setattr(convolutions.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_graphs, "allocator_backend", lambda: backend)
    before = (torch.backends.cudnn.benchmark, torch._C._cuda_get_conv_benchmark_empty_cache())
    torch.backends.cudnn.benchmark = True  # as ComfyUI's --fast autotune leaves it
    try:
        with convolutions.autotuned() as chosen:
            assert torch.backends.cudnn.benchmark is inside and chosen.benchmark is inside
            assert torch._C._cuda_get_conv_benchmark_empty_cache() is True
        assert torch.backends.cudnn.benchmark is True  # restored
        monkeypatch.setattr(convolutions, "mode", "on_keep_cache")
        with convolutions.autotuned():
            assert torch.backends.cudnn.benchmark is True and torch._C._cuda_get_conv_benchmark_empty_cache() is False
        assert torch._C._cuda_get_conv_benchmark_empty_cache() is True
    finally:
        torch.backends.cudnn.benchmark, empty = before
        torch._C._cudnn_set_conv_benchmark_empty_cache(empty)


def _screen(monkeypatch):
    import server
    texts = []

    class Screen:  # what the front end shows on the node
        def send_progress_text(self, text, node_id, sid=None):
            texts.append(text)
    monkeypatch.setattr(server.PromptServer, "instance", Screen(), raising=False)
    return texts


def _convolution_modules(host):
    """The tests' comfy_rapm.convolutions and the copy the host loaded with the pack's nodes."""
    import importlib
    import sys
    package = sys.modules[host.NODE_CLASS_MAPPINGS["RAPMTrain"].__module__].session.__name__.rsplit(".", 1)[0]
    return convolutions, importlib.import_module(package + ".convolutions")


def _pretend_cuda_malloc_async(monkeypatch, host):
    """The decision as a CUDA process under cudaMallocAsync makes it (this machine has no GPU), in both copies of
    the package: the tests' `comfy_rapm` and the one the host loaded with the pack's nodes."""
    import importlib
    import sys
    package = sys.modules[host.NODE_CLASS_MAPPINGS["RAPMTrain"].__module__].session.__name__.rsplit(".", 1)[0]
    for conv, graphs in ((convolutions, cuda_graphs), (importlib.import_module(package + ".convolutions"),
                                                       importlib.import_module(package + ".cuda_graphs"))):
        async_plan = conv.plan("cudaMallocAsync", True)
        monkeypatch.setattr(conv, "current_plan", lambda p=async_plan: p)
        monkeypatch.setattr(graphs, "allocator_backend", lambda: "cudaMallocAsync")


def test_teacher_trajectories_turn_autotuning_off_and_log_it_once_off_their_progress_line(host, monkeypatch, tmp_path):
    """Under cudaMallocAsync the node runs convolutions on cuDNN's heuristics: no slower on an H200, so its progress
    line stays clean and ComfyUI's console says it once."""
    import logging
    from headless import tiny_models
    _pretend_cuda_malloc_async(monkeypatch, host)
    texts = _screen(monkeypatch)
    model = tiny_models.make_model_patcher("sd15", seed=2)
    seen = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda m, a: seen.append(torch.backends.cudnn.benchmark))
    torch.backends.cudnn.benchmark = True  # someone had it on: the node turns it off for its passes and back
    try:
        clip = type("Clip", (), {})()
        node = host.NODE_CLASS_MAPPINGS["RAPMTeacherTrajectory"]()
        cond = tiny_models.make_conditioning("sd15", 1, seed=1)
        import sys
        monkeypatch.setattr(sys.modules[type(node).__module__].host, "encode_text", lambda clip, text: cond)
        logged = []
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda record: logged.append(record.getMessage())
        for conv in _convolution_modules(host):
            conv._told.clear()
            conv.log.addHandler(handler)
            monkeypatch.setattr(conv.log, "level", logging.INFO)
        try:
            with torch.inference_mode():
                for name in ("notice", "again"):
                    node.generate(model, clip, prompts="a", negative_prompt="", width=64, height=64, count=2, steps=2,
                                  fine_steps=1, cfg=2.0, seed=0, batch_size=1, name=name, unique_id="3")
        finally:
            for conv in _convolution_modules(host):
                conv.log.removeHandler(handler)
    finally:
        handle.remove()
        benchmark_after, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    assert seen and not any(seen) and benchmark_after is True
    batch_lines = [t for t in texts if t.startswith(("1/2", "2/2"))]
    assert len(batch_lines) == 4 and not any("autotuning" in t for t in texts)
    assert logged.count("RAPM: " + convolutions.ASYNC_NOTICE) == 1


def test_training_sessions_name_every_safe_path_they_take(host, monkeypatch, tmp_path):
    import rapm_fixtures
    from headless import tiny_models
    from comfy_rapm import session, settings
    teacher = tiny_models.make_model_patcher("sd15", seed=3)
    tset = rapm_fixtures.make_trajectory_set(tmp_path / "set", teacher, count=2, steps=2, fine_steps=1, cfg=2.0)
    config = settings.Config(iterations=2, lora_rank=2, lora_alpha=2.0, learning_rate=1e-3,
                            discriminator_learning_rate=1e-3, delta=20, seed=0, checkpoint_every=10)
    assert session.Session(teacher, tset, config).safe_path_notice is None  # the CPU: nothing slower taken
    _pretend_cuda_malloc_async(monkeypatch, host)
    # the default, each side's whole step as one graph, runs under cudaMallocAsync at full speed: nothing to say
    assert session.Session(teacher, tset, config).safe_path_notice is None
    per_pass = dataclasses.replace(config, step_graphs=False)
    notice = session.Session(teacher, tset, per_pass).safe_path_notice
    assert "student's passes with grad" in notice and "\n" not in notice
    sess = session.Session(teacher, tset, config)

    def failed_capture(tr):  # what a failed capture leaves (no capture runs off CUDA)
        tr.step_graphs.failed, tr.step_graphs.error = True, "RuntimeError: a reason"
        return sess.safe_path_notice
    notice = sess.run(failed_capture)
    assert "whole training steps are off (RuntimeError: a reason)" in notice and "\n" not in notice


def test_builds_without_the_cache_release_switch_still_run(monkeypatch):
    """CPU-only or MPS builds of torch (ComfyUI on a Mac) may lack PyTorch's cuDNN switch: nothing to set there."""
    for name in ("_cuda_get_conv_benchmark_empty_cache", "_cudnn_set_conv_benchmark_empty_cache"):
        monkeypatch.delattr(torch._C, name, raising=False)
    with convolutions.autotuned() as chosen:
        assert chosen.notice is None
