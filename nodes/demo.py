"""The built-in demo teacher."""
from __future__ import annotations

import os

from ..comfy_rapm import emoji
from .common import checked

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo")


class RAPMEmojiDemoLoader:
    """The built-in demo teacher: a small text-to-emoji model trained by this project's quality
    benchmark (32×32 RGB pixels, MiniLM text), with its text encoder and a pixel 'VAE'."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "training/RAPM"
    DESCRIPTION = ("An 11M-parameter emoji teacher (32×32 pixels, CFG 6). Prompts like 'grinning face, twitter style' "
                   "(styles: twitter, google, fluent 3d). Its latent is the image: use 256×256 in Empty Latent Image "
                   "(32×32 after the usual ÷8) or 32×32 in Teacher Trajectories.")

    def load(self):
        return checked("RAPMEmojiDemoLoader", "(built-in)", emoji.load_teacher, DEMO_DIR)
