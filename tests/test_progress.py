"""The one progress formatter: rate, ETA and how often a node's text line is resent."""
import time

from comfy_rapm import progress


def test_rate_and_eta_count_only_work_done_since_the_clock_started():
    clock = progress.Clock(total=100, done=40, unit="it")
    assert clock.text(40) == "40/100 it"  # resumed work is no evidence of speed
    clock.start -= 10.0  # 10 s later, 10 more done: 1 s/it
    assert clock.text(50, "loss 0.5") == "50/100 it · 1.00 s/it · ETA 50s · loss 0.5"
    assert progress.format_rate(0.25, "it") == "4.0 it/s" and progress.format_rate(2.5, "traj") == "2.50 s/traj"
    assert [progress.format_duration(s) for s in (59.4, 61, 3725)] == ["59s", "1m01s", "1h02m"]


def test_the_rate_leaves_out_the_first_units_one_time_costs_once_later_work_is_done():
    t = [0.0]
    clock = progress.Clock(total=1000, done=0, unit="it", settle=2, now=lambda: t[0])
    t[0] = 30.0  # the first two iterations: 30 s of captures
    assert clock.text(2) == "2/1000 it · 15.00 s/it · ETA 4h09m"  # nothing after them yet: the mean since the start
    t[0] = 40.0
    assert clock.text(42) == "42/1000 it · 4.0 it/s · ETA 4m00s"  # 40 it in the 10 s after them
    assert clock.elapsed() == 40.0
    plain = progress.Clock(total=10, done=0, settle=0, now=lambda: t[0])
    t[0] = 50.0
    assert plain.seconds_per_unit(5) == 2.0


def test_throttle_is_due_first_then_after_its_interval():
    throttle = progress.Throttle(0.2)
    assert throttle.due() and not throttle.due()
    time.sleep(0.25)
    assert throttle.due() and not throttle.due()


def test_a_training_line_refreshes_by_time_and_says_where_cancel_left_the_run():
    shown = []
    line = progress.TrainingLine(total=10, show=shown.append, seconds=60.0, note="graphs off: why")
    line.loading(4)
    line.started(4)
    line.iteration(5, {"loss": 0.5})   # the first refresh is due at once
    line.iteration(6, {"loss": 0.25})  # not yet due: nothing shown
    line.iteration(10, {"loss": 0.125})  # the last iteration always is
    line.cancelled(6, "/out/rapm_runs/x", "x")
    assert shown[0] == "4/10 it · loading the model and trajectories" and shown[1] == "4/10 it · resumed"
    assert len(shown) == 5 and shown[2].startswith("5/10 it · ") and shown[2].endswith("loss 0.5\ngraphs off: why")
    assert shown[3].startswith("10/10 it · ") and "loss 0.125" in shown[3]
    assert shown[4] == ("Cancelled at 6/10 it: checkpoint saved in /out/rapm_runs/x. Queue again with the same name (x) "
                        "and settings to resume.")
