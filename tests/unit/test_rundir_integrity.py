"""Issue 19, parts 5–6: what a rerun resumes is intact, a stage redone invalidates what was
built on it, a run dir is never mixed with other weights, a failure leaves error.json and no
results.json, one writer per run directory, and W&B never holds a job up."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prunelab.errors import ConfigError
from prunelab.tracking.lock import RunDirLocked, RunLock
from prunelab.tracking.rundir import RunDir, safetensors_problem, write_json

GRAPH = {
    "depends": {"eval": ("prune",), "recover": ("prune",), "eval_recovered": ("recover",)},
    "outputs": {"prune": ("pruned", "masks.safetensors"), "recover": ("recovered/model",)},
    "work": {"recover": ("recovered",)},
}


def _finished_stages(root: Path) -> RunDir:
    """A run dir whose four stages finished, with real output files."""
    rd = RunDir(root, {"ratio": 0.2}, **GRAPH)
    (root / "pruned").mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(root / "pruned" / "model.safetensors"))
    (root / "pruned" / "config.json").write_text('{"hidden_size": 8}\n')
    save_file({"m": torch.ones(4, dtype=torch.uint8)}, str(root / "masks.safetensors"))
    rd.finish("prune", {"time_s": 1})
    rd.finish("eval", {"metrics": {"ppl": 3.0}})
    (root / "recovered" / "model").mkdir(parents=True)
    (root / "recovered" / "model" / "model.safetensors").write_bytes(
        (root / "masks.safetensors").read_bytes()
    )
    (root / "recovered" / "checkpoint-step4").mkdir()  # partial work a training resume reads
    rd.finish("recover", {"time_s": 2})
    rd.finish("eval_recovered", {"metrics": {"ppl": 2.0}})
    return rd


# ---------------------------------------------------------------- part 5: stage files
def test_stage_record_holds_the_sha256_and_size_of_every_output(tmp_path):
    _finished_stages(tmp_path)
    rec = json.loads((tmp_path / "stages" / "prune.json").read_text())
    weights = tmp_path / "pruned" / "model.safetensors"
    assert set(rec["files"]) == {"pruned/model.safetensors", "pruned/config.json", "masks.safetensors"}
    assert (
        rec["files"]["pruned/model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    )
    assert rec["files"]["pruned/model.safetensors"]["size"] == weights.stat().st_size
    assert rec["environment"]["torch"] == torch.__version__
    assert json.loads((tmp_path / "stages" / "eval.json").read_text())["files"] == {}  # metrics only


def test_truncated_output_redoes_the_stage_and_everything_built_on_it(tmp_path, caplog):
    _finished_stages(tmp_path)
    weights = tmp_path / "pruned" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 16)
    for verify in ("fast", "hash"):  # sizes are compared in both modes
        assert RunDir(tmp_path, {"ratio": 0.2}, verify=verify, **GRAPH)._problems(
            "prune", json.loads((tmp_path / "stages" / "prune.json").read_text())
        )
    rd = RunDir(tmp_path, {"ratio": 0.2}, **GRAPH)
    with caplog.at_level(logging.WARNING):
        assert rd.done("prune") is None
    assert "pruned/model.safetensors has" in caplog.text and "redoing it" in caplog.text
    # every stage downstream of prune lost its record; recovery's partial work (done on the old
    # pruned model) is gone too
    assert rd.finished_stages() == []
    assert not (tmp_path / "recovered").exists()


def test_same_size_corruption_is_found_by_the_hash_not_by_fast(tmp_path):
    _finished_stages(tmp_path)
    weights = tmp_path / "pruned" / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit pattern in the last float: same size, same header
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # even the mtime restored
    assert RunDir(tmp_path, {"ratio": 0.2}, verify="fast", **GRAPH).done("prune") is not None  # documented
    assert RunDir(tmp_path, {"ratio": 0.2}, verify="hash", **GRAPH).done("prune") is None
    # a damaged header at the same size and mtime: found in fast mode too
    _finished_stages(tmp_path / "again")
    weights = tmp_path / "again" / "pruned" / "model.safetensors"
    st = weights.stat()
    with open(weights, "r+b") as f:
        f.write((10**9).to_bytes(8, "little"))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert RunDir(tmp_path / "again", {"ratio": 0.2}, verify="fast", **GRAPH).done("prune") is None


def test_a_stage_that_wrote_an_incomplete_checkpoint_is_not_recorded(tmp_path):
    rd = RunDir(tmp_path, {"ratio": 0.2}, **GRAPH)
    (tmp_path / "pruned").mkdir()
    save_file({"w": torch.ones(32)}, str(tmp_path / "pruned" / "model.safetensors"))
    with open(tmp_path / "pruned" / "model.safetensors", "r+b") as f:  # a full disk, say
        f.truncate(100)
    with pytest.raises(RuntimeError, match=r"prune wrote an incomplete file pruned/model.safetensors"):
        rd.finish("prune", {"time_s": 1})
    assert rd.finished_stages() == []


def test_missing_output_file_and_damaged_record_redo_the_stage(tmp_path):
    rd = _finished_stages(tmp_path)
    (tmp_path / "recovered" / "model" / "model.safetensors").unlink()
    assert rd.done("recover") is None
    # recover's own partial work stays (a training resume continues from it); eval_recovered goes
    assert (tmp_path / "recovered" / "checkpoint-step4").exists()
    assert rd.finished_stages() == ["eval", "prune"]
    (tmp_path / "stages" / "eval.json").write_text('{"metrics": {"pp')  # torn
    assert rd.done("eval") is None and rd.done("prune") is not None


def test_files_added_after_the_record_and_model_cards_never_count_as_damage(tmp_path):
    """A model card (README.md) is written into pruned/ and recovered/model/ when the run ends,
    after the stages were recorded, and rewritten by every later run: never recorded, never
    checked. Any other file added later is ignored; a recorded one that changed is not."""
    root = tmp_path / "a"
    root.mkdir()
    (root / "pruned").mkdir()
    (root / "pruned" / "README.md").write_text("card of an earlier attempt\n")  # present at finish
    _finished_stages(root)
    assert not any(
        rel.endswith("README.md") for rel in json.loads((root / "stages" / "prune.json").read_text())["files"]
    )
    (root / "pruned" / "README.md").write_text("the card of this run, longer than before\n")
    (root / "recovered" / "model" / "README.md").write_text("card\n")
    (root / "pruned" / "notes.txt").write_text("added by hand\n")
    rd = RunDir(root, {"ratio": 0.2}, **GRAPH)
    assert [s for s in ("prune", "eval", "recover", "eval_recovered") if rd.done(s) is None] == []
    (root / "pruned" / "config.json").write_text('{"hidden_size": 9}\n')  # a recorded file
    assert rd.done("prune") is None


def test_deleted_upstream_record_invalidates_only_its_dependents(tmp_path):
    rd = _finished_stages(tmp_path)
    (tmp_path / "stages" / "recover.json").unlink()
    assert rd.done("prune") is not None and rd.done("eval") is not None  # not built on recover
    assert rd.done("recover") is None
    assert rd.finished_stages() == ["eval", "prune"]
    (tmp_path / "stages" / "prune.json").unlink()
    assert rd.done("prune") is None and rd.finished_stages() == []


def test_record_from_before_hashes_is_checked_then_hashed(tmp_path, caplog):
    _finished_stages(tmp_path)
    rec_path = tmp_path / "stages" / "prune.json"
    rec = json.loads(rec_path.read_text())
    for k in ("files", "environment"):
        rec.pop(k)
    rec_path.write_text(json.dumps(rec))
    with caplog.at_level(logging.WARNING):
        assert RunDir(tmp_path, {"ratio": 0.2}, **GRAPH).done("prune") is not None
    assert "without file hashes" in caplog.text
    assert "pruned/model.safetensors" in json.loads(rec_path.read_text())["files"]
    # an old record with a truncated safetensors file: the header gives it away
    rec_path.write_text(json.dumps(rec))
    weights = tmp_path / "pruned" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 4)
    assert "header describes" in safetensors_problem(weights)
    assert RunDir(tmp_path, {"ratio": 0.2}, **GRAPH).done("prune") is None


def test_other_library_versions_are_reported_not_refused(tmp_path, caplog):
    _finished_stages(tmp_path)
    rec_path = tmp_path / "stages" / "eval.json"
    rec = json.loads(rec_path.read_text())
    rec["environment"]["transformers"] = "4.0.0"
    rec_path.write_text(json.dumps(rec))
    rd = RunDir(tmp_path, {"ratio": 0.2}, **GRAPH)
    with caplog.at_level(logging.WARNING):
        assert rd.done("eval")["metrics"] == {"ppl": 3.0}
    import transformers

    assert rd.env_mismatch == {"eval": {"transformers": ["4.0.0", transformers.__version__]}}
    assert "transformers 4.0.0 →" in caplog.text


def test_other_weights_are_refused_unknown_hub_commit_warns(tmp_path, caplog):
    rd = RunDir(
        tmp_path, {"ratio": 0.2}, weights="abc", weights_files=[["model.safetensors", 10, 1]], **GRAPH
    )
    rd.finish("eval", {"metrics": {}})
    with pytest.raises(
        ConfigError, match=r"other weights.*abc then, def now.*changed files: model.safetensors"
    ):
        RunDir(tmp_path, {"ratio": 0.2}, weights="def", weights_files=[["model.safetensors", 11, 2]], **GRAPH)
    with caplog.at_level(logging.WARNING):  # a hub revision whose commit cannot be known offline
        RunDir(tmp_path, {"ratio": 0.2}, weights="org/m@None", weights_resolved=False, **GRAPH)
    assert "unpinned hub revision" in caplog.text


# ---------------------------------------------------------------- part 6: one writer
def test_second_writer_is_refused_naming_the_holder(tmp_path):
    outcome: list = []

    def second() -> None:  # in a thread: a lock that never gives up fails the test, not hangs it
        try:
            outcome.append(RunLock(tmp_path, wait_s=0.3).acquire())
        except RunDirLocked as e:
            outcome.append(e)

    with RunLock(tmp_path):
        t = threading.Thread(target=second, daemon=True)
        t.start()
        t.join(timeout=20)
        assert not t.is_alive(), "the second writer still waits after wait_s=0.3"
    assert len(outcome) == 1 and isinstance(outcome[0], RunDirLocked)
    assert re.search(rf"host {socket.gethostname()}, pid {os.getpid()}.*lock_wait_s", str(outcome[0]))
    with RunLock(tmp_path):  # released: free again
        pass
    assert not (tmp_path / ".lock").exists()


def test_a_waiting_writer_gets_the_lock_when_the_holder_ends(tmp_path):
    first = RunLock(tmp_path).acquire()
    threading.Timer(1.0, first.release).start()
    t = time.monotonic()
    with RunLock(tmp_path, wait_s=30):
        assert 0.9 < time.monotonic() - t < 20


def test_concurrent_writers_never_overlap(tmp_path):
    inside, overlaps, entered = [0], [], []

    def worker(i: int) -> None:
        for _ in range(5):
            with RunLock(tmp_path, wait_s=60):
                inside[0] += 1
                overlaps.append(inside[0])
                entered.append(i)
                time.sleep(0.01)
                inside[0] -= 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(entered) == 30 and max(overlaps) == 1


def test_stale_locks_are_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": 1, "token": "x"}))
    with RunLock(tmp_path):  # its process ended on this host
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    other = {"host": "elsewhere-" + socket.gethostname(), "pid": os.getpid(), "started": 1, "token": "y"}
    lock.write_text(json.dumps(other))
    with pytest.raises(RunDirLocked, match="elsewhere"):  # another host, heartbeat fresh
        RunLock(tmp_path, stale_s=900).acquire()
    old = time.time() - 1000
    os.utime(lock, (old, old))
    with RunLock(tmp_path, stale_s=900):  # another host, silent for longer than lock_stale_s
        assert json.loads(lock.read_text())["token"] != "y"


def test_json_writes_use_unique_temporary_names(tmp_path):
    target = tmp_path / "cache" / "dense.json"
    errors = []

    def writer(i: int) -> None:
        try:
            for j in range(50):
                write_json(target, {"writer": i, "j": j})
        except Exception as e:  # a shared ".tmp" name makes one writer's rename fail
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and json.loads(target.read_text())["j"] == 49
    assert [p.name for p in target.parent.iterdir()] == ["dense.json"]


def test_wandb_init_timeout_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    """The real wandb against a server that accepts connections and never answers."""
    pytest.importorskip("wandb")
    from omegaconf import OmegaConf

    from prunelab.tracking.wandb_logger import WandbTracker

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []

    def accept_and_never_answer() -> None:
        with contextlib.suppress(OSError):  # closed at the end of the test
            while True:
                held.append(server.accept())

    threading.Thread(target=accept_and_never_answer, daemon=True).start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = OmegaConf.create({"project": "p", "entity": None, "mode": "online", "init_timeout_s": 2})
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        tracker = WandbTracker(cfg, tmp_path, {"ratio": 0.2}, "r", None, [])
    tracker.log({"loss": 1.0}, step=0)
    tracker.finish()
    assert tracker.mode == "offline" and "logging offline instead" in caplog.text
    assert time.monotonic() - t0 < 60  # W&B's default would wait 90 s, then raise
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{tracker.run_id}"))
    server.close()


# ---------------------------------------------------------------- whole runs (embedded model)
FAST = ["debug=fast", "recovery=none", "logger=none", "device=cpu"]


def _run(out: Path, *extra: str, run_dir: Path | None = None) -> dict:
    from prunelab.api import compose
    from prunelab.runner import run

    cfg = compose([*FAST, f"output_root={out}", *extra])
    return run(cfg, run_dir or out / "run")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run of the embedded model (tiny budgets) with its dense cache: copied per test."""
    out = tmp_path_factory.mktemp("finished")
    _run(out)
    return out


