"""bench/perf.py with only some of the passes with grad graphed, to find which graded graph crashes under
PyTorch's cudaMallocAsync allocator (run with PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync):

    python -X faulthandler bench/async_bisect.py --graded student -- --models sd15 --variants default ...

--graded student: only the student's passes (the LoRA on) are graphed with grad; backbone: only the
discriminator backbone's passes with grad to their input (the LoRA off); both: what the product does.
--no-empty-cache: skip the cache release GraphedCalls does after each capture. --no-cudnn-benchmark: cuDNN
without autotuning (RAPM Train turns it on). --sdpa math: attention by PyTorch's math kernels only (no flash or
memory-efficient kernels, whose backward allocates its own workspaces). cuBLAS workspaces: set
CUBLAS_WORKSPACE_CONFIG=:0:0 and CUBLASLT_WORKSPACE_SIZE=0 in the environment.

Candidate fixes for the crash with both graded graphs (2026-12-03 leads): --first-use-eager: a graded graph is
first replayed at its next use, so no capture runs while another graded forward awaits its backward;
--keep-grads: the LoRA's gradients allocated once outside any capture and zeroed in place (AccumulateGrad adds
into them instead of keeping a graph's output); --gc-off-capture: Python's garbage collector off during graded
captures (no unrelated tensor freed inside one); --sync-replays: the device synchronised around every graph
replay (a diagnostic: if that runs, the crash is an ordering one)."""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import perf  # noqa: E402
from comfy_rapm import cuda_graphs  # noqa: E402


