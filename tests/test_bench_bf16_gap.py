"""bench/bf16_gap.py runs (one pseudo-Huber constant), so the evidence behind bench/NOTES.md's bf16 paragraph cannot rot."""
import json

from bench import bf16_gap


def test_bf16_gap_script_runs_and_bf16_is_looser_than_fp32(host, tmp_path):
    out = tmp_path / "gap.json"
    assert bf16_gap.main(["--c", "1.0", "--out", str(out)]) == 0
    rows = {r["precision"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["fp32"]["student_grad_rel_diff"] <= 2e-5
    assert 1e-4 < rows["bf16"]["student_grad_rel_diff"] < 5e-2  # bf16 really ran: its rounding shows