def _copy(finished: Path, tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out, json.loads((out / "run" / "results.json").read_text())


def test_truncated_checkpoint_in_a_finished_run_is_redone(finished, tmp_path, caplog):
    out, before = _copy(finished, tmp_path)
    weights = out / "run" / "pruned" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with caplog.at_level(logging.WARNING):
        r = _run(out)
    assert "stage prune finished earlier but its files are damaged" in caplog.text
    assert r["resumed_stages"] == ["dense_eval"]  # prune and the evaluation built on it: redone
    assert r["pruned"]["perplexity"] == before["pruned"]["perplexity"]  # deterministic on CPU
    assert safetensors_problem(weights) is None
    assert (
        load_file(str(weights)).keys()
        == load_file(str(finished / "run" / "pruned" / "model.safetensors")).keys()
    )


def test_deleted_upstream_stage_redoes_downstream_stages(finished, tmp_path):
    out, _ = _copy(finished, tmp_path)
    (out / "run" / "stages" / "prune.json").unlink()
    assert _run(out)["resumed_stages"] == ["dense_eval"]  # eval.json existed: redone anyway
    (out / "run" / "stages" / "eval.json").unlink()  # a downstream stage: upstream stays
    assert _run(out)["resumed_stages"] == ["dense_eval", "prune"]


def test_changed_model_folder_is_refused(tmp_path):
    from prunelab.models.embedded import asset_dir

    model = tmp_path / "model"
    shutil.copytree(asset_dir("tiny_llama"), model)
    out = tmp_path / "out"
    _run(out, f"model.path={model}")
    weights = load_file(str(model / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] * 1.01  # retrained weights, same file names and size
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"(?s)other weights.*changed files: model.safetensors"):
        _run(out, f"model.path={model}")
    # the finished run's results stay; the refusal is not recorded as this run dir's failure
    assert (out / "run" / "results.json").exists() and not (out / "run" / "error.json").exists()
    assert not (out / "run" / ".lock").exists()


def test_failure_leaves_error_json_and_no_results_json(finished, tmp_path, monkeypatch):
    from prunelab.evaluation import suite

    out, _ = _copy(finished, tmp_path)
    run_dir = out / "run"
    (run_dir / "stages" / "eval.json").unlink()

    def broken(*args, **kwargs):
        raise RuntimeError("the evaluation broke")

    monkeypatch.setattr(suite, "evaluate", broken)  # prunelab's own function, not a library
    with pytest.raises(RuntimeError, match="evaluation broke"):
        _run(out)
    assert not (run_dir / "results.json").exists()  # the earlier success is not this run's outcome
    err = json.loads((run_dir / "error.json").read_text())
    assert err["stage"] == "evaluate_pruned" and err["type"] == "RuntimeError"
    assert err["message"] == "the evaluation broke" and "broken" in err["traceback"] and err["time"]
    assert not (run_dir / ".lock").exists()  # released on failure
    monkeypatch.undo()
    r = _run(out)
    assert (run_dir / "results.json").exists() and not (run_dir / "error.json").exists()
    assert r["resumed_stages"] == ["dense_eval", "prune"]


@pytest.mark.slow
def test_a_second_prunelab_on_the_same_run_dir_refuses_then_waits(finished, tmp_path):
    """Real processes: the CLI refuses while another writer holds the run directory, and with
    rundir.lock_wait_s waits for it, then resumes."""
    from prunelab.api import _overrides_dirname
    from prunelab.cli import _run_dir_name

    out, _ = _copy(finished, tmp_path)
    overrides = [*FAST, f"output_root={out}"]
    run_dir = out / "runs" / _run_dir_name(_overrides_dirname(overrides))
    shutil.move(out / "run", run_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "prunelab.cli", *overrides]
    holder = RunLock(run_dir).acquire()
    try:
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2, (p.stdout + p.stderr)[-2000:]
        assert (
            f"being written by another prunelab process (host {socket.gethostname()}, pid {os.getpid()}"
            in p.stdout + p.stderr
        )
        assert "Traceback" not in p.stdout + p.stderr and not (run_dir / "error.json").exists()
        waiting = subprocess.Popen(
            [*cmd, "rundir.lock_wait_s=240"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines = []
        for line in waiting.stdout:  # release only once it says it waits
            lines.append(line)
            if "waiting (at most" in line:
                break
    finally:
        holder.release()
    rest, _ = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, "".join(lines) + rest
    r = json.loads((run_dir / "results.json").read_text())
    assert r["resumed_stages"] == ["dense_eval", "prune", "eval"]
