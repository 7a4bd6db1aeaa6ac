"""CUDA graphs for the fixed-shape model passes of training.

At batch 1–12 a UNet pass is bound by the CPU: thousands of small kernel launches, each behind
Python in the host's layers. A graph captured once per input shape replays all of them in one
launch. Only tensors are inputs; everything else a call passes (options dicts, flags) is assumed
not to change the computation for a given key, which the caller's `state` function extends
(e.g. with the LoRA switch, which the LoRA's hooks read in Python).

No-grad calls replay one graph and return copies of its outputs. Calls with grad (`graded`) go
through torch.cuda.make_graphed_callables: a forward and a backward graph, with gradients for the
tensor inputs that require them and for `parameters()` (the LoRA: read by the graph in place, so
optimizer steps are seen). Each graded key gets its own memory pool: a graded forward's saved
activations must survive other graphs' replays until its backward runs."""
from __future__ import annotations

import contextlib
import gc
import logging
import weakref
from typing import Callable

import torch

log = logging.getLogger(__name__)
_BUSY = object()


def allocator_backend() -> str:
    """The CUDA allocator PyTorch runs with: 'native', or 'cudaMallocAsync' (what ComfyUI's launcher picks by
    default on CUDA builds of torch 2, unless started with --disable-cuda-malloc)."""
    if not torch.cuda.is_available():
        return "native"
    return torch.cuda.memory.get_allocator_backend()


def parameter_graphs_unsupported_reason() -> str | None:
    """Why passes with grad for `parameters()` (the student's, through the LoRA) must not be graphed in this
    process, or None. Under cudaMallocAsync (H100 and H200, torch 2.11, bench/NOTES.md) the training crashed in a backward
    graph's replay when both the student's and the discriminator backbone's passes with grad were graphed; with
    either alone it ran, and with the backbone's alone (what the product keeps) it matched eager passes."""
    backend = allocator_backend()
    if backend != "native":
        return (f"PyTorch's CUDA allocator is {backend}, under which CUDA graphs of the student's passes with grad "
                "crashed in our tests; those passes run without CUDA graphs, which is slower.")
    return None


def _signature(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.requires_grad)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__  # dicts of options: assumed constant for the call site


class TensorSlots:
    """Where the tensors sit in a call's (args, kwargs), to call again with other tensors and the
    same non-tensor arguments."""

    def __init__(self, args: tuple, kwargs: dict):
        self.positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        self.names = [k for k in sorted(kwargs) if isinstance(kwargs[k], torch.Tensor)]
        self.args = [None if isinstance(a, torch.Tensor) else a for a in args]
        self.kwargs = {k: None if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}

    def tensors(self, args: tuple, kwargs: dict) -> tuple:
        return tuple(args[i] for i in self.positions) + tuple(kwargs[k] for k in self.names)

    def call(self, fn: Callable, tensors: tuple):
        args, kwargs = list(self.args), dict(self.kwargs)
        for i, t in zip(self.positions, tensors):
            args[i] = t
        for name, t in zip(self.names, tensors[len(self.positions):]):
            kwargs[name] = t
        return fn(*args, **kwargs)


class _WithParameters(torch.nn.Module):
    """fn over tensors, owning `parameters` so make_graphed_callables differentiates them too."""

    def __init__(self, fn: Callable, parameters: torch.nn.Module):
        super().__init__()
        self.fn = fn
        self.owner = parameters

    def forward(self, *tensors):
        return self.fn(*tensors)


@contextlib.contextmanager
def _side_stream():
    """Inside: a fresh stream that starts after the current one's work; on leaving, the current stream waits for it
    (warm-up runs before a capture, which must not be on the stream being captured)."""
    current, side = torch.cuda.current_stream(), torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


# Graphs whose capture raised, under an allocator other than the native one: kept, never replayed (_capture_into).
_NEVER_REPLAYED: list = []


