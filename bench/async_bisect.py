"""bench/perf.py with only some of the passes with grad graphed, to find which graded graph crashes under
PyTorch's cudaMallocAsync allocator (run with PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync):

    python -X faulthandler bench/async_bisect.py --graded student -- --models sd15 --variants default ...

--graded student: only the student's passes (the LoRA on) are graphed with grad; backbone: only the
discriminator backbone's passes with grad to their input (the LoRA off); both: what the product does.
--no-empty-cache: skip the cache release GraphedCalls does after each capture. --no-cudnn-benchmark: cuDNN
without autotuning (RAPM Train turns it on). --sdpa math: attention by PyTorch's math kernels only (no flash or
memory-efficient kernels, whose backward allocates its own workspaces). cuBLAS workspaces: set
CUBLAS_WORKSPACE_CONFIG=:0:0 and CUBLASLT_WORKSPACE_SIZE=0 in the environment."""
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
    perf.main([a for a in args.perf_args if a != "--"])


if __name__ == "__main__":
    main()
