"""Miniature of bench/quality/prepare_data.py (8 concepts, 3 styles): fetches the three npm
emoji packages, so it needs `npm` and registry access; select with `-m quality`."""
import hashlib
import importlib.util
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.quality

ROOT = Path(__file__).resolve().parent.parent
QDIR = ROOT / "bench" / "quality"
LIMIT = 8  # the quality_mini fixture (tests/conftest.py) is built with --limit 8


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def mini(quality_mini):
    out = quality_mini
    ds = _load("quality_dataset", QDIR / "dataset.py")
    data = ds.load_dataset(out)
    return {
        "out": out,
        "data": data,
        "meta": data["meta"],
        "split_doc": json.loads((out / "split.json").read_text()),
        "prep": _load("quality_prepare_data", QDIR / "prepare_data.py"),
    }


def test_files_and_sources(mini):
    out, meta = mini["out"], mini["meta"]
    for f in ("dataset.safetensors", "dataset.json", "split.json", "grid.png"):
        assert (out / f).is_file(), f
    assert meta["styles"] == ["twitter", "google", "fluent 3d"]
    lic = {s["style"]: s["image_license"] for s in meta["sources"]}
    assert lic == {"twitter": "CC-BY-4.0", "google": "Apache-2.0", "fluent 3d": "MIT"}
    assert [s["version"] for s in meta["sources"]] == ["16.0.0", "16.0.0", "1.1.0"]
    digest = hashlib.sha256((out / "dataset.safetensors").read_bytes()).hexdigest()
    assert meta["dataset_safetensors_sha256"] == digest


def test_shapes_and_ranges(mini):
    d, meta = mini["data"], mini["meta"]
    n = len(meta["captions"])
    assert len(meta["concepts"]) == LIMIT
    assert LIMIT <= n <= 3 * LIMIT
    assert n == sum(meta["counts"]["images_per_style"].values())
    S = meta["size"]
    assert S == 32
    assert d["images"].shape == (n, 3, S, S) and str(d["images"].dtype) == "torch.uint8"
    assert d["hidden"].shape == (n, 16, 384) and str(d["hidden"].dtype) == "torch.float16"
    assert d["attention_mask"].shape == (n, 16)
    assert d["sentence"].shape == (n, 384)
    assert d["null_hidden"].shape == (1, 16, 384) and d["null_sentence"].shape == (1, 384)
    for k in ("concept", "style", "split"):
        assert d[k].shape == (n,)
    assert int(d["concept"].min()) >= 0 and int(d["concept"].max()) < LIMIT
    assert set(d["style"].tolist()) <= {0, 1, 2}
    assert set(d["split"].tolist()) <= {0, 1, 2}

    imgs = d["images"].float()
    assert 100 < imgs.mean() < 250  # white background, but not blank
    assert imgs.std() > 30

    mask = d["attention_mask"]
    assert mask[:, 0].all()  # [CLS]
    assert bool((d["token_ids"][:, 0] == 101).all())
    lengths = mask.sum(1)
    assert int(lengths.min()) >= 5 and int(lengths.max()) <= 16
    assert bool((d["hidden"][~mask] == 0).all())  # padding zeroed
    assert bool(d["hidden"][mask].float().abs().sum(-1).gt(0).all())
    assert bool(d["hidden"].isfinite().all()) and bool(d["sentence"].isfinite().all())
    norms = d["sentence"].float().norm(dim=1)
    assert bool(((norms - 1).abs() < 1e-2).all())
    assert int(d["null_attention_mask"].sum()) == 2  # "" -> [CLS] [SEP]
    assert abs(float(d["null_sentence"].float().norm()) - 1) < 1e-2
    # sentence embedding == normalised mean of the token states (no caption here is trimmed)
    m = mask.float()[..., None]
    mean = (d["hidden"].float() * m).sum(1) / m.sum(1)
    cos = (mean * d["sentence"].float()).sum(1) / mean.norm(dim=1) / norms
    assert float(cos.min()) > 0.999
    # different captions give different states
    assert len({tuple(np.round(r.numpy(), 3)) for r in d["sentence"].float()}) == n


def test_white_background(mini):
    im = mini["data"]["images"]
    corners = np.stack([im[:, :, 0, 0], im[:, :, 0, -1], im[:, :, -1, 0], im[:, :, -1, -1]], 1)
    per_image = corners.min(axis=(1, 2))  # darkest corner channel per image
    assert np.median(per_image) >= 250
    assert (per_image >= 240).mean() >= 0.9


def test_captions(mini):
    d, meta = mini["data"], mini["meta"]
    styles, concepts = meta["styles"], meta["concepts"]
    pat = re.compile(r"^[^\n]+, (twitter|google|fluent 3d) style$")
    for i, cap in enumerate(meta["captions"]):
        assert pat.match(cap), cap
        c, s = int(d["concept"][i]), int(d["style"][i])
        assert cap == f"{concepts[c]['name']}, {styles[s]} style"
    pairs = list(zip(d["concept"].tolist(), d["style"].tolist()))
    assert len(set(pairs)) == len(pairs)
    assert concepts[0]["name"] == "grinning face" and concepts[0]["codepoints"] == "1F600"


def test_split_disjoint(mini):
    d, meta, doc = mini["data"], mini["meta"], mini["split_doc"]
    split, concept, style = d["split"].numpy(), d["concept"].numpy(), d["style"].numpy()
    held_c = set(concept[split == 1].tolist())
    train_c = set(concept[split == 0].tolist())
    assert held_c and not (held_c & train_c)
    assert not (held_c & set(concept[split == 2].tolist()))
    assert (split == 0).sum() > (split != 0).sum()
    train_pairs = set(zip(concept[split == 0].tolist(), style[split == 0].tolist()))
    held_pairs = set(zip(concept[split == 2].tolist(), style[split == 2].tolist()))
    assert held_pairs and not (held_pairs & train_pairs)
    for c, _ in held_pairs:  # a held-out pair's concept is seen in another style
        assert c in train_c
    # split.json agrees with the tensor
    cps = [c["codepoints"] for c in meta["concepts"]]
    assert {cps.index(h["codepoints"]) for h in doc["heldout_concepts"]} == held_c
    styles = meta["styles"]
    assert {(cps.index(h["codepoints"]), styles.index(h["style"])) for h in doc["heldout_pairs"]} \
        == held_pairs
    assert [meta["split"][i] for i in range(len(split))] == [meta["split_names"][k] for k in split]


def test_split_deterministic(mini):
    prep, meta, doc = mini["prep"], mini["meta"], mini["split_doc"]
    d = mini["data"]
    cps = [c["codepoints"] for c in meta["concepts"]]
    pairs = [(cps[c], meta["styles"][s]) for c, s in zip(d["concept"].tolist(), d["style"].tolist())]
    expect_c = sorted(h["codepoints"] for h in doc["heldout_concepts"])
    expect_p = sorted((h["codepoints"], h["style"]) for h in doc["heldout_pairs"])
    rng = random.Random(1)
    for _ in range(3):  # independent of input order
        rng.shuffle(cps)
        rng.shuffle(pairs)
        hc, hp = prep.compute_split(cps, pairs, seed=doc["seed"])
        assert hc == expect_c and [tuple(p) for p in hp] == expect_p
