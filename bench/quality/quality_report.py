"""The quality report from its scored rows: the table's rows (what each samples), what follows from them (equivalent
teacher steps, the curve fit, the goals) and quality.md. Pure: a quality.json in, the same with its derived fields and
the markdown out (`run_benchmark.py --rerender OUT/quality.json`)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

REFERENCE = "teacher_ddim_100"
ROWS = {  # key → how the row samples; table order
    "teacher_ddim_100": {"kind": "ddim", "steps": 100},
    "teacher_ddim_4": {"kind": "ddim", "steps": 4},
    "teacher_ddim_8": {"kind": "ddim", "steps": 8},
    "teacher_ddim_16": {"kind": "ddim", "steps": 16},
    "teacher_ddim_32": {"kind": "ddim", "steps": 32},
    "teacher_euler_4": {"kind": "ksampler", "sampler": "euler", "scheduler": "simple", "steps": 4},
    "teacher_dpmpp_2m_simple_4": {"kind": "ksampler", "sampler": "dpmpp_2m", "scheduler": "simple", "steps": 4},
    "teacher_dpmpp_2m_karras_4": {"kind": "ksampler", "sampler": "dpmpp_2m", "scheduler": "karras", "steps": 4},
    "teacher_uni_pc_4": {"kind": "ksampler", "sampler": "uni_pc", "scheduler": "simple", "steps": 4},
    "rapm_4": {"kind": "student", "steps": 4, "mode": "rapm"},
    "rapm_2": {"kind": "student", "steps": 2, "mode": "rapm"},
    "absolute_only_4": {"kind": "student", "steps": 4, "mode": "absolute_only"},
    "relative_only_4": {"kind": "student", "steps": 4, "mode": "relative_only"},
    "huber_only_4": {"kind": "student", "steps": 4, "mode": "huber_only"},
}
HEADROOM_ROWS = ("teacher_ddim_100", "teacher_ddim_4")
FREE_4 = ("teacher_ddim_4", "teacher_euler_4", "teacher_dpmpp_2m_simple_4", "teacher_dpmpp_2m_karras_4", "teacher_uni_pc_4")
STUDENTS = tuple(k for k, v in ROWS.items() if v["kind"] == "student")
ABLATIONS = ("absolute_only_4", "relative_only_4", "huber_only_4")
HEADROOM_GOAL = 1.5

DDIM_LADDER = tuple(k for k, v in ROWS.items() if v["kind"] == "ddim")  # the teacher's DDIM rows, any step order


def equivalent_ddim_steps(fd: float, ladder: dict[int, float]) -> float | None:
    """The teacher DDIM step count whose FD equals `fd`: linear in log(steps) between the two ladder rungs around it
    ({steps: FD}, FD falling with steps); None outside the ladder (better than its best or worse than its worst)."""
    rungs = sorted(ladder.items())
    for (s0, f0), (s1, f1) in zip(rungs, rungs[1:]):
        if f1 <= fd <= f0 and f0 > f1:
            return 2 ** (math.log2(s0) + (f0 - fd) / (f0 - f1) * (math.log2(s1) - math.log2(s0)))
    return None


def curve_fit(points: list[tuple[int, float]], at: int) -> dict | None:
    """Least squares FD = a + b / k over the curve's (iteration, FD) points: the asymptote a, the value at `at`
    iterations and the worst residual. An extrapolation to read beside the measured curve, not a measurement."""
    if len(points) < 3:
        return None
    k = np.array([p[0] for p in points], dtype=float)
    f = np.array([p[1] for p in points], dtype=float)
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(k), 1 / k], 1), f, rcond=None)
    return {"asymptote": float(a), "b": float(b), "at_iterations": at, "fd_at": float(a + b / at),
            "max_residual": float(np.abs(a + b / k - f).max())}


def goals(report: dict) -> dict:
    rows = report["rows"]
    fd = {k: r["fd_heldout"] for k, r in rows.items()}
    ci = {k: r["fd_heldout_ci"] for k, r in rows.items()}
    out = {}
    if REFERENCE in fd and "teacher_ddim_4" in fd:
        v = fd["teacher_ddim_4"] / fd[REFERENCE]
        out["teacher_headroom"] = {"value": v, "goal": f"DDIM-4 / DDIM-100 ≥ {HEADROOM_GOAL}", "met": v >= HEADROOM_GOAL}
    free = {k: fd[k] for k in FREE_4 if k in fd}
    best_free = min(free, key=free.get) if free else None
    if "rapm_4" in fd and REFERENCE in fd:
        v = fd["rapm_4"] / fd[REFERENCE]
        out["rapm_4_vs_teacher_100"] = {"value": v, "goal": "≤ 1.15", "met": v <= 1.15}
    if "rapm_4" in fd and best_free:
        v = fd["rapm_4"] / free[best_free]
        out["rapm_4_vs_best_free_4"] = {"value": v, "goal": f"≤ 0.75 ({best_free})", "met": v <= 0.75}
    if "rapm_2" in fd and best_free:
        v = fd["rapm_2"] / free[best_free]
        out["rapm_2_vs_best_free_4"] = {"value": v, "goal": f"≤ 1 ({best_free})", "met": v <= 1.0}
    matched = report.get("matched") or {}
    if matched:  # the ablations at the iterations every one of them and RAPM-4 reached
        ci = {k: r["fd_heldout_ci"] for k, r in matched["rows"].items()}
    at = f", each at {matched['iterations']} iterations" if matched else ", each at its last iteration"
    for ab in ABLATIONS:
        if "rapm_4" in ci and ab in ci:
            gap = ci[ab][0] - ci["rapm_4"][1]
            out[f"rapm_4_better_than_{ab}"] = {"value": gap, "met": gap > 0,
                                               "goal": f"> 0 (its interval's low end above RAPM-4's high end{at})"}
    curve = [p["fd_heldout"] for p in report.get("curve", [])]
    if len(curve) >= 3:
        swings = [abs(b - a) / a for a, b in zip(curve, curve[1:])]
        out["curve_max_relative_step"] = {"value": max(swings), "goal": "< 0.25 (no large swings)", "met": max(swings) < 0.25}
    return out


def markdown(report: dict) -> str:
    t = report["teacher"]
    room = t.get("headroom") or {}
    lines = ["# Quality: RAPM on a text-to-emoji teacher", "",
             f"Card: {report['card']}, torch {report['torch']}, {report['date']}. Features: {report['features']}.  ",
             f"Teacher: {t['parameters'] / 1e6:.2f}M parameters, {t['describe']}; trajectories' CFG {t['cfg']}; "
             f"sha256 `{t['checksum'][:16]}…`.  ",
             "Headroom (DDIM-4 / DDIM-100 FD, held-out): " + ", ".join(
                 f"cfg {e['cfg']:g}: {e['ratio_heldout']:.3f} (training prompts {e['ratio_train']:.3f})" for e in room.get("tried", []))
             + f" — goal ≥ {room.get('goal', HEADROOM_GOAL)}.", "",
             f"Held-out: {report['eval']['heldout_samples']} samples of {report['eval']['heldout_prompts']} prompts; "
             f"training prompts: {report['eval']['train_samples']}. FD interval: {report['eval']['ci']}, "
             f"{report['eval']['bootstrap']} replicates.", "",
             "| row | FD held-out [95% CI] | KID held-out | RMSE to teacher 100 | style / category (held-out) | FD train | iterations |",
             "|---|---|---|---|---|---|---|"]
    for key, r in report["rows"].items():
        fid = r.get("fidelity_heldout") or {}
        rmse = r.get("rmse_to_teacher_100")
        lines.append(f"| {key} | {r['fd_heldout']:.2f} [{r['fd_heldout_ci'][0]:.1f}, {r['fd_heldout_ci'][1]:.1f}] | "
                     f"{r['kid_heldout']:.4f} | {'' if rmse is None else f'{rmse:.4f}'} | "
                     f"{fid.get('style', float('nan')):.3f} / {fid.get('category', float('nan')):.3f} | {r['fd_train']:.2f} | "
                     f"{r.get('iterations', '')} |")
    ref = report["fidelity_reference"]
    lines += ["", "Classifier (style / category) on real held-out images: "
              f"{ref['real_heldout']['style']:.3f} / {ref['real_heldout']['category']:.3f}; on its own training images "
              f"{ref['real_train']['style']:.3f} / {ref['real_train']['category']:.3f}; always the most frequent class: "
              f"{ref['chance_heldout']['style']:.3f} / {ref['chance_heldout']['category']:.3f}. "
              f"Real held-out vs real training images: FD {ref['real_heldout_vs_real_train_fd']:.2f}."]
    s = report["students"]
    lines += ["", f"Students: RAPMTrain at {s['settings']} ({s['note']})."]
    steps = {k: r["equivalent_ddim_steps"] for k, r in report["rows"].items() if r.get("equivalent_ddim_steps")}
    if steps:
        lines += ["", "Student steps = teacher DDIM steps of the same held-out FD (log-steps between the DDIM rows): " + ", ".join(
            f"{k} ≈ DDIM-{v:.1f}" for k, v in steps.items())]
    if report["curve"]:
        lines += ["", "FD curve (rapm_4, held-out): " + ", ".join(f"{p['iteration']}: {p['fd_heldout']:.2f}" for p in report["curve"])]
    if report.get("curve_fit"):
        f = report["curve_fit"]
        lines += ["", f"Curve fit (least squares FD = a + b/k; an extrapolation): a = {f['asymptote']:.2f}, "
                  f"{f['fd_at']:.2f} at {f['at_iterations']} iterations, worst residual {f['max_residual']:.2f}"]
    if report.get("matched"):
        m = report["matched"]
        lines += ["", f"At equal iterations ({m['iterations']} each; the ablation goals use these): " + ", ".join(
            f"{k} {r['fd_heldout']:.2f} [{r['fd_heldout_ci'][0]:.1f}, {r['fd_heldout_ci'][1]:.1f}]" for k, r in m["rows"].items())]
    if report["search"]:
        lines += ["", "Settings search (rapm_4, training prompts only): " + ", ".join(
            f"{k} {v['fd_train']:.2f} @ {v['iterations']} it" for k, v in report["search"].items())
            + f"; best: {report['search_best_on_training_prompts']}"]
    lines += ["", "## Goals", ""]
    for k, v in report["goals"].items():
        lines.append(f"- {k}: {v['value']:.3f} (goal {v['goal']}): {'met' if v['met'] else 'NOT met'}")
    if report["missing"]:
        lines += ["", "Not scored yet: " + ", ".join(report["missing"])]
    lines += ["", "`quality_grid.png`: the real images, then one labelled line per row, same prompts and noise in every column."]
    return "\n".join(lines) + "\n"


def derive(report: dict) -> dict:
    """What follows from the scored rows alone: each student's equivalent DDIM steps, the curve fit, the goals."""
    ladder = {ROWS[k]["steps"]: report["rows"][k]["fd_heldout"] for k in DDIM_LADDER if k in report["rows"]}
    for key in STUDENTS:
        if key in report["rows"]:
            report["rows"][key]["equivalent_ddim_steps"] = equivalent_ddim_steps(report["rows"][key]["fd_heldout"], ladder)
    fit = curve_fit([(p["iteration"], p["fd_heldout"]) for p in report["curve"]],
                    int(report["students"]["node_defaults"]["iterations"]))
    if fit:
        report["curve_fit"] = fit
    report["goals"] = goals(report)
    return report


def write(report: dict, folder: Path) -> None:
    """FOLDER/quality.json (atomically) and quality.md."""
    tmp = folder / ".quality.json.tmp"  # not storage.write_json: it sorts keys, and the rows keep the table's order
    tmp.write_text(json.dumps(report, indent=1, default=float) + "\n")
    tmp.replace(folder / "quality.json")
    (folder / "quality.md").write_text(markdown(report))


def rerender(path: Path) -> int:
    """quality.json's derived fields and quality.md again from its rows (after this file's derivations change)."""
    write(derive(json.loads(path.read_text())), path.parent)
    return 0