def _without_frames(error: BaseException) -> BaseException:
    """`error` and the exceptions it chains with their tracebacks dropped: nothing keeps the failed call's frames, or
    the tensors in them, alive."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += [e.__cause__, e.__context__]
    return error


def _capture_into(graph, call: Callable[[], object], **options):
    """call() captured into `graph` (options: torch.cuda.graph's). If call raises, the tensors its frames hold (allocated
    inside the capture) are released before the capture ends, and the graph is then raised past. Under cudaMallocAsync
    a tensor of a failed capture freed after the capture ends aborts the process (free_impl: invalid argument; H200,
    2026-12-03, bench/NOTES.md): the unreplayed graph is kept rather than destroyed under what it allocated, and so
    are call()'s outputs when the capture fails only at its end."""
    failure, result = None, None
    try:
        with torch.cuda.graph(graph, **options):
            try:
                result = call()
            except Exception as error:
                failure = _without_frames(error)
                del error
                gc.collect()  # reference cycles through the frames: collected while the capture is still open
    except Exception as error:  # the capture's end failed (e.g. work forked to another stream and never joined)
        failure = _without_frames(error)
        del error
        _release_default_generators()
    if failure is not None:
        if allocator_backend() != "native":
            # call()'s outputs, if it returned: allocated in the failed capture, so never to be freed
            _NEVER_REPLAYED.append((graph, result))
        raise failure
    return result


def _release_default_generators() -> None:
    """After a capture whose end failed: the devices' default generators were left in capture mode, and every later
    random draw on the GPU in this process (the host's samplers' noise included) would raise "Offset increment outside
    graph capture encountered unexpectedly" (H200, 2026-12-04). Each gets a copy of its own seed and offset, which is
    not capturing. (Unverified on a GPU yet: bench/async_failed_capture.py's `unjoined` case checks it.)"""
    for generator in torch.cuda.default_generators:
        try:
            generator.graphsafe_set_state(generator.clone_state())
        except (AttributeError, RuntimeError) as error:  # a torch without graph-safe generator states
            log.warning("could not take the GPU's random generator out of capture mode: %s", error)


def _outputs(value) -> tuple:
    values = value if isinstance(value, (tuple, list)) else (value,)
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        raise TypeError(f"graphed call returned {type(value).__name__}, not a tensor or tensors")
    return tuple(values)


