"""The pack's own nodes, for the benchmark: what a user gets when they press Queue.

`node_defaults("RAPMTrain")` is THE one place the benchmark takes its training settings from: the defaults of
the node's `INPUT_TYPES()` (required and optional inputs), as ComfyUI's front end fills a fresh node (a combo
without a default gets its first option). No number is copied here, so the benchmark follows the shipped
defaults wherever they change.

`run_node("RAPMTrain", **inputs)` calls the node's FUNCTION under inference mode, as ComfyUI's executor does.
Inside a booted host (the tests) the host's loaded class is used; elsewhere (the GPU machine, where only
`comfy.*` is imported) the repository is imported as the package ComfyUI would load from custom_nodes/."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "comfy_rapm_pack"  # the name the repository is imported under when no host loaded it


def _mappings() -> dict:
    host_nodes = sys.modules.get("nodes")
    mappings = getattr(host_nodes, "NODE_CLASS_MAPPINGS", None) or {}
    if "RAPMTrain" in mappings:  # a booted ComfyUI with this pack loaded
        return mappings
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    pack = importlib.import_module(f"{PACKAGE}.nodes")
    return pack.NODE_CLASS_MAPPINGS


def node_class(name: str):
    mappings = _mappings()
    if name not in mappings:
        raise KeyError(f"no node {name!r} in the pack (has {sorted(mappings)})")
    return mappings[name]


def node_defaults(name: str) -> dict:
    """{input: default} of every input of node `name` that has one (or is a combo: its first option)."""
    types = node_class(name).INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for key, spec in types.get(section, {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if "default" in options:
                out[key] = options["default"]
            elif isinstance(kind, (list, tuple)) and kind:
                out[key] = kind[0]
    return out


def run_node(node: str, /, **inputs):
    """The node's FUNCTION with these inputs, under torch.inference_mode() like ComfyUI's executor."""
    cls = node_class(node)
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(**inputs)
