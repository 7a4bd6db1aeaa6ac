"""RAPM core: plain torch, importable without ComfyUI."""