class GraphedCalls:
    """fn(*args, **kwargs) replayed from CUDA graphs per (argument shapes, grad mode, state()) for CUDA
    tensors; eager otherwise, and for good after a failed capture. fn returns a tensor or a
    tuple of tensors. With grad enabled, only when `graded` and something needs a gradient (a tensor
    input, or `parameters()` when it returns a module; the latter only with `graded_parameters`); a failed
    capture with grad turns `graded` off."""

    def __init__(self, fn: Callable, state: Callable[[], object] = lambda: None, warmup: int = 2,
                 graded: bool = False, parameters: Callable[[], torch.nn.Module | None] = lambda: None,
                 graded_parameters: bool = True, interrupts: tuple[type, ...] = ()):
        self.fn, self.state, self.warmup = fn, state, warmup
        self.interrupts = interrupts  # the host's Cancel, raised by an op during a capture: never "capture failed"
        self.graded, self.parameters, self.graded_parameters = graded, parameters, graded_parameters
        self.graphs: dict = {}
        self.pool = None
        self.failed = False
        self.error = None  # the last capture's failure, if any
        self.replays = 0
        self.busy = 0  # graded calls run eagerly because their graph's last replay awaited its backward
        self.enabled = True

    @contextlib.contextmanager
    def paused(self):
        """Calls run eagerly while inside (e.g. while an enclosing CUDA graph is captured)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    def __call__(self, *args, **kwargs):
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        if self.failed or not self.enabled or not tensors or not all(t.is_cuda for t in tensors):
            return self.fn(*args, **kwargs)
        grad = torch.is_grad_enabled()
        owner = self.parameters() if grad else None
        if grad and not (self.graded and (owner is not None or any(t.requires_grad for t in tensors))):
            return self.fn(*args, **kwargs)
        if grad and owner is not None and not self.graded_parameters:
            return self.fn(*args, **kwargs)
        key = (grad, tuple(_signature(a) for a in args), tuple((k, _signature(v)) for k, v in sorted(kwargs.items())),
               self.state())
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self.graphs[key] = self._capture_graded(args, kwargs, owner) if grad else self._capture(args, kwargs)
            except Exception as error:  # the pass does something a graph cannot hold: stay eager
                if isinstance(error, self.interrupts):
                    raise
                self.error = f"{type(error).__name__}: {error}"
                if grad:  # the no-grad graphs stay
                    self.graded = False
                    log.warning("CUDA graph capture of a pass with grad failed (%s); those run eagerly", self.error)
                else:
                    self.failed = True
                    self.graphs.clear()
                    log.warning("CUDA graph capture failed (%s); running the model eagerly", self.error)
                torch.cuda.synchronize()
            finally:
                torch.cuda.empty_cache()  # the warm-up's blocks, cached for its side stream only
            if entry is None:  # eagerly, after the except: the failed capture's traceback (its tensors) is gone
                return self.fn(*args, **kwargs)
        result = entry(args, kwargs)
        if result is _BUSY:
            self.busy += 1
            return self.fn(*args, **kwargs)
        self.replays += 1
        return result

    def _capture(self, args, kwargs):
        slots = TensorSlots(args, kwargs)
        static = tuple(t.clone() for t in slots.tensors(args, kwargs))
        with _side_stream():  # warm-up off the capture: lazy initialisations, autotuning
            for _ in range(self.warmup):
                slots.call(self.fn, static)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        output = _capture_into(graph, lambda: slots.call(self.fn, static), pool=self.pool)
        single = isinstance(output, torch.Tensor)
        outputs = _outputs(output)

        def replay(args, kwargs):
            for buffer, new in zip(static, slots.tensors(args, kwargs)):
                buffer.copy_(new)
            graph.replay()
            copies = tuple(o.clone() for o in outputs)
            return copies[0] if single else copies
        return replay

    def _capture_graded(self, args, kwargs, owner):
        slots = TensorSlots(args, kwargs)
        samples = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in slots.tensors(args, kwargs))
        single = []

        def fn(*tensors):
            output = slots.call(self.fn, tensors)
            single.append(isinstance(output, torch.Tensor))
            return _outputs(output)
        callable_ = _WithParameters(fn, owner) if owner is not None else fn
        graphed = torch.cuda.make_graphed_callables(callable_, samples, num_warmup_iters=self.warmup,
                                                    allow_unused_input=True)

        pending = {"node": lambda: None, "done": True}

        def replay(args, kwargs):
            # The graph's outputs and saved activations live at fixed addresses: replaying it again while
            # the last replay's backward may still run would overwrite what that backward reads.
            if not pending["done"] and pending["node"]() is not None:
                return _BUSY
            outputs = graphed(*slots.tensors(args, kwargs))
            node = next((o.grad_fn for o in outputs if o.grad_fn is not None), None)
            if node is not None:
                pending.update(node=weakref.ref(node), done=False)
                node.register_hook(lambda *_: pending.update(done=True))
            return outputs[0] if single[-1] else tuple(outputs)
        return replay


# Ops a CUDA graph capture refuses because the host would wait for the device (.item(), a tensor's truth value, a
# data-dependent shape).
_HOST_WAITS = frozenset({"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "masked_select", "_unique2",
                         "unique_consecutive", "unique_dim"})


class CaptureBlocked(RuntimeError):
    """A step does what a CUDA graph capture forbids; found in an eager run before any capture."""


def capture_blockers(call: Callable[[], object]) -> tuple[object, list[str]]:
    """Run `call()` eagerly and list what would make a CUDA graph capture of it fail: ops that make the host wait
    for the device, and copies between the host and a device from memory that is not pinned (a capture raises on
    them, and under cudaMallocAsync the tensors a failed capture leaves behind crash the process when freed).
    Returns (call's result, the blockers, each once, first seen first)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    found: dict[str, None] = {}

    def device_of(value):
        return value.device if isinstance(value, torch.Tensor) else None

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = func.__name__.split(".")[0]
            if name in _HOST_WAITS:
                found[f"{func.__name__} (the host waits for the device)"] = None
            elif name in ("_to_copy", "copy_"):
                source, target = (args[0], out) if name == "_to_copy" else (args[1], args[0])
                devices = (device_of(source), device_of(target))
                if None not in devices and devices[0] != devices[1] and "cpu" in (devices[0].type, devices[1].type):
                    host_side = source if devices[0].type == "cpu" else target
                    if not host_side.is_pinned():
                        found[f"{func.__name__} from {devices[0]} to {devices[1]} (unpinned host memory)"] = None
            return out
    with Watch():
        result = call()
    return result, list(found)


class StepGraphs:
    """A whole step with grad — model passes, losses and `torch.autograd.grad` into the parameters — replayed from one
    CUDA graph per input signature. Every allocation of the step is made and freed inside its graph, which is what
    PyTorch's cudaMallocAsync allocator supports (the per-pass graded graphs above crash under it: bench/NOTES.md).

    `step(tensors, handle)` returns a tuple of tensors; `tensors` is a tuple of tensors or None; `handle` is an object
    (the host's conditioning) whose tensors `tensors_of(handle)` lists in a fixed order: the first call's handle is
    kept, and later calls copy their handle's tensors into it. The returned tensors (or Nones) are the graph's own
    outputs: valid until the next call with that signature. `pause()` is a context in which the per-pass graphs stand
    aside (no capture inside a capture). Eager off CUDA, and for good after a failed capture (`error` says why)."""

    def __init__(self, tensors_of: Callable[[object], list], pause: Callable[[], object], warmup: int = 2,
                 interrupts: tuple[type, ...] = (), pool=None):
        self.tensors_of, self.pause, self.warmup, self.interrupts = tensors_of, pause, warmup, interrupts
        self.graphs: dict = {}
        self.pool = pool  # a graph_pool_handle() shared with other graphs never replayed at the same time; None: its own
        self.failed = False
        self.error = None
        self.replays = 0

    def __call__(self, step: Callable, tensors: tuple, handle) -> tuple:
        present = [t for t in tensors if t is not None]
        if self.failed or not present or not all(t.is_cuda for t in present):
            return step(tensors, handle)
        handle_tensors = self.tensors_of(handle)
        key = (tuple(_signature(t) for t in tensors), tuple(_signature(t) for t in handle_tensors))
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self.graphs[key] = self._capture(step, tensors, handle)
            except Exception as error:
                if isinstance(error, self.interrupts):
                    raise
                self.failed, self.error = True, f"{type(error).__name__}: {error}"
                self.graphs.clear()
                log.warning("CUDA graph capture of a whole training step failed (%s); the steps run eagerly", self.error)
                torch.cuda.synchronize()
            finally:
                torch.cuda.empty_cache()
            if entry is None:
                return step(tensors, handle)
        self.replays += 1
        return entry(tensors, handle_tensors)

    def _capture(self, step, tensors, handle):
        static = tuple(None if t is None else t.detach().clone() for t in tensors)
        static_handle = self.tensors_of(handle)  # the first handle is kept as the graph's own
        with self.pause():
            with _side_stream():  # off the capture: lazy initialisations, workspaces
                _, blockers = capture_blockers(lambda: step(static, handle))
                if blockers:
                    raise CaptureBlocked("the step cannot be captured: " + "; ".join(blockers))
                for _ in range(self.warmup - 1):
                    step(static, handle)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # relaxed: the host's sampling code asks the driver for free memory (cudaMemGetInfo) to size its batches
            outputs = _capture_into(graph, lambda: tuple(step(static, handle)), pool=self.pool,
                                    capture_error_mode="relaxed")

        def replay(tensors, handle_tensors):
            for buffer, new in zip(static, tensors):
                if buffer is not None:
                    buffer.copy_(new)
            for buffer, new in zip(static_handle, handle_tensors):
                if buffer is not new:
                    buffer.copy_(new)
            graph.replay()
            return outputs
        return replay
