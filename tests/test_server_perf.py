"""bench/server_perf.py's CPU miniature (issue #17, item 2): the SD1.5 example workflow queued over HTTP on the real
server (main.py --base-directory … --cpu), its trajectory and training rates read off the websocket."""
import json
import math

import pytest

pytestmark = pytest.mark.server


def test_the_real_server_reports_trajectories_per_minute_and_seconds_per_iteration(tmp_path):
    from bench import server_perf
    out = tmp_path / "server_perf.json"
    # (4 iterations: ComfyUI's LossGraphNode divides by the range of the losses, which one student step does not have)
    assert server_perf.main(["--model", "tiny", "--cpu", "--count", "2", "--iterations", "4", "--skip-iterations", "1",
                             "--set", "2.batch_size=1", "--work", str(tmp_path / "base"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["server_args"][:2] == ["--base-directory", str((tmp_path / "base").resolve())]  # paths, --cpu, nothing else
    traj, train = report["nodes"]["RAPMTeacherTrajectory"], report["nodes"]["RAPMTrain"]
    # read from /ws: the nodes' progress messages and their binary progress_text lines
    assert traj["last_value"] == traj["max"] == 2 and train["last_value"] == train["max"] == 4
    assert traj["text_messages"] >= 2 and train["text_messages"] >= 2 and report["messages"]["progress_text"] >= 4
    assert train["last_text"].startswith("4/4 it") and train["shown_unit"] == "it" and traj["shown_unit"] == "traj"
    for value in report["user"].values():
        assert value is not None and math.isfinite(value) and value > 0
    assert "perf" not in report  # perf.py beside it runs on CUDA only (its tiny model is not this checkpoint's)
