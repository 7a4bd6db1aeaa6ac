"""CUDA graphs for the fixed-shape no-grad model passes of training.

At batch 1–8 a UNet pass is bound by the CPU: thousands of small kernel launches, each behind
Python in the host's layers. A graph captured once per input shape replays all of them in one
launch. Only tensors are inputs; everything else a call passes (options dicts, flags) is assumed
not to change the computation for a given key, which the caller's `state` function extends
(e.g. with the LoRA switch, which the LoRA's hooks read in Python)."""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)


def _signature(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__name__  # dicts of options: assumed constant for the call site


class GraphedCalls:
    """fn(*args, **kwargs) replayed from a CUDA graph per (argument shapes, state()) when
    `eligible()` and no grad is needed; eager otherwise, and for good after a failed capture."""

    def __init__(self, fn: Callable, eligible: Callable[[], bool] = lambda: True,
                 state: Callable[[], object] = lambda: None, warmup: int = 2):
        self.fn, self.eligible, self.state, self.warmup = fn, eligible, state, warmup
        self.graphs: dict = {}
        self.pool = None
        self.failed = False
        self.replays = 0
        self.enabled = True

    def __call__(self, *args, **kwargs):
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        if (self.failed or not self.enabled or torch.is_grad_enabled() or not tensors or not all(t.is_cuda for t in tensors)
                or not self.eligible()):
            return self.fn(*args, **kwargs)
        key = (tuple(_signature(a) for a in args), tuple((k, _signature(v)) for k, v in sorted(kwargs.items())),
               self.state())
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self.graphs[key] = self._capture(args, kwargs)
            except Exception as error:  # the pass does something a graph cannot hold: stay eager
                self.failed = True
                self.graphs.clear()
                log.warning("CUDA graph capture failed (%s); running the model eagerly", error)
                torch.cuda.synchronize()
                return self.fn(*args, **kwargs)
        graph, static_args, static_kwargs, output = entry
        for static, new in zip(static_args, args):
            if isinstance(static, torch.Tensor):
                static.copy_(new)
        for name, static in static_kwargs.items():
            if isinstance(static, torch.Tensor):
                static.copy_(kwargs[name])
        graph.replay()
        self.replays += 1
        return output.clone()

    def _capture(self, args, kwargs):
        clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
        static_args = [clone(a) for a in args]
        static_kwargs = {k: clone(v) for k, v in kwargs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: lazy initialisations, autotuning
            for _ in range(self.warmup):
                self.fn(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.fn(*static_args, **static_kwargs)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"graphed call returned {type(output).__name__}, not a tensor")
        return graph, static_args, static_kwargs, output
