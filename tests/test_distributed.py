"""Teacher trajectories made by several processes (gloo on the CPU): the store's protocol with plain
torch processes, then the real runner under torchrun with the real host and a tiny checkpoint."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import dist_store_worker as worker  # noqa: E402
from comfy_rapm import journals, storage, trajectories  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(folder: Path) -> dict:
    """Every file of a set (journals and temporary files included) → its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_process_set(folder: Path) -> dict:
    store = trajectories.Store.open(folder, worker.spec())
    trajectories.generate(store, worker.run_batch)
    return _files(folder)


# ------------------------------------------------------------------------------------------------
# the store's protocol, plain torch processes

def _ranks(folder, scenario, world, timeout):
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE=str(world), RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "dist_store_worker.py"), str(folder), scenario,
                                       str(timeout)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _result(proc, timeout=60):
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, err[-3000:]
    result = json.loads(lines[-1])
    assert proc.returncode == (0 if result["ok"] else 1), err[-3000:]  # a clean exit (no abort at shutdown)
    return result


def test_three_ranks_make_the_one_process_set_a_mismatch_is_refused_and_a_failing_rank_reported(tmp_path):
    reference = _one_process_set(tmp_path / "reference")
    results = [_result(p) for p in _ranks(tmp_path / "three", "ok", 3, 60)]
    assert all(r["ok"] and r["complete"] for r in results), results
    assert sorted(i for r in results for i in r["share"]) == [0, 1, 2, 3]  # each shard computed once
    assert _files(tmp_path / "three") == reference  # shards and manifest byte for byte, no journal left

    # the same set asked for with other inputs: refused by every rank, as one process refuses it, and left alone
    results = [_result(p) for p in _ranks(tmp_path / "three", "other-cfg", 2, 60)]
    message = "ValueError: a trajectory set named 'three' already exists with different inputs (cfg: 2.0 → 2.5)"
    assert all(not r["ok"] and r["error"].startswith(message) for r in results), results
    assert _files(tmp_path / "three") == reference

    procs = _ranks(tmp_path / "failed", "fail", 2, 60)
    started = time.monotonic()
    rank0, rank1 = (_result(p) for p in procs)
    assert time.monotonic() - started < 50  # told at once, not after a timeout
    assert not rank1["ok"] and "boom on rank 1" in rank1["error"]
    assert not rank0["ok"] and "rank 1 (" in rank0["error"] and "ValueError: boom on rank 1" in rank0["error"]
    assert "rerun the same command to resume" in rank0["error"] and "2 of 7 trajectories are stored" in rank0["error"]
    manifest = json.loads((tmp_path / "failed" / "manifest.json").read_text())
    # rank 0 stopped after its first batch (its share was 0 and 2) and kept it
    assert not manifest["complete"] and [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors"]
    assert not (tmp_path / "failed" / "journals").exists()  # journals and stop marker gone into the manifest
    # one process resumes it (the UI's path) to the same bytes
    assert _one_process_set(tmp_path / "failed") == reference


def test_a_rank_that_does_not_come_is_named_and_its_journal_resumes(tmp_path):
    reference = _one_process_set(tmp_path / "reference")
    procs = _ranks(tmp_path / "slow", "slow", 2, 10)
    try:
        rank0 = _result(procs[0])
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert not rank0["ok"] and "rank 0 of 2" in rank0["error"] and "within 10 s" in rank0["error"]
    assert re.search(r"Ranks? 1 failed to pass monitoredBarrier", rank0["error"])  # names the one that did not come
    # rank 0 recorded what rank 1 had journaled before it stalled (its first shard, 1)
    manifest = json.loads((tmp_path / "slow" / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors", "shard-00001.safetensors",
                                                       "shard-00002.safetensors"]
    assert _one_process_set(tmp_path / "slow") == reference


def test_journals_are_trusted_only_where_the_file_has_the_recorded_checksum(tmp_path):
    reference_folder = tmp_path / "reference"
    reference = _one_process_set(reference_folder)
    folder = tmp_path / "left"
    trajectories.Store.open(folder, worker.spec())  # an empty set, as rank 0 opens it
    entries = json.loads((reference_folder / "manifest.json").read_text())["shards"]
    for entry in entries:
        (folder / entry["file"]).write_bytes((reference_folder / entry["file"]).read_bytes())
    (folder / "shard-00001.safetensors").write_bytes(b"changed" + (folder / "shard-00001.safetensors").read_bytes()[7:])
    journal_folder = folder / "journals"
    journal_folder.mkdir()
    digest = journals.inputs_digest(worker.spec())
    journal = {"format": journals.JOURNAL_FORMAT, "version": 1, "inputs": digest, "run": "x", "rank": 1,
               "world_size": 2, "shards": entries[:3] + [dict(entries[0], file="../escape.safetensors"),
                                                          dict(entries[3], start=0)]}
    storage.write_json(journal_folder / "x-rank00001.json", journal)
    storage.write_json(journal_folder / "y-rank00000.json", dict(journal, inputs="0" * 64, shards=entries))  # another spec
    (folder / ".shard-00003.safetensors.abc.tmp").write_bytes(b"partial")

    store = trajectories.Store.open(folder, worker.spec())
    # shard 0 and 2: journaled and intact; 1 changed since; 3 exists but no trustworthy record names it
    assert [s["file"] for s in store.manifest["shards"]] == ["shard-00000.safetensors", "shard-00002.safetensors"]
    assert [s.index for s in store.pending()] == [1, 3]
    assert not journal_folder.exists()  # folded into the manifest, then removed
    trajectories.generate(store, worker.run_batch)
    files = _files(folder)
    files.pop(".shard-00003.safetensors.abc.tmp")  # (only a multi-process open removes these)
    assert files == reference


# ------------------------------------------------------------------------------------------------
# the runner under torchrun, with the real host

TT_INPUTS = dict(prompts="a red apple\na blue car\na green frog", negative_prompt="blurry", width=64, height=64, count=6,
                 steps=2, fine_steps=3, cfg=3.0, seed=5, batch_size=1, name="shared")


def _workflow(ckpt):
    """A teacher, its trajectories and a node that is not their ancestor (only rank 0 runs it)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "RAPMTeacherTrajectory", "inputs": dict(TT_INPUTS, model=["1", 0], clip=["1", 1])},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "latents/after"}},
    }


@pytest.fixture(scope="module")
def runner(host, tmp_path_factory):
    """The tiny checkpoint, the workflow, and the set one process makes (in-process, through run.main)."""
    import folder_paths
    from headless import run, tiny_models
    base = tmp_path_factory.mktemp("dist")
    tiny_models.make_sd15_checkpoint(str(base / "models" / "checkpoints" / "dist_tiny.safetensors"), seed=0)
    workflow = base / "workflow.json"
    workflow.write_text(json.dumps(_workflow("dist_tiny.safetensors")))
    saved = folder_paths.get_output_directory()
    try:
        assert run.main([str(workflow), "--models", str(base / "models"), "--output-directory", str(base / "one"),
                         "--cpu", "--quiet"]) == 0
    finally:
        folder_paths.set_output_directory(saved)
    reference = _files(base / "one" / "rapm_trajectories" / "shared")
    assert len(reference) == 7
    return base, workflow, reference


def _torchrun(base, workflow, out, nproc, *extra, tag=None, popen=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", RAPM_TEST_TAG=tag or "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(REPO / "headless" / "run.py"), str(workflow), "--models", str(base / "models"),
           "--output-directory", str(out), "--cpu", "--dist-timeout", "120", *extra]
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=240)


def _rank_pid(tag: str, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
        except OSError:
            continue
        if env.get("RAPM_TEST_TAG") == tag and env.get("RANK") == str(rank) and "LOCAL_RANK" in env:
            return int(proc.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_killed_rank_keeps_its_shards_and_three_processes_resume_byte_for_byte(runner):
    """torchrun, 2 processes: kill rank 1 after its first shard; torchrun stops rank 0. Then 3 processes."""
    base, workflow, reference = runner
    out = base / "killed"
    folder = out / "rapm_trajectories" / "shared"
    tag = uuid.uuid4().hex
    proc = _torchrun(base, workflow, out, 2, tag=tag, popen=True)
    killed_journal, deadline = None, time.monotonic() + 180
    try:
        while killed_journal is None and time.monotonic() < deadline and proc.poll() is None:
            for journal in (folder / "journals").glob("*-rank00001.json") if (folder / "journals").is_dir() else []:
                if json.loads(journal.read_text())["shards"]:
                    pid = _rank_pid(tag, 1)
                    assert pid, "rank 1's process not found"
                    os.kill(pid, signal.SIGKILL)  # after its first shard
                    killed_journal = journal
            time.sleep(0.02)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_journal is not None, err[-3000:]
    assert proc.returncode != 0
    left = json.loads(killed_journal.read_text())["shards"]
    assert left and all((folder / e["file"]).is_file() for e in left)
    assert not json.loads((folder / "manifest.json").read_text())["complete"]
    kept = {e["file"]: (folder / e["file"]).stat().st_mtime_ns for e in left}
    latents = set((out / "latents").iterdir()) if (out / "latents").is_dir() else set()  # (may have run before the kill)

    done = _torchrun(base, workflow, out, 3)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {f: (folder / f).stat().st_mtime_ns for f in kept} == kept  # the dead rank's shards were not recomputed
    assert _files(folder) == reference  # shards, manifest; no journal or temporary file left
    assert len(set((out / "latents").iterdir()) - latents) == 1  # rank 0 alone ran the node the trajectories do not need
    assert done.stderr.count("rank 0 of 3 on") == 1 and "rank 1 of 3 on" not in done.stderr  # ranks > 0 quiet


def test_several_trajectory_nodes_are_refused_under_torchrun():
    from headless import ranks
    api = _workflow("x.safetensors")
    api["5"] = dict(api["2"])
    launch = ranks.Launch(rank=1, world=2, local_rank=1, device="cpu")
    with pytest.raises(ranks.LaunchError, match="one Teacher Trajectories node; this one has 2 \\(nodes 2, 5\\)"):
        ranks.outputs_for_rank(api, ["2", "4", "5"], launch)
    del api["5"]
    assert ranks.outputs_for_rank(api, ["2", "4"], launch) == ["2"]
    assert ranks.outputs_for_rank(api, ["2", "4"], ranks.Launch(0, 2, 0, "cpu")) == ["2", "4"]
    assert ranks.outputs_for_rank(api, ["2", "4"]) == ["2", "4"]  # one process: everything
