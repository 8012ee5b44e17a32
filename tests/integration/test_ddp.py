"""Data-parallel LoRA recovery: two processes under ``accelerate launch`` (CPU, gloo) train
what one process trains with the same global batch (docs/performance.md, "Several processes").

pytest -q tests/integration/test_ddp.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")
# Measured: adapters within 6e-6 (Adam turns the gradients' float32 summation order into
# that), validation losses within 2e-7.
WEIGHT_ATOL, LOSS_ATOL = 3e-5, 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    path = [str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")]
    # CPU processes even where GPUs exist: the gloo backend, as CI has it
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(p for p in path if p))
    return env


def _launch(n: int, out: Path, settings: dict) -> subprocess.Popen:
    worker = [str(WORKER), str(out), json.dumps(settings)]
    if n == 1:
        cmd = [sys.executable, *worker]
    else:  # accelerate's CPU launcher (--cpu) starts one process; --multi_gpu starts torchrun's N
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), *worker,
        ]  # fmt: skip
    return subprocess.Popen(
        cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _result(proc: subprocess.Popen, out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-4000:]
    return load_file(out / "adapter" / "adapter_model.safetensors"), json.loads(
        (out / "history.json").read_text()
    )


# debug=fast's recovery (6 steps of 4 windows) in micro-batches of 1: 2 per process and step;
# dropout and gradient clipping on
RECOVERY = [
    "method=magnitude",
    "recovery.micro_batch_size=1",
    "recovery.dropout=0.1",
    "recovery.max_grad_norm=0.5",
]


def _cli(n: int, output_root: Path, *overrides: str) -> subprocess.Popen:
    args = ["-m", "prunelab.cli", "debug=fast", "logger=none", f"output_root={output_root}", *overrides]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), *args,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _same_training(one: Path, two: Path) -> None:
    """The adapters (``<dir>/adapter``) and histories of two trainings agree within tolerance."""
    a1 = load_file(one / "adapter" / "adapter_model.safetensors")
    a2 = load_file(two / "adapter" / "adapter_model.safetensors")
    h1, h2 = (json.loads((d / "history.json").read_text()) for d in (one, two))
    assert a1.keys() == a2.keys() and len(a1) > 0
    assert max(float(t.abs().max()) for k, t in a1.items() if "lora_B" in k) > 1e-3  # trained (B starts at 0)
    worst = max(float((a1[k] - a2[k]).abs().max()) for k in a1)
    assert worst <= WEIGHT_ATOL, f"LoRA weights differ by {worst:g}"
    assert [v["step"] for v in h1["val"]] == [v["step"] for v in h2["val"]] and len(h1["val"]) > 1
    for v1, v2 in zip(h1["val"], h2["val"], strict=True):
        assert v2["loss"] == pytest.approx(v1["loss"], abs=LOSS_ATOL)
    for t1, t2 in zip(h1["train"], h2["train"], strict=True):  # token-weighted over the global batch
        assert t2["loss"] == pytest.approx(t1["loss"], abs=LOSS_ATOL)
    assert h1["best_step"] == h2["best_step"] and h1["train_tokens"] == h2["train_tokens"]


@pytest.mark.slow
def test_two_processes_recover_as_one_process(tmp_path):
    """``accelerate launch --num_processes 2 -m prunelab.cli``: the main process runs the recipe
    and writes the run directory, the other trains with it; the adapter equals one process's
    training of the same pruned checkpoint with the same global batch."""
    from prunelab.models.export import export_adapter
    from prunelab.models.loading import load_pretrained
    from prunelab.recovery.lora import LoraRecovery

    proc = _cli(2, tmp_path, *RECOVERY)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-4000:]
    (run,) = (tmp_path / "runs").iterdir()
    results = json.loads((run / "results.json").read_text())
    assert results["recovered"]["perplexity"] and not (run / ".lock").exists()
    assert "recover: LoRA on embedded (process 1)" in log  # the second process trained too
    # one process, in this one, on the pruned checkpoint the run saved
    node = json.loads((run / "config.json").read_text())["recovery"]
    node = {k: v for k, v in node.items() if k not in ("_target_", "name")}
    rec = LoraRecovery(**{**node, "dropout_rng": "micro_batch"})  # the seeds two processes draw (null)
    torch.manual_seed(0)
    model = load_pretrained(run / "pruned")
    tok = AutoTokenizer.from_pretrained(run / "pruned")
    rec.recover(model, tok, tmp_path / "one")
    export_adapter(tmp_path / "one" / "adapter", run / "pruned")  # as the recover stage saves it
    _same_training(tmp_path / "one", run / "recovered")


@pytest.mark.slow
def test_two_processes_resume_a_training_exactly(tmp_path, monkeypatch):
    """A training killed after its step-2 checkpoint (here: one process, per-micro-batch
    dropout seeds) is resumed by two processes and ends where one uninterrupted process ends."""
    import importlib.util

    from prunelab.recovery import train_state

    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    settings = {"dropout_rng": "micro_batch", "checkpoint_every": 2}
    save = train_state.save

    def killed_after_step_2(out_dir, step, key, tree):
        save(out_dir, step, key, tree)
        if step == 2:
            raise KeyboardInterrupt  # the kill: the checkpoint of step 2 is on disk

    monkeypatch.setattr(train_state, "save", killed_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        worker.main(str(tmp_path / "two"), json.dumps(settings))
    monkeypatch.undo()
    assert json.loads((tmp_path / "two" / "train_state" / "latest.json").read_text())["step"] == 2

    two = _launch(2, tmp_path / "two", {"checkpoint_every": 2})  # dropout_rng null: per micro-batch
    worker.main(str(tmp_path / "one"), json.dumps(settings))  # uninterrupted, meanwhile
    log, _ = two.communicate(timeout=300)
    assert two.returncode == 0, log[-4000:]
    assert json.loads((tmp_path / "two" / "history.json").read_text())["resumed_at"] == [2]
    _same_training(tmp_path / "one", tmp_path / "two")
