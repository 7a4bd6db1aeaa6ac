"""Does a CUDA graph capture that fails part-way leave the process alive? (issue #17; bench/NOTES.md)

    python bench/async_failed_capture.py --out $OUT/failed_capture.json

Each case runs in its own process under each allocator (PYTORCH_CUDA_ALLOC_CONF=backend:...), on a toy step that
allocates, then does what a capture refuses (a copy from unpinned host memory) only while capturing, so the eager
check before a capture (cuda_graphs.capture_blockers) cannot see it:
- `step_graphs`: the product's cuda_graphs.StepGraphs; it must fall back to the eager step, with the right values;
- `interrupt`: the same step raising the host's interrupt type inside the capture: it must reach the caller;
- `graphed_calls`: the product's no-grad cuda_graphs.GraphedCalls, failing the same way;
- `unjoined`: StepGraphs on a step that forks work to another stream during the capture and never joins it back: the
  call returns, and the capture fails at its end (cudaErrorStreamCaptureUnjoined) with the step's outputs alive;
- `plain`: torch.cuda.graph with the exception caught after the capture ends (what the product did before): under
  cudaMallocAsync this aborted in a tensor's destructor on an H200 (2026-12-03); it shows the mechanism.
A case passes when its process exits 0 and prints its check."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("step_graphs", "interrupt", "graphed_calls", "unjoined", "plain")


class Interrupt(Exception):
    pass


def _toy_step(tensors, handle):
    import torch
    x, = tensors
    y = (x @ x.T).relu() + handle
    kept = [y * 2, y.sum(dim=0)]  # alive in this frame when the capture fails
    if torch.cuda.is_current_stream_capturing():
        case = os.environ.get("RAPM_CASE")
        if case == "interrupt":
            raise Interrupt("cancelled during the capture")
        if case == "unjoined":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                kept.append(y * 3)  # forked into the capture, never joined: its end fails
        else:
            kept.append(torch.ones(3).to(x.device))  # refused during a capture: unpinned host memory
    return (kept[0].sum(), kept[1])


def run_case(case: str) -> None:
    import contextlib
    import torch
    sys.path.insert(0, ROOT)
    from comfy_rapm import cuda_graphs
    os.environ["RAPM_CASE"] = case
    x = torch.randn(64, 64, device="cuda")
    handle = torch.full((64,), 0.5, device="cuda")
    with torch.no_grad():
        eager = tuple(t.clone() for t in _toy_step((x,), handle))
        if case in ("step_graphs", "interrupt", "unjoined"):
            graphs = cuda_graphs.StepGraphs(lambda h: [h], contextlib.nullcontext, interrupts=(Interrupt,))
            try:
                out = graphs(_toy_step, (x,), handle)
            except Interrupt:
                assert case == "interrupt"
            else:
                why = "pinned" if case == "step_graphs" else "unjoined"
                assert case != "interrupt" and graphs.failed and why in graphs.error, graphs.error
                assert all(torch.equal(a, b) for a, b in zip(out, eager))
        elif case == "graphed_calls":
            calls = cuda_graphs.GraphedCalls(lambda t: _toy_step((t,), handle)[1])
            out = calls(x)
            assert calls.failed and torch.equal(out, eager[1]), calls.error
        else:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    _toy_step((x,), handle)
            except RuntimeError as error:
                print("plain capture failed:", error, flush=True)
    for _ in range(3):  # the process goes on using the device
        z = torch.randn(1024, 1024, device="cuda")
        (z @ z).sum().item()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    print(f"CASE {case} OK", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--allocators", default="native,cudaMallocAsync")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # the child process
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.case:
        run_case(args.case)
        return 0
    import torch
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    report = {"command": "python bench/async_failed_capture.py " + " ".join(argv or sys.argv[1:]),
              "card": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "cases": {}}
    for allocator in args.allocators.split(","):
        for case in args.cases.split(","):
            env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=f"backend:{allocator}")
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", case], env=env,
                                  capture_output=True, text=True, timeout=300)
            output = proc.stdout + proc.stderr
            report["cases"][f"{allocator}/{case}"] = {
                "returncode": proc.returncode, "passed": proc.returncode == 0 and f"CASE {case} OK" in output,
                "seconds": round(time.perf_counter() - started, 1), "output_tail": output[-1500:]}
            print(f"{allocator:16} {case:14} rc={proc.returncode} passed={report['cases'][f'{allocator}/{case}']['passed']}",
                  flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    product = [r["passed"] for k, r in report["cases"].items() if not k.endswith("/plain")]
    return 0 if all(product) else 1


if __name__ == "__main__":
    sys.exit(main())
