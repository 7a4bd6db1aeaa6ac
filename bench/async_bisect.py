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
    if args.trace_replays:
        import traceback
        names: dict = {}
        begin, replay_ = torch.cuda.CUDAGraph.capture_begin, torch.cuda.CUDAGraph.replay

        def where():
            stack = "".join(f.name + "," for f in traceback.extract_stack())
            side = "backbone" if "forward_to_features" in stack else "student/teacher"
            return side, ("backward" if "backward" in stack else "forward")

        def named_begin(self, *a, **k):
            names[id(self)] = f"graph{len(names)}({'/'.join(where())}{', graded' if torch.is_grad_enabled() else ''})"
            print("capture", names[id(self)], flush=True)
            return begin(self, *a, **k)

        def traced(self):
            name = names.get(id(self), "?")
            print("replay", name, "in", "/".join(where()), flush=True)
            torch.cuda.synchronize()
            replay_(self)
            try:
                torch.cuda.synchronize()
            except Exception as error:
                print("FAULT in replay of", name, error, flush=True)
                raise
        torch.cuda.CUDAGraph.capture_begin, torch.cuda.CUDAGraph.replay = named_begin, traced
    print("async_bisect:", {k: v for k, v in vars(args).items() if k != "perf_args"}, flush=True)
    perf.main([a for a in args.perf_args if a != "--"])


if __name__ == "__main__":
    main()
