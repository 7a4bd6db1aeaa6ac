"""ComfyUI's CONDITIONING as plain data: [[cross-attention tensor (B, tokens, dim), {extra}], ...]. Plain torch."""
from __future__ import annotations

import math

import torch

Conditioning = list


def single_entry(conditioning: Conditioning, what: str) -> tuple[torch.Tensor, dict]:
    if not isinstance(conditioning, list) or len(conditioning) != 1 or len(conditioning[0]) != 2:
        raise ValueError(f"{what}: expected the output of one text encode (one conditioning entry), "
                         f"got {len(conditioning) if isinstance(conditioning, list) else type(conditioning).__name__} "
                         "entries; RAPM does not support combined, area or masked conditioning")
    return conditioning[0][0], conditioning[0][1]


def stack(conditionings: list[Conditioning], what: str = "conditioning") -> Conditioning:
    """Batch one-prompt conditionings into one CONDITIONING whose row i belongs to latent i.
    Token lengths are padded by repetition to their least common multiple, as ComfyUI does."""
    entries = [single_entry(c, what) for c in conditionings]
    length = 1
    for tensor, _ in entries:
        length = math.lcm(length, tensor.shape[1])
    tensors = [t.repeat(1, length // t.shape[1], 1) if t.shape[1] < length else t for t, _ in entries]
    extra = {}
    for key, value in entries[0][1].items():
        values = [e[1].get(key) for e in entries]
        if isinstance(value, torch.Tensor):
            extra[key] = torch.cat(values)
        elif all(v == value for v in values):
            extra[key] = value
        else:
            raise ValueError(f"{what}: prompts in one batch differ in '{key}' ({values[:3]}…)")
    return [[torch.cat(tensors), extra]]
