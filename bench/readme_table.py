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
        native, default = perf["allocators"]["native"], perf["allocators"]["cudaMallocAsync"]
        intro = (f"`python bench/perf.py --allocators native,cudaMallocAsync` on full-size UNets with random weights (one "
                 f"call per model on **one {native['card']}**, torch {native['torch'].split('+')[0]}, bf16; "
                 "`bench/results/perf.json`). *s/iteration* is ComfyUI's default launch (cudaMallocAsync), *native* the "
                 "same with `--disable-cuda-malloc`; *GPU memory* is the peak PyTorch reserved under the native allocator.")
        header = ["model", "variant", "s/iteration", "native", "GPU memory GiB", "20K iterations"]
        rows = _rows(default["models"], native["models"])
    else:
        allocator = "PyTorch's native allocator" if perf.get("allocator", "native") == "native" else perf["allocator"]
        intro = (f"`python bench/perf.py` on full-size UNets with random weights (one call on **one {perf['card']}**, torch "
                 f"{perf['torch'].split('+')[0]}, bf16, {allocator}; `bench/results/perf.json`). *GPU memory* is the peak "
                 "PyTorch reserved.")
        header = ["model", "variant", "s/iteration", "GPU memory GiB", "20K iterations"]
        rows = _rows(perf["models"])
    lines = textwrap.wrap(intro, 118) + ["", _line(header), "|" + "---|" * len(header)] + [_line(r) for r in rows]
    return "\n".join(lines)


def _line(cells: list[str]) -> str:
    return ("| " + " | ".join(cells) + " |").replace("|  |", "| |")


def _rows(models: dict, native: dict | None = None):
    """The table's cells per shipped variant and model; with `native` (an --allocators report's native models), the
    native s/it as a column after `models`' and the memory from the native run."""
    for key, model in models.items():
        other_model = model if native is None else native.get(key, {})
        label = f"{NAMES.get(key, key)} {other_model.get('resolution', model.get('resolution'))} px"
        for variant, name in ROWS:
            row, other = model.get("training", {}).get(variant), other_model.get("training", {}).get(variant)
            if not all(isinstance(r, dict) and "seconds_per_iteration" in r for r in (row, other)):
                continue
            s = row["seconds_per_iteration"]
            native_s = [] if native is None else [f"{other['seconds_per_iteration']:#.3g}"]
            yield [label, name, f"{s:#.3g}", *native_s, f"{other['peak_reserved_gib']:.1f}", f"{s * 20000 / 3600:.1f} h"]
            label = ""
        traj, other = model.get("trajectories"), other_model.get("trajectories")
        if traj and other:
            native_m = [] if native is None else [_minutes(other["minutes_per_1000"])]
            yield [label, "trajectories, batch auto", f"1,000 in {_minutes(traj['minutes_per_1000'])}", *native_m,
                   f"{other['peak_reserved_gib']:.1f}", ""]


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
