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


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tmp_path):
    # one process with the per-micro-batch dropout seeds that two processes use (auto)
    one = _launch(1, tmp_path / "one", {"dropout_rng": "micro_batch"})
    two = _launch(2, tmp_path / "two", {})
    (a1, h1), (a2, h2) = _result(one, tmp_path / "one"), _result(two, tmp_path / "two")

    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["adapter", "history.json"]  # rank 0 only
    assert a1.keys() == a2.keys() and len(a1) > 0
    moved = max(float(t.abs().max()) for k, t in a1.items() if "lora_B" in k)
    assert moved > 1e-3  # the adapters trained (lora_B starts at 0)
    worst = max(float((a1[k] - a2[k]).abs().max()) for k in a1)
    assert worst <= WEIGHT_ATOL, f"LoRA weights differ by {worst:g}"
    assert [v["step"] for v in h1["val"]] == [v["step"] for v in h2["val"]] == [0, 2, 4]
    for v1, v2 in zip(h1["val"], h2["val"], strict=True):
        assert v2["loss"] == pytest.approx(v1["loss"], abs=LOSS_ATOL)
    for t1, t2 in zip(h1["train"], h2["train"], strict=True):  # token-weighted over the global batch
        assert t2["loss"] == pytest.approx(t1["loss"], abs=LOSS_ATOL)
    assert h1["best_step"] == h2["best_step"] and h1["train_tokens"] == h2["train_tokens"]