def trace_graphs(dump_dir: Path | None):
    """Names every CUDA graph at its capture (gN, in order; what ran it: the backbone or not, with grad or not), prints
    every replay, synchronised, and the replay that faults. With dump_dir: each graph's memory nodes from CUDA's DOT
    dump, and which graph allocated what another graph frees (the cudaMallocAsync crash's working hypothesis)."""
    import json
    import re
    import traceback
    names: dict = {}
    memory: dict = {}
    begin, end, replay = torch.cuda.CUDAGraph.capture_begin, torch.cuda.CUDAGraph.capture_end, torch.cuda.CUDAGraph.replay

    def stack():
        return {f.name for f in traceback.extract_stack()}

    def named_begin(self, *a, **k):
        frames = stack()
        side = "backbone" if "backbone_features" in frames else "student/teacher"
        names[id(self)] = f"g{len(names)}({side}{', grad' if torch.is_grad_enabled() or 'make_graphed_callables' in frames else ''})"
        print("capture", names[id(self)], flush=True)
        if dump_dir is not None:
            self.enable_debug_mode()
        return begin(self, *a, **k)

    def dumped_end(self):
        end(self)
        if dump_dir is None:
            return
        dump_dir.mkdir(parents=True, exist_ok=True)
        dot = dump_dir / f"{len(memory)}.dot"
        try:
            self.debug_dump(str(dot))
            text = dot.read_text(errors="replace")
        except Exception as error:  # noqa: BLE001 - a diagnostic: say why and go on
            memory[names[id(self)]] = {"error": f"{type(error).__name__}: {error}"}
            return
        blocks = [b for b in text.split("];") if re.search(r"MEM_?(ALLOC|FREE)", b, re.I)]
        memory[names[id(self)]] = {
            "nodes": text.count("];"),
            "allocs": [re.findall(r"0x[0-9a-f]+", b, re.I) for b in blocks if re.search(r"MEM_?ALLOC", b, re.I)],
            "frees": [re.findall(r"0x[0-9a-f]+", b, re.I) for b in blocks if re.search(r"MEM_?FREE", b, re.I)],
            "examples": [b.strip()[-400:] for b in blocks[:2]]}
        dot.unlink()
        owner = {addr: g for g, m in memory.items() for node in m.get("allocs", []) for addr in node}
        crossings = [{"graph": g, "frees": addr, "allocated_by": owner[addr]} for g, m in memory.items()
                     for node in m.get("frees", []) for addr in node if owner.get(addr, g) != g]
        (dump_dir / "graph_memory.json").write_text(json.dumps({"graphs": memory, "cross_graph_frees": crossings}, indent=1))
        print("dumped", names[id(self)], {k: len(v) for k, v in memory[names[id(self)]].items() if isinstance(v, list)},
              "cross-graph frees so far:", len(crossings), flush=True)

    def traced(self):
        name = names.get(id(self), "?")
        print("replay", name, "backward" if "backward" in stack() else "forward", flush=True)
        torch.cuda.synchronize()
        replay(self)
        try:
            torch.cuda.synchronize()
        except Exception as error:
            print("FAULT in replay of", name, error, flush=True)
            raise
    torch.cuda.CUDAGraph.capture_begin, torch.cuda.CUDAGraph.capture_end = named_begin, dumped_end
    torch.cuda.CUDAGraph.replay = traced


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--graded", choices=["student", "backbone", "both"], default="both")
    p.add_argument("--no-empty-cache", action="store_true")
    p.add_argument("--no-cudnn-benchmark", action="store_true")
    p.add_argument("--sdpa", choices=["default", "math"], default="default")
    p.add_argument("--first-use-eager", action="store_true")
    p.add_argument("--keep-grads", action="store_true")
    p.add_argument("--gc-off-capture", action="store_true")
    p.add_argument("--sync-replays", action="store_true")
    p.add_argument("--trace-replays", action="store_true", help="name every capture and replay (synchronised) on stdout")
    p.add_argument("--dump-graphs", default=None, metavar="DIR",
                   help="with the trace: each graph's memory nodes (CUDA's DOT dump, kept to its MEM_ALLOC/MEM_FREE "
                        "nodes) into DIR/graph_memory.json, with the frees of one graph's allocations in another")
    p.add_argument("perf_args", nargs=argparse.REMAINDER)
    args = p.parse_args()
    cuda_graphs.parameter_graphs_unsupported_reason = lambda: None
    original = cuda_graphs.GraphedCalls.__call__

    def call(self, *a, **k):
        if torch.is_grad_enabled() and args.graded != "both":
            student = self.parameters() is not None
            if student != (args.graded == "student"):
                return self.fn(*a, **k)
        return original(self, *a, **k)
    cuda_graphs.GraphedCalls.__call__ = call
    if args.no_empty_cache:
        cuda_graphs.torch.cuda.empty_cache = lambda: None
    if args.no_cudnn_benchmark:
        from comfy_rapm import training_unet
        training_unet.autotuned_convolutions = contextlib.nullcontext
    if args.sdpa == "math":
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.first_use_eager:  # the first call after a graded capture runs eagerly, as a busy graph's would
        capture_graded = cuda_graphs.GraphedCalls._capture_graded

        def deferred(self, *a, **k):
            replay, first = capture_graded(self, *a, **k), [True]

            def replay_from_second_use(call_args, call_kwargs):
                if first[0]:
                    first[0] = False
                    return cuda_graphs._BUSY
                return replay(call_args, call_kwargs)
            return replay_from_second_use
        cuda_graphs.GraphedCalls._capture_graded = deferred
    if args.keep_grads:
        from comfy_rapm import trainer
        student_backward = trainer.Trainer._student_backward

        def keep(self, *a, **k):
            for q in self.lora.parameters():
                if q.grad is None:
                    q.grad = torch.zeros_like(q)
            self.student_opt.zero_grad = lambda set_to_none=True: torch.optim.Optimizer.zero_grad(self.student_opt, False)
            return student_backward(self, *a, **k)
        trainer.Trainer._student_backward = keep
    if args.gc_off_capture:
        import gc
        capture = cuda_graphs.GraphedCalls._capture_graded

        def no_gc(self, *a, **k):
            gc.disable()
            try:
                return capture(self, *a, **k)
            finally:
                gc.enable()
        cuda_graphs.GraphedCalls._capture_graded = no_gc
    if args.sync_replays:
        replay = torch.cuda.CUDAGraph.replay

        def synced(self):
            torch.cuda.synchronize()
            replay(self)
            torch.cuda.synchronize()
        torch.cuda.CUDAGraph.replay = synced
    if args.trace_replays or args.dump_graphs:
        trace_graphs(Path(args.dump_graphs) if args.dump_graphs else None)
    print("async_bisect:", {k: v for k, v in vars(args).items() if k != "perf_args"}, flush=True)
    perf.main([a for a in args.perf_args if a != "--"])


if __name__ == "__main__":
    main()
