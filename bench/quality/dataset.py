"""Load the emoji set written by bench/quality/prepare_data.py (torch + safetensors only,
so it works on the GPU machine without the text encoder).

    from dataset import load_dataset          # with bench/quality on sys.path
    d = load_dataset(".data/quality")         # dict of tensors + d["meta"] (dataset.json)
    d["images"]          uint8   (N, 3, S, S), white background
    d["hidden"]          float16 (N, 16, 384) MiniLM last hidden states, zeros at padding
    d["attention_mask"]  bool    (N, 16)
    d["sentence"]        float16 (N, 384) normalised sentence embedding
    d["null_hidden"], d["null_attention_mask"], d["null_sentence"]: the empty caption, batch 1
    d["concept"], d["style"] int64 (N,);  d["split"] uint8 (N,): 0 train, 1 held-out concept,
                                              2 held-out concept x style pair
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

SPLIT_TRAIN, SPLIT_HELDOUT_CONCEPT, SPLIT_HELDOUT_PAIR = 0, 1, 2


def unpack_hidden(packed: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """(T, D) states of the valid tokens -> dense (N, L, D), zeros at padding."""
    x = packed.float()
    if scale is not None:
        x = x * scale.float()
    out = torch.zeros(*mask.shape, packed.shape[-1], dtype=dtype, device=packed.device)
    out[mask.bool()] = x.to(dtype)
    return out


def load_dataset(path: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float16) -> dict:
    path = Path(path)
    st = path / "dataset.safetensors" if path.is_dir() else path
    t = load_file(str(st), device=str(device))
    mask = t["attention_mask"].bool()
    d = {
        "images": t["images"],
        "hidden": unpack_hidden(t["hidden_packed"], mask, t.get("hidden_scale"), dtype),
        "attention_mask": mask,
        "null_hidden": t["null_hidden"].to(dtype),
        "null_attention_mask": t["null_attention_mask"].bool(),
        "concept": t["concept"].long(),
        "style": t["style"].long(),
        "split": t["split"],
    }
    for key, convert in (("token_ids", lambda v: v.long()), ("sentence", lambda v: v.to(dtype)),
                         ("null_sentence", lambda v: v.to(dtype))):
        if key in t:
            d[key] = convert(t[key])
    meta_path = st.with_name("dataset.json")
    d["meta"] = json.loads(meta_path.read_text()) if meta_path.exists() else None
    return d
