"""Would torch.compile pay for the UNet passes of training? (issue #17, item 3's "torch.compile of the UNet blocks")

    python bench/compile_probe.py --model sd15 --out $OUT/compile_probe.json      # GPU: the full-size SD1.5 UNet

The UNet as a training session holds it (weights as frozen tensors in the training dtype, the student's LoRA hooks
on, rank 64), compiled whole with torch.compile. Reports:
- dynamo's view (`torch._dynamo.explain`, no grad, batch 1): graphs, breaks and where the first breaks come from;
- the compile time of the first call;
- ms per pass, each through the product's CUDA graphs (cuda_graphs.GraphedCalls, as training replays them), eager
  module against compiled, at batch 1 (the student's chain) and at batch 2N (the teacher's CFG step), no grad;
- the largest difference between the two outputs.
On the CPU (the miniature: `--model tiny`) there are no CUDA graphs and the times say nothing; it checks the plumbing."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@contextlib.contextmanager
def _uncached_factors(layer_class):
    """The LoRA's factors cast in every pass, as with grad: no Python state (the cache) for dynamo to break on."""
    cached = layer_class._factors
    layer_class._factors = lambda self, dtype: (self.down.to(dtype), self.up.to(dtype) * (self.alpha / self.rank))
    try:
        yield
    finally:
        layer_class._factors = cached


def probe(model: str, backend: str, repeats: int, rank: int, cached_lora: bool = True) -> dict:
    from statistics import median
    from bench import perf
    perf.import_host(None)
    from comfy_rapm import cuda_graphs, host, lora as lora_mod, training_unet
    if model == "tiny":
        from headless import tiny_models
        patcher = tiny_models.make_model_patcher("sd15", seed=0)
        device, dtype, latent = torch.device("cpu"), torch.float32, 8
    else:
        patcher, _, _ = perf.build_model(model)
        device, dtype, latent = torch.device("cuda"), torch.bfloat16, perf.RESOLUTION[model] // 8
    unet, root = host.unet(patcher), host.module_root(patcher)
    unet.to(device)
    lora = lora_mod.LoRA(host.weight_modules(patcher), rank, float(rank)).to(device)
    with torch.no_grad():
        for layer in lora.layers:
            layer.up.normal_(std=1e-3)
    context_dim = 768 if model == "tiny" else perf.UNET[model]["context_dim"]
    # ComfyUI's transformer_options['block'] differs per block: each is a recompile, and past dynamo's default limit (8)
    # the rest run eagerly (the 2026-12-04 H200 run)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    report: dict = {"model": model, "backend": backend, "rank": rank, "dtype": str(dtype), "cached_lora": cached_lora,
                    "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__}

    def inputs(batch):
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)
        t = torch.full((batch,), 500.0, device=device)
        ctx = torch.randn(batch, 77, context_dim, generator=g).to(device, dtype)
        kwargs = {"timesteps": t, "context": ctx}
        if model == "sdxl":
            kwargs["y"] = torch.randn(batch, unet.label_emb[0][0].in_features, generator=g).to(device, dtype)
        return x, kwargs

    with torch.inference_mode(False), training_unet.training_weights(unet, dtype), \
            training_unet.lora_attached(root, lora), torch.no_grad(), \
            (contextlib.nullcontext() if cached_lora else _uncached_factors(lora_mod.LoRALayer)):
        x1, kw1 = inputs(1)
        explained = torch._dynamo.explain(unet)(x1, **kw1)
        reasons = []
        for b in explained.break_reasons:
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(b.user_stack[-4:]))
            if where not in reasons:
                reasons.append(where)
        report["dynamo"] = {"graphs": explained.graph_count, "breaks": explained.graph_break_count,
                            "break_sites": reasons[:8]}
        torch._dynamo.reset()
        compiled = torch.compile(unet, backend=backend)
        t0 = time.perf_counter()
        out_compiled = compiled(x1, **kw1)
        report["compile_seconds_batch_1"] = time.perf_counter() - t0
        out_eager = unet(x1, **kw1)
        report["max_abs_diff"] = float((out_compiled.float() - out_eager.float()).abs().max())
        report["eager_abs_max"] = float(out_eager.float().abs().max())
        report["ms_per_pass"] = {}
        for batch in (1, 8):
            x, kw = inputs(batch)
            for name, fn in (("eager", unet), ("compiled", compiled)):
                graphed = cuda_graphs.GraphedCalls(lambda xx, _fn=fn, _kw=kw: _fn(xx, **_kw))
                t0 = time.perf_counter()
                graphed(x)  # capture (and, compiled, a compile for this batch)
                first = time.perf_counter() - t0
                passes = [perf.timed_ms(lambda: graphed(x)) for _ in range(repeats)]
                report["ms_per_pass"][f"{name}_batch_{batch}"] = median(passes)
                report["ms_per_pass"][f"{name}_batch_{batch}_first_call_s"] = first
                report["ms_per_pass"][f"{name}_batch_{batch}_replays"] = graphed.replays
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15", choices=["sd15", "sdxl", "tiny"])
    p.add_argument("--backend", default="inductor", help="torch.compile's backend (aot_eager: the CPU test's)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--uncached-lora", action="store_true",
                   help="the LoRA's factors cast in every pass (no cache: its Python state breaks dynamo's graph)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report = probe(args.model, args.backend, args.repeats, args.rank, cached_lora=not args.uncached_lora)
    report["command"] = "python bench/compile_probe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
