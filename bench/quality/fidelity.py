"""Prompt fidelity that can fail: a small classifier trained on REAL images, applied to generated ones.

Two linear softmax heads (multinomial logistic regression) on the EfficientNet-Lite0 features the FD uses
(bench/quality/eval.py, standardised with the training images' mean and std): the image's **style**
(twitter / google / fluent 3d, from the caption) and its emoji **category** (the group of `emoji.json`, e.g.
"Smileys & Emotion", "Flags": the sets' own metadata, kept in dataset.json's concept records).

- fitted on the TRAIN split's real images only; its L2 weight is picked from `PENALTIES` on a split of the
  training *concepts* (a fifth of them, by hash, held out), then refitted on all training images;
- a row's fidelity = the fraction of its samples whose predicted style (category) is the prompt's;
- beside it: the same classifier on the held-out real images (what a perfect generator would score) and
  `chance`, the score of always answering the training set's most frequent class.

    import fidelity as F
    probe = F.fit(train_feats, {"style": style[train], "category": category[train]})
    probe.accuracy(gen_feats, {"style": style[prompts], "category": category[prompts]})

Pure torch (float64, full-batch L-BFGS, on CUDA where available: 74 s for the full set on one busy CPU core;
deterministic on the CPU); no pickle, nothing downloaded."""
from __future__ import annotations

import hashlib

import numpy as np
import torch

PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1)  # L2 weight on the standardised features (mean loss + λ/2 |W|²)
VALIDATION_FRACTION = 0.2


def labels(data: dict, rows=None) -> dict[str, np.ndarray]:
    """{"style": int, "category": int} per dataset row (category index into `category_names(data)`)."""
    names = category_names(data)
    concepts = data["meta"]["concepts"]
    cat_of_concept = np.array([names.index(c["category"]) for c in concepts])
    concept = np.asarray(data["concept"].cpu().numpy())
    out = {"style": np.asarray(data["style"].cpu().numpy()), "category": cat_of_concept[concept]}
    if rows is not None:
        rows = np.asarray(rows)
        out = {k: v[rows] for k, v in out.items()}
    return out


def category_names(data: dict) -> list[str]:
    return sorted({c["category"] for c in data["meta"]["concepts"]})


def _fit_head(x: torch.Tensor, y: torch.Tensor, classes: int, penalty: float, iterations: int = 200) -> torch.Tensor:
    """(d+1, classes) weights (last row: bias) of an L2-penalised multinomial logistic regression."""
    w = torch.zeros(x.shape[1] + 1, classes, dtype=torch.float64, device=x.device, requires_grad=True)
    xb = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xb @ w, y) + 0.5 * penalty * (w[:-1] ** 2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


class Probe:
    def __init__(self, mean, std, heads: dict, classes: dict, penalties: dict, majority: dict, validation: dict):
        self.mean, self.std, self.heads, self.classes = mean, std, heads, classes
        self.penalties, self.majority, self.validation = penalties, majority, validation

    def _x(self, feats) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(feats, dtype=np.float64), device=self.mean.device)
        x = (x - self.mean) / self.std
        return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)

    def predict(self, feats) -> dict[str, np.ndarray]:
        x = self._x(feats)
        return {name: self.classes[name][(x @ w).argmax(1).cpu().numpy()] for name, w in self.heads.items()}

    def accuracy(self, feats, targets: dict[str, np.ndarray]) -> dict[str, float]:
        pred = self.predict(feats)
        return {name: float((pred[name] == np.asarray(targets[name])).mean()) for name in self.heads}

    def chance(self, targets: dict[str, np.ndarray]) -> dict[str, float]:
        """The accuracy of always answering the training set's most frequent class, on these targets."""
        return {name: float((np.asarray(targets[name]) == self.majority[name]).mean()) for name in self.heads}

    def describe(self) -> dict:
        return {"features": "EfficientNet-Lite0 pooled 1280-d, standardised", "model": "linear softmax per label",
                "penalties": self.penalties, "classes": {k: len(v) for k, v in self.classes.items()},
                "validation_accuracy": self.validation}


def _validation_mask(groups: np.ndarray) -> np.ndarray:
    """A fifth of the groups (concepts), by hash: True where a row is in the validation part."""
    ids = sorted(set(int(g) for g in groups))
    ranked = sorted(ids, key=lambda g: hashlib.sha256(f"probe:{g}".encode()).hexdigest())
    held = set(ranked[: max(1, int(round(VALIDATION_FRACTION * len(ids))))]) if len(ids) > 1 else set()
    return np.array([int(g) in held for g in groups])


def fit(feats, targets: dict[str, np.ndarray], groups=None, penalties=PENALTIES, device=None) -> Probe:
    """Fit one head per target on real training features. `groups` (the concept of each row): the penalty of
    each head is chosen on the groups' held-out fifth (the first penalty when there is nothing to validate on).
    On `device` (default: CUDA where available; float64 either way)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x = torch.as_tensor(np.asarray(feats, dtype=np.float64), device=device)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    val = _validation_mask(np.asarray(groups)) if groups is not None else np.zeros(len(x), bool)
    heads, classes, chosen, majority, validation = {}, {}, {}, {}, {}
    for name, y in targets.items():
        y = np.asarray(y)
        cls = np.unique(y)
        classes[name] = cls
        idx = torch.as_tensor(np.searchsorted(cls, y), device=device)
        counts = np.bincount(idx.cpu().numpy(), minlength=len(cls))
        majority[name] = cls[int(counts.argmax())]
        best = (penalties[0], None)
        tr, va = torch.as_tensor(~val, device=device), torch.as_tensor(val, device=device)
        if len(cls) > 1 and va.any() and tr.any():
            scores = []
            for lam in penalties:
                w = _fit_head(xs[tr], idx[tr], len(cls), lam)
                xv = torch.cat([xs[va], torch.ones(int(va.sum()), 1, dtype=xs.dtype, device=device)], 1)
                scores.append(float(((xv @ w).argmax(1) == idx[va]).double().mean()))
            best = (penalties[int(np.argmax(scores))], max(scores))
        chosen[name], validation[name] = best
        heads[name] = _fit_head(xs, idx, len(cls), best[0])
    return Probe(mean, std, heads, classes, chosen, majority, validation)
