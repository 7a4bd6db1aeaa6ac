"""One rank of a multi-process trajectory store, without ComfyUI (tests/test_distributed.py starts
several): a small spec whose shards come from seeded random tensors, so any process makes the same
bytes for the same shard.

    WORLD_SIZE=2 RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=P python tests/dist_store_worker.py FOLDER SCENARIO TIMEOUT

Scenarios: "ok"; "slow" (rank 1 stalls 60 s after its first shard); "fail" (rank 1 raises on its first
shard once rank 0 is inside its first batch, which ends when rank 1's stop marker is there); "other-cfg" (the same set asked for with another cfg). Prints one JSON line {"rank", "ok", "error"} and exits 0 when its own part succeeded."""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from comfy_rapm import shared_store, trajectories  # noqa: E402

COUNT, BATCH = 7, 2  # 4 shards, the last one short


def spec(cfg: float = 2.0) -> trajectories.Spec:
    return trajectories.Spec(prompts=["a", "b", "c"], negative_prompt="", width=16, height=16, count=COUNT, steps=2,
                             fine_steps=2, cfg=cfg, seed=10, batch_size=BATCH,
                             model={"family": "test", "latent_shape": [4, 2, 2], "num_timesteps": 1000})


def run_batch(prompts, seeds):
    g = torch.Generator().manual_seed(seeds[0])
    n = len(seeds)
    tensors = {"positions": torch.randn((n, 3, 4, 2, 2), generator=g), "positive": torch.randn((n, 3, 8), generator=g),
               "negative": torch.randn((n, 3, 8), generator=g)}
    return tensors, {"positive_extra": [{}] * n, "negative_extra": [{}] * n}


def _wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> int:
    folder, scenario, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    rank = dist.get_rank()
    calls = []

    def batch(prompts, seeds):
        calls.append(seeds)
        if rank == 1 and scenario == "slow" and len(calls) == 2:
            time.sleep(60)
        if scenario == "fail":  # rank 1 fails while rank 0 is inside its first batch, whatever the machine's load
            started = Path(folder + ".rank0-in-batch")
            if rank == 1:
                _wait_for(lambda: started.exists())
                raise ValueError("boom on rank 1")
            started.touch()
            _wait_for(lambda: any((Path(folder) / "journals").glob("*.stop")))  # rank 1's stop marker
        return run_batch(prompts, seeds)

    result = {"rank": rank, "ok": True, "error": ""}
    try:
        store = shared_store.open_store(folder, spec(cfg=2.5 if scenario == "other-cfg" else 2.0))
        result["share"] = [s.index for s in store.pending()]
        trajectories.generate(store, batch)
        result["complete"] = store.trajectory_set().manifest["complete"]
    except Exception as e:  # noqa: BLE001  (reported to the test)
        result.update(ok=False, error=f"{type(e).__name__}: {e}")
    print(json.dumps(result), flush=True)
    dist.destroy_process_group()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
