"""The README's speed table is the one bench/readme_table.py renders from bench/results/perf.json (issue #17, item 4)."""
import json
import shutil
from pathlib import Path

from bench import readme_table

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_speed_table_is_rendered_from_the_committed_results():
    assert readme_table.main(["--check"]) == 0


def test_a_changed_result_fails_the_check_until_the_table_is_written(tmp_path):
    perf, readme = tmp_path / "perf.json", tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    report = json.loads((ROOT / "bench/results/perf.json").read_text())
    report["allocators"]["cudaMallocAsync"]["models"]["sd15"]["training"]["checkpointing"]["seconds_per_iteration"] = 0.1234
    native = report["allocators"]["native"]["models"]["sd15"]["training"]["checkpointing"]
    perf.write_text(json.dumps(report))
    args = ["--perf", str(perf), "--readme", str(readme)]
    assert readme_table.main(args + ["--check"]) == 1
    assert readme_table.main(args + ["--write"]) == 0
    assert readme_table.main(args + ["--check"]) == 0
    text = readme.read_text()
    rows = [line for line in readme_table.readme_block(text).splitlines() if line.startswith("| SD1.5 512 px |")]
    assert rows == [f"| SD1.5 512 px | defaults | 0.123 | {native['seconds_per_iteration']:#.3g} | "
                    f"{native['peak_reserved_gib']:.1f} | 0.7 h |"]
    assert text.split(readme_table.END, 1)[1] == (ROOT / "README.md").read_text().split(readme_table.END, 1)[1]


def test_an_allocators_report_gives_the_default_launchs_times_beside_the_native_ones():
    report = json.loads((ROOT / "bench/results/perf.json").read_text())["allocators"]
    native = {k: report["native"][k] for k in ("card", "torch")}
    native["models"] = {"sd15": json.loads(json.dumps(report["native"]["models"]["sd15"]))}
    default = json.loads(json.dumps(native))
    default["models"]["sd15"]["training"]["checkpointing"].update(seconds_per_iteration=0.2297, peak_reserved_gib=6.7)
    native["models"]["sd15"]["training"]["checkpointing"].update(seconds_per_iteration=0.2292, peak_reserved_gib=11.39)
    del default["models"]["sd15"]["training"]["low_memory+checkpointing"]  # a row needs both allocators' figures
    table = readme_table.render({"allocators": {"native": native, "cudaMallocAsync": default}})
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # after the header
    assert rows[0] == "| SD1.5 512 px | defaults | 0.230 | 0.229 | 11.4 | 1.3 h |"
    assert not any("`low_memory`" in row for row in rows)
    assert rows[-1].startswith("| | trajectories, batch auto | 1,000 in ")


def test_a_single_allocator_report_gives_one_time_column():
    native = json.loads((ROOT / "bench/results/perf.json").read_text())["allocators"]["native"]
    native["models"]["sd15"]["training"]["checkpointing"].update(seconds_per_iteration=0.2292, peak_reserved_gib=11.39)
    table = readme_table.render(native)
    assert "PyTorch's native allocator" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows[0] == "| SD1.5 512 px | defaults | 0.229 | 11.4 | 1.3 h |"
