"""A smaller copy of a prepared emoji set, made where the data already is (the GPU machine carries only the 64-px one).

    python bench/quality/downsample_data.py --data /tmp/q/data --out /tmp/q/data32 --size 32

Images are averaged over factor×factor blocks (the factor must divide the size) and rounded to uint8; every other
tensor (token states, split, concepts, styles) and dataset.json are kept, with `size`, `image_processing` and the
safetensors checksum updated. Same rows, same split: a teacher trained on it is scored against the same prompts."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from comfy_rapm import storage  # noqa: E402


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, S, S) -> uint8 (N, C, size, size) by block means."""
    factor, rest = divmod(images.shape[-1], size)
    if rest or factor < 1:
        raise ValueError(f"{size} px does not divide the images' {images.shape[-1]} px")
    pooled = torch.nn.functional.avg_pool2d(images.float(), factor)
    return pooled.round().clamp(0, 255).to(torch.uint8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with dataset.safetensors and dataset.json")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, required=True)
    args = p.parse_args(argv)
    tensors = storage.read_safetensors(args.data / "dataset.safetensors")
    meta = json.loads((args.data / "dataset.json").read_text())
    source_size = int(tensors["images"].shape[-1])
    tensors["images"] = downsample(tensors["images"], args.size).contiguous()
    st = args.out / "dataset.safetensors"
    storage.write_safetensors(st, tensors)
    meta["size"] = args.size
    meta["image_processing"] = (f"{meta.get('image_processing', '')}; then {source_size // args.size}×"
                                f"{source_size // args.size} block means to {args.size} px (downsample_data.py)")
    meta["dataset_safetensors_sha256"] = storage.sha256_file(st)
    storage.write_json(args.out / "dataset.json", meta)
    print(f"wrote {st} ({tensors['images'].shape[0]} images at {args.size} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
