"""cuDNN convolution autotuning (`torch.backends.cudnn.benchmark`): on where it pays, off where it stalls.

With autotuning, each convolution configuration met for the first time (shape, dtype, forward / backward-data /
backward-weight) is timed over cuDNN's candidate algorithms. PyTorch (cuDNN v8/v9 frontend path, `Conv_v8.cpp`)
sizes that search's workspace by asking the allocator how much it could hand out (`cacheInfo`), and empties the
allocator's cache after each search (`_cudnn_get_conv_benchmark_empty_cache()`, on by default):

- native allocator: `cacheInfo` reads the driver's free memory and the largest cached block (no allocation);
  emptying the cache frees the unused cached segments.
- cudaMallocAsync (ComfyUI's launcher default on CUDA): `cacheInfo` *allocates* a trial block of all the free
  device memory (`cudaMallocAsync(free)`, then frees it into the pool, whose release threshold PyTorch sets to
  the maximum), and emptying the cache is `cudaDeviceSynchronize` + `cudaMemPoolTrimTo(0)`. So every search maps
  all the card's free memory into the pool and unmaps it again: on a 141 GB H200 hundreds of searches in a UNet
  training step (each resolution, batch size, LoRA and head convolution, three directions) took minutes, most of
  it system time (issue #17; the mechanism and its GPU check: bench/NOTES.md, bench/async_autotune.py).

So under cudaMallocAsync the product runs convolutions on cuDNN's heuristics (no search), and logs that once. On an
H200 that is no slower (training and trajectories within 1% of the native allocator with autotuning:
bench/results/allocator_ab.json), so the nodes' progress lines do not carry it. The modes other than `auto` exist for
the benchmarks' A/B runs (`bench/perf.py --cudnn-autotune`); users set nothing."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from . import cuda_graphs

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off", "on_keep_cache")
# Set by benchmarks only (bench/perf.py --cudnn-autotune); the product always runs "auto".
mode = "auto"

ASYNC_NOTICE = ("cuDNN autotuning is off: under PyTorch's cudaMallocAsync allocator (ComfyUI's default) each "
                "autotuned convolution maps and unmaps all free GPU memory, which stalls training for minutes; "
                "convolutions use cuDNN's heuristics (measured as fast on an H200).")


@dataclass(frozen=True)
class Plan:
    benchmark: bool               # torch.backends.cudnn.benchmark inside the context
    empty_cache_after_search: bool  # PyTorch's per-search cache release (its default: True)
    notice: str | None            # logged once when the safe path is taken


def plan(backend: str, cuda: bool, requested: str = "auto", already_on: bool = False) -> Plan:
    """What to do for an allocator `backend` ('native' or 'cudaMallocAsync'), with or without CUDA, in mode
    `requested`; `already_on`: cudnn.benchmark was on before (the user's or the host's choice)."""
    if requested not in MODES:
        raise ValueError(f"cuDNN autotuning mode {requested!r}: one of {', '.join(MODES)}")
    if not cuda:
        return Plan(already_on, True, None)  # nothing to tune; leave the flag as it was
    if requested == "on":
        return Plan(True, True, None)
    if requested == "off":
        return Plan(False, True, None)
    if requested == "on_keep_cache":  # search, but no cache release after each search (one at the end)
        return Plan(True, False, None)
    if backend == "native":
        return Plan(True, True, None)
    return Plan(False, True, ASYNC_NOTICE)


def current_plan() -> Plan:
    cuda = torch.cuda.is_available()
    return plan(cuda_graphs.allocator_backend() if cuda else "native", cuda, mode, torch.backends.cudnn.benchmark)


_told: set = set()


def _empty_cache_after_search(value: bool | None = None) -> bool:
    """PyTorch's per-search cache release switch (read, or set when `value` is given); builds without it (no CUDA
    support compiled in) have nothing to release: True, and setting does nothing."""
    get = getattr(torch._C, "_cuda_get_conv_benchmark_empty_cache", None)
    set_ = getattr(torch._C, "_cudnn_set_conv_benchmark_empty_cache", None)
    if value is not None and set_ is not None:
        set_(value)
    return get() if get is not None else True


@contextlib.contextmanager
def autotuned():
    """While inside: cuDNN autotuning as `current_plan()` says; restored on exit (with `on_keep_cache`, the cache
    the searches left is released once on exit)."""
    chosen = current_plan()
    if chosen.notice and chosen.notice not in _told:
        _told.add(chosen.notice)
        log.info("RAPM: %s", chosen.notice)
    saved = torch.backends.cudnn.benchmark
    saved_empty = _empty_cache_after_search()
    torch.backends.cudnn.benchmark = chosen.benchmark
    _empty_cache_after_search(chosen.empty_cache_after_search)
    try:
        yield chosen
    finally:
        torch.backends.cudnn.benchmark = saved
        _empty_cache_after_search(saved_empty)
        if not chosen.empty_cache_after_search and torch.cuda.is_available():
            torch.cuda.empty_cache()
