"""A real kill inside training (issue 19.4): a CLI job SIGKILLed during LoRA recovery, once a
training state is on disk, is rerun and resumes from that state (the steps before it are not
run again) and ends bit-identical to an uninterrupted job. The unit tests
(tests/unit/test_train_resume.py) interrupt every training method at a chosen step; this one
kills the process itself — no Python cleanup, whatever it was writing at that moment.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from prunelab.models.embedded import asset_dir
from prunelab.recovery import train_state
from tests.integration.test_runner import ENV, prunelab

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (asset_dir("tiny_llama") / "model.safetensors").exists(), reason="embedded weights not built"
    ),
]
STEPS = 60
RESULTS = ["debug=fast", f"recovery.max_steps={STEPS}", "recovery.eval_every=20"]


def test_sigkill_mid_recovery_then_rerun_resumes_bit_identically(tmp_path):
    # uninterrupted, no checkpoints (checkpoint_every changes neither results nor the run directory)
    ref_root, root = tmp_path / "ref", tmp_path / "killed"
    p = prunelab(
        "logger=none", f"output_root={ref_root}", *RESULTS, "recovery.checkpoint_every=0", cwd=tmp_path
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (ref_dir,) = [d for d in (ref_root / "runs").iterdir() if d.is_dir()]
    assert not (ref_dir / "recovered" / train_state.STATE_DIR).exists()

    args = ["logger=none", f"output_root={root}", *RESULTS, "recovery.checkpoint_every=5"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "prunelab.cli", *args],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run_dir = root / "runs" / ref_dir.name  # the same run directory name
    pointer = run_dir / "recovered" / train_state.STATE_DIR / "latest.json"
    deadline = time.time() + 300
    while not pointer.exists():
        assert proc.poll() is None, "the job ended before its first training checkpoint"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # mid-training: a checkpoint on disk, steps left to run
    proc.wait()
    killed_at = json.loads(pointer.read_text())["step"]
    assert 5 <= killed_at < STEPS and not (run_dir / "stages" / "recover.json").exists()

    p = prunelab(*args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    hist, ref_hist = (json.loads((d / "recovered" / "history.json").read_text()) for d in (run_dir, ref_dir))
    assert hist["resumed_at"] == [killed_at]  # from the last checkpoint, not from step 0
    assert "resumed from the training state of step" in p.stdout + p.stderr
    for k in ("train", "val", "best_step", "best_val_loss", "train_tokens"):
        assert hist[k] == ref_hist[k], k
    got, ref = (load_file(str(d / "recovered" / "model" / "model.safetensors")) for d in (run_dir, ref_dir))
    assert got.keys() == ref.keys()
    for n in got:
        assert torch.equal(got[n], ref[n]), n
    r, ref_r = (json.loads((d / "results.json").read_text()) for d in (run_dir, ref_dir))
    assert r["recovered"]["perplexity"] == ref_r["recovered"]["perplexity"]
    assert not (run_dir / "recovered" / train_state.STATE_DIR).exists()  # the stage is recorded: state gone
