"""Which CUDA graph mechanism survives PyTorch's cudaMallocAsync allocator (ComfyUI's launcher default)?

Each case runs in its own process (a segmentation fault ends only that case; `-X faulthandler` prints
its Python stack), under PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync unless --allocator says
otherwise, and checks replayed results against eager ones on the same inputs:

    python bench/async_graphs_probe.py --out probe.json

Cases: `nograd` (torch.cuda.graph with a pool handle, as GraphedCalls' no-grad capture), `graded`
(torch.cuda.make_graphed_callables with parameters), `graded_two` (two graded callables chained, as
the student's pass feeding the discriminator backbone; `graded_two_interleaved`: the second one captured
after the first one's forward replay and before its backward, as in the trainer's first student step),
`product_nograd` / `product_graded` (comfy_rapm.cuda_graphs.GraphedCalls itself on a small conv net) and
`product_graded_two` (two GraphedCalls chained, the first owning parameters, the second not: the trainer's pair)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = ["nograd", "graded", "graded_two", "graded_two_interleaved", "product_nograd", "product_graded",
         "product_graded_two"]


def _net(torch, channels=64):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, channels, 3, padding=1), torch.nn.GroupNorm(8, channels), torch.nn.SiLU(),
        torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(channels, 4, 3, padding=1),
    ).cuda()


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_case(case: str) -> dict:
    import torch
    sys.path.insert(0, str(REPO))
    net = _net(torch)
    inputs = [torch.randn(2, 4, 32, 32, device="cuda") for _ in range(6)]
    worst = 0.0
    if case == "nograd":
        static = inputs[0].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                net(static)
        torch.cuda.current_stream().wait_stream(side)
        graph, pool = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()
        with torch.no_grad(), torch.cuda.graph(graph, pool=pool):
            out = net(static)
        for x in inputs * 3:
            static.copy_(x)
            graph.replay()
            got = out.clone()
            with torch.no_grad():
                worst = max(worst, _relative(got, net(x)))
        del out, graph
        torch.cuda.empty_cache()
    elif case == "graded_two_interleaved":
        second = _net(torch)
        g1 = torch.cuda.make_graphed_callables(net, (inputs[0].clone().requires_grad_(True),), num_warmup_iters=2)
        g2 = None
        for x in inputs * 3:
            for m in (net, second):
                m.zero_grad(set_to_none=True)
            y = g1(x.clone().requires_grad_(True))
            if g2 is None:  # captured while the first graph's forward awaits its backward
                g2 = torch.cuda.make_graphed_callables(second, (y.detach().clone().requires_grad_(True),), num_warmup_iters=2)
            g2(y).square().mean().backward()
            got = [p.grad.clone() for m in (net, second) for p in m.parameters()]
            for m in (net, second):
                m.zero_grad(set_to_none=True)
            second(net(x.clone().requires_grad_(True))).square().mean().backward()
            want = [p.grad for m in (net, second) for p in m.parameters()]
            worst = max(worst, max(_relative(g, w) for g, w in zip(got, want)))
    elif case in ("graded", "graded_two"):
        second = _net(torch) if case == "graded_two" else None
        sample = inputs[0].clone().requires_grad_(True)
        if second is None:
            graphed = torch.cuda.make_graphed_callables(net, (sample,), num_warmup_iters=2)
            chain = graphed
        else:
            middle = torch.randn(2, 4, 32, 32, device="cuda", requires_grad=True)
            g1 = torch.cuda.make_graphed_callables(net, (sample,), num_warmup_iters=2)
            g2 = torch.cuda.make_graphed_callables(second, (middle,), num_warmup_iters=2)
            chain = lambda x: g2(g1(x))  # noqa: E731
        modules = [net] + ([second] if second is not None else [])
        for x in inputs * 3:
            for m in modules:
                m.zero_grad(set_to_none=True)
            chain(x.clone().requires_grad_(True)).square().mean().backward()
            got = [p.grad.clone() for m in modules for p in m.parameters()]
            for m in modules:
                m.zero_grad(set_to_none=True)
            y = net(x.clone().requires_grad_(True))
            (second(y) if second is not None else y).square().mean().backward()
            want = [p.grad for m in modules for p in m.parameters()]
            worst = max(worst, max(_relative(g, w) for g, w in zip(got, want)))
    elif case in ("product_nograd", "product_graded"):
        from comfy_rapm.cuda_graphs import GraphedCalls
        graded = case == "product_graded"
        calls = GraphedCalls(lambda x: net(x), graded=graded, parameters=(lambda: net) if graded else (lambda: None))
        for x in inputs * 3:
            if graded:
                net.zero_grad(set_to_none=True)
                calls(x.clone().requires_grad_(True)).square().mean().backward()
                got = [p.grad.clone() for p in net.parameters()]
                net.zero_grad(set_to_none=True)
                net(x.clone().requires_grad_(True)).square().mean().backward()
                worst = max(worst, max(_relative(g, p.grad) for g, p in zip(got, net.parameters())))
            else:
                with torch.no_grad():
                    worst = max(worst, _relative(calls(x), net(x)))
        if calls.error or not calls.replays:
            raise RuntimeError(f"GraphedCalls did not replay: {calls.error}")
    elif case == "product_graded_two":
        from comfy_rapm.cuda_graphs import GraphedCalls
        second = _net(torch).requires_grad_(False)  # frozen, like the backbone: gradients to its input only
        mode = {"student": True}  # one wrapper for both, switched by state, as host.graphed_unet does
        calls = GraphedCalls(lambda x: net(x) if mode["student"] else second(x), state=lambda: mode["student"],
                             graded=True, parameters=lambda: net if mode["student"] else None)

        def chain(x):
            mode["student"] = True
            y = calls(x)
            mode["student"] = False
            return calls(y)
        for x in inputs * 3:
            net.zero_grad(set_to_none=True)
            chain(x).square().mean().backward()
            got = [p.grad.clone() for p in net.parameters()]
            net.zero_grad(set_to_none=True)
            second(net(x)).square().mean().backward()
            worst = max(worst, max(_relative(g, p.grad) for g, p in zip(got, net.parameters())))
        if calls.error or len(calls.graphs) != 2 or not calls.replays:
            raise RuntimeError(f"GraphedCalls did not replay both: {calls.error}")
    torch.cuda.synchronize()
    return {"max_relative_error": worst, "allocator": torch.cuda.memory.get_allocator_backend()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--allocator", default="cudaMallocAsync", help="PYTORCH_CUDA_ALLOC_CONF backend for the cases")
    p.add_argument("--out", type=Path)
    p.add_argument("--case", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    results = {}
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=f"backend:{args.allocator}")
    for case in args.cases.split(","):
        start = time.time()
        proc = subprocess.run([sys.executable, "-X", "faulthandler", __file__, "--case", case], env=env,
                              capture_output=True, text=True, timeout=300)
        last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
        result = {"exit": proc.returncode, "seconds": round(time.time() - start, 1)}
        if proc.returncode == 0 and last:
            result.update(json.loads(last[0]))
        else:
            result["stderr_tail"] = proc.stderr[-3000:]
        results[case] = result
        print(case, json.dumps({k: v for k, v in result.items() if k != "stderr_tail"}), flush=True)
        if "stderr_tail" in result:
            print(result["stderr_tail"], flush=True)
    if args.out:
        args.out.write_text(json.dumps({"allocator": args.allocator, "cases": results}, indent=1))


if __name__ == "__main__":
    main()
