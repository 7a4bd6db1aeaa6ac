"""Where the bf16 gap between the product's batched iteration and the slot-by-slot reference comes from:
the same comparison as tests/test_reference_equivalence.py (tiny SD1.5-shaped UNet, CPU), in fp32 and in bf16,
for several pseudo-Huber constants c. bench/NOTES.md reads the result.

    OMP_NUM_THREADS=1 python bench/bf16_gap.py --out bench/results/bf16_gap_cpu.json"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--c", default="0.001,0.01,0.1,1.0", help="pseudo-Huber constants")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from bench.perf import import_host
    import_host(None)
    import rapm_fixtures
    from comfy_rapm.reference import compare_with_product
    from comfy_rapm import session, settings
    from headless import tiny_models

    teacher = tiny_models.make_model_patcher("sd15", seed=6)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tset = rapm_fixtures.make_trajectory_set(Path(tmp) / "s", teacher, count=2, steps=4, fine_steps=2)
        for c in [float(v) for v in args.c.split(",")]:
            for precision in ("fp32", "bf16"):
                config = settings.Config(iterations=2, lora_rank=4, lora_alpha=4.0, delta=20, huber_c=c, precision=precision)
                sess = session.Session(teacher, tset, config)

                def check(tr):
                    with torch.no_grad():
                        for layer in tr.lora.layers:
                            layer.up.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
                    return [compare_with_product(tr, student_turn)["grad_rel_diff"] for student_turn in (True, False)]
                student, discriminator = sess.run(check)
                rows.append({"huber_c": c, "precision": precision, "student_grad_rel_diff": student,
                             "discriminator_grad_rel_diff": discriminator})
                print(f"c={c:<6} {precision}: student gradient {student:.2e}, discriminator gradient {discriminator:.2e}",
                      flush=True)
    if args.out:
        report = {"command": "python bench/bf16_gap.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "machine": "CPU (" + __import__("platform").platform() + ")", "torch": torch.__version__, "rows": rows}
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
