"""The README's speed table, rendered from the current run in bench/results/perf.json (issue #17, item 4).

    python bench/readme_table.py            # print the table
    python bench/readme_table.py --write    # put it into README.md between its markers
    python bench/readme_table.py --check    # exit 1 if README.md's table is not the rendered one (a test runs this)

Rows are the node's shipped variants: defaults (gradient checkpointing on), 1x1 discriminator heads, low_memory,
and Teacher Trajectories at its automatic batch. From a `perf.py --allocators native,cudaMallocAsync` report the
times are ComfyUI's default launch's (cudaMallocAsync) beside the native allocator's, and the memory is the native
allocator's reserved peak (under cudaMallocAsync PyTorch's count leaves out CUDA graphs' memory)."""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- speed table: python bench/readme_table.py --write -->"
END = "<!-- end of speed table -->"
ROWS = [("checkpointing", "defaults"), ("checkpointing+heads1x1", "`discriminator_heads` 1x1"),
        ("low_memory+checkpointing", "`low_memory`")]
NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}


def _minutes(m: float) -> str:
    return f"{m:.1f} min" if m < 20 else f"{m:.0f} min"


def render(perf: dict) -> str:
    if "allocators" in perf:
        return render_allocators(perf)
    allocator = "PyTorch's native allocator" if perf.get("allocator", "native") == "native" else perf["allocator"]
    intro = (f"`python bench/perf.py` on full-size UNets with random weights (one call on **one {perf['card']}**, torch "
             f"{perf['torch'].split('+')[0]}, bf16, {allocator}; `bench/results/perf.json`). *GPU memory* is the peak "
             "PyTorch reserved.")
    lines = textwrap.wrap(intro, 118) + ["",
             "| model | variant | s/iteration | GPU memory GiB | 20K iterations |", "|---|---|---|---|---|"]
    for key, model in perf["models"].items():
        label = f"{NAMES.get(key, key)} {model['resolution']} px"
        for variant, name in ROWS:
            row = model["training"].get(variant)
            if not isinstance(row, dict) or "seconds_per_iteration" not in row:
                continue
            s = row["seconds_per_iteration"]
            lines.append(f"| {label} | {name} | {s:#.3g} | {row['peak_reserved_gib']:.1f} | {s * 20000 / 3600:.1f} h |")
            label = ""
        traj = model.get("trajectories")
        if traj:
            lines.append(f"| {label} | trajectories, batch auto | 1,000 in {_minutes(traj['minutes_per_1000'])} | "
                         f"{traj['peak_reserved_gib']:.1f} | |")
    return "\n".join(line.replace("|  |", "| |") for line in lines)


def render_allocators(report: dict) -> str:
    native, default = report["allocators"]["native"], report["allocators"]["cudaMallocAsync"]
    intro = (f"`python bench/perf.py --allocators native,cudaMallocAsync` on full-size UNets with random weights (one "
             f"call per model on **one {native['card']}**, torch {native['torch'].split('+')[0]}, bf16; "
             "`bench/results/perf.json`). *s/iteration* is ComfyUI's default launch (cudaMallocAsync), *native* the "
             "same with `--disable-cuda-malloc`; *GPU memory* is the peak PyTorch reserved under the native allocator.")
    lines = textwrap.wrap(intro, 118) + ["",
             "| model | variant | s/iteration | native | GPU memory GiB | 20K iterations |", "|---|---|---|---|---|---|"]
    for key, model in default["models"].items():
        theirs = native["models"].get(key, {})
        label = f"{NAMES.get(key, key)} {theirs.get('resolution', model.get('resolution'))} px"
        for variant, name in ROWS:
            row, other = model.get("training", {}).get(variant), theirs.get("training", {}).get(variant)
            if not all(isinstance(r, dict) and "seconds_per_iteration" in r for r in (row, other)):
                continue
            s = row["seconds_per_iteration"]
            lines.append(f"| {label} | {name} | {s:#.3g} | {other['seconds_per_iteration']:#.3g} | "
                         f"{other['peak_reserved_gib']:.1f} | {s * 20000 / 3600:.1f} h |")
            label = ""
        traj, other = model.get("trajectories"), theirs.get("trajectories")
        if traj and other:
            lines.append(f"| {label} | trajectories, batch auto | 1,000 in {_minutes(traj['minutes_per_1000'])} | "
                         f"{_minutes(other['minutes_per_1000'])} | {other['peak_reserved_gib']:.1f} | |")
    return "\n".join(line.replace("|  |", "| |") for line in lines)


def readme_block(readme: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README.md lacks the markers {BEGIN!r} … {END!r}")
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--perf", default=str(ROOT / "bench/results/perf.json"))
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    table = render(json.loads(Path(args.perf).read_text()))
    readme_path = Path(args.readme)
    if args.check:
        current = readme_block(readme_path.read_text())
        if current != table:
            print(f"{readme_path}: the speed table differs from {args.perf}; run python bench/readme_table.py --write",
                  file=sys.stderr)
            return 1
        return 0
    if args.write:
        readme = readme_path.read_text()
        readme_block(readme)  # the markers are there
        head, rest = readme.split(BEGIN, 1)
        readme_path.write_text(head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1])
        return 0
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
