"""Resume inside training: every training method is killed at a step (a real SIGKILL of a
Python process running it: no cleanup, no finally blocks), rerun, and compared with an
uninterrupted run (which checkpoints nothing) — bit-identical on the CPU, with the steps before
the last checkpoint not run again. A kill of a whole CLI job during LoRA recovery is
tests/integration/test_train_kill.py.

pytest -q tests/unit/test_train_resume.py
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from prunelab.errors import ConfigError
from prunelab.methods import PruneContext, build_method
from prunelab.recovery import train_state
from prunelab.recovery.lora import LoraRecovery
from prunelab.structure import arch_info
from prunelab.structure.plan import plan_ratio
from tests.conftest import Recorder, make_model
from tests.unit.test_recovery import EXAMPLES, tiny

ROOT = Path(__file__).resolve().parents[2]
_KILL = "PRUNELAB_TEST_SIGKILL"  # set in the child process of ``killed``


class Interrupted(Exception):
    """Stands for a kill where no process is killed (the helpers called in-process)."""


def stop(step: int) -> None:
    """The kill at ``step``: SIGKILL of this process inside ``killed``'s child, else an exception."""
    if os.environ.get(_KILL) == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    raise Interrupted(step)


def killed(fn: str, *args: object) -> None:
    """Run ``fn(*args)`` of this module in a new Python process, which SIGKILLs itself at the
    step the function's hooks stop at (``stop``); it must have died of that signal."""
    code = (
        f"import torch; torch.set_num_threads(1); import tests.unit.test_train_resume as t; t.{fn}(*{args!r})"
    )
    env = {**os.environ, _KILL: "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]


def _tok():
    from transformers import AutoTokenizer

    from prunelab.models.embedded import asset_dir

    return AutoTokenizer.from_pretrained(asset_dir("tiny_llama"))


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def interrupt(monkeypatch, cls: type, name: str, at: int | None) -> list[int]:
    """Wrap the hook method ``cls.name`` (called as ``(model, step, ...)``): the steps it runs
    at are recorded, and at step ``at`` it is killed (``stop``) before doing anything."""
    steps: list[int] = []
    original = getattr(cls, name)
    original = getattr(original, "__wrapped__", original)  # wrapped again: wrap the method itself

    def wrapped(self, model, step, *args):
        if step == at:
            stop(step)
        steps.append(step)
        return original(self, model, step, *args)

    wrapped.__wrapped__ = original
    monkeypatch.setattr(cls, name, wrapped)
    return steps


def same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n


def checkpoint_step(out_dir) -> int:
    return json.loads((out_dir / train_state.STATE_DIR / "latest.json").read_text())["step"]


# ----------------------------------------------------------------------------- the state files


def test_pack_round_trips_nested_tensors_and_refuses_what_json_cannot_hold():
    tree = {"a": [1, 2.5, None, {"m": torch.tensor([True, False])}], "g": torch.arange(3.0), "s": "x"}
    obj, tensors = train_state.pack(tree)
    json.dumps(obj)  # JSON-able
    back = train_state.unpack(obj, tensors)
    assert back["a"][:3] == [1, 2.5, None] and back["s"] == "x"
    assert torch.equal(back["a"][3]["m"], tree["a"][3]["m"]) and torch.equal(back["g"], tree["g"])
    with pytest.raises(TypeError, match="dict keys must be strings"):
        train_state.pack({1: torch.zeros(1)})
    with pytest.raises(TypeError, match="cannot store a set"):
        train_state.pack({"x": {1, 2}})


def test_a_checkpoint_replaces_the_previous_one_and_a_damaged_or_foreign_one_is_discarded(tmp_path, caplog):
    train_state.save(tmp_path, 2, "k", {"x": torch.ones(3)})
    train_state.save(tmp_path, 4, "k", {"x": torch.full((3,), 4.0)})
    root = tmp_path / train_state.STATE_DIR
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step-00000004"]  # only the latest
    step, state = train_state.load(tmp_path, "k")
    assert step == 4 and torch.equal(state["x"], torch.full((3,), 4.0))
    # half-written files of a killed writer are never read: only latest.json names a checkpoint
    (root / ".step-00000006.123.tmp").mkdir()
    assert train_state.load(tmp_path, "k")[0] == 4

    with caplog.at_level(logging.WARNING):
        assert train_state.load(tmp_path, "other") is None
    assert "belongs to another training" in caplog.text and not root.exists()

    train_state.save(tmp_path, 2, "k", {"x": torch.ones(3)})
    f = root / "step-00000002" / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[:-5])  # truncated
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert train_state.load(tmp_path, "k") is None
    assert "damaged" in caplog.text and not root.exists()


def test_rng_state_round_trips_every_stream():
    import random

    import numpy as np

    state = train_state.rng_state()
    obj, tensors = train_state.pack(state)
    want = (torch.rand(3), random.random(), np.random.rand())
    train_state.set_rng_state(train_state.unpack(json.loads(json.dumps(obj)), tensors))
    assert torch.equal(torch.rand(3), want[0]) and random.random() == want[1] and np.random.rand() == want[2]


def test_checkpoint_every_must_be_a_non_negative_integer():
    for bad in (-1, 1.5, True, "50"):
        with pytest.raises(ConfigError, match=r"recovery\.checkpoint_every="):
            LoraRecovery(checkpoint_every=bad)
    with pytest.raises(ConfigError, match=r"method\.train\.checkpoint_every="):
        _loraprune(checkpoint_every=-1)


# ----------------------------------------------------------------------------- LoRA recovery


def _lora(**kw) -> LoraRecovery:
    # 3 of the 8 examples per step: the checkpoint falls mid-epoch (a data position to restore)
    args = dict(batch_size=3, micro_batch_size=3, epochs=4, max_steps=7, eval_every=3, warmup_steps=2)
    return LoraRecovery(**{**args, "lr": 1e-2, "dropout": 0.1, **kw})


class StopAt(Recorder):
    """A tracker that kills (``stop``) when step ``at``'s training loss is logged."""

    def __init__(self, at: int | None = None):
        super().__init__()
        self.at = at

    def log(self, data, step=None):
        if "recovery/train_loss" in data and step == self.at:
            stop(step)
        super().log(data, step)

    def train_steps(self) -> list[int]:
        return [s for s, d in self.logged if "recovery/train_loss" in d]


def _lora_norm(self, model, groups):
    v = float(sum(p.detach().norm() for n, p in model.named_parameters() if "lora_B" in n))
    return v, {"all": v}


def _kill_lora(out: str, worsening: bool) -> None:
    if worsening:
        pytest.MonkeyPatch().setattr(LoraRecovery, "_val_losses", _lora_norm)
    _lora(checkpoint_every=2).fit(tiny(), _tok(), EXAMPLES, EXAMPLES[:3], Path(out), tracker=StopAt(5))


@pytest.mark.parametrize("worsening", [False, True], ids=["improving", "worsening"])
def test_lora_recovery_resumes_from_its_last_checkpoint_bit_identically(
    tok, tmp_path, monkeypatch, worsening
):
    if worsening:  # validation gets worse as LoRA grows: the best adapter is the one before the checkpoint
        monkeypatch.setattr(LoraRecovery, "_val_losses", _lora_norm)
    ref = _lora(checkpoint_every=0).fit(tiny(), tok, EXAMPLES, EXAMPLES[:3], tmp_path / "ref")
    assert not (tmp_path / "ref" / train_state.STATE_DIR).exists()  # 0: off

    out = tmp_path / "run"
    killed("_kill_lora", str(out), worsening)
    assert checkpoint_step(out) == 4
    tracker = StopAt()
    got = _lora(checkpoint_every=2).fit(tiny(), tok, EXAMPLES, EXAMPLES[:3], out, tracker=tracker)
    assert tracker.train_steps() == [5, 6, 7]  # steps 1-4 are not run again
    same_params(got, ref)
    hist, ref_hist = (json.loads((d / "history.json").read_text()) for d in (out, tmp_path / "ref"))
    assert hist["resumed_at"] == [4]
    assert hist["best_step"] == (3 if worsening else 7)
    for k in ("train", "val", "best_step", "best_val_loss", "train_tokens"):
        assert hist[k] == ref_hist[k], k
    assert checkpoint_step(out) == 7  # the last step's state, kept until the stage is recorded


def test_a_checkpoint_of_other_starting_weights_is_not_resumed(tok, tmp_path, caplog):
    out = tmp_path / "run"
    _lora(checkpoint_every=2).fit(tiny(seed=0), tok, EXAMPLES, EXAMPLES[:3], out)
    ref = _lora(checkpoint_every=0).fit(tiny(seed=1), tok, EXAMPLES, EXAMPLES[:3], tmp_path / "ref")
    tracker = StopAt()
    with caplog.at_level(logging.WARNING):
        got = _lora(checkpoint_every=2).fit(tiny(seed=1), tok, EXAMPLES, EXAMPLES[:3], out, tracker=tracker)
    assert "belongs to another training" in caplog.text
    assert tracker.train_steps() == list(range(1, 8))
    same_params(got, ref)


# ----------------------------------------------------------------------------- the methods

TRAIN = {
    "data": "embedded",
    "format": "text",
    "cutoff_len": 32,
    "batch_size": 4,
    "micro_batch_size": 2,
    "eval_every": 4,
    "val_size": 4,
    "warmup_steps": 2,
    "lr": 2e-3,
    "dropout": 0.1,  # the random streams must be restored too
    "max_train_examples": 48,
}


def _loraprune(**train):
    cfg = {
        "_target_": "prunelab.methods.loraprune.LoRAPrune",
        "name": "loraprune",
        "prune_freq": 2,
        "keep_first_layers": 1,
        "keep_last_layers": 1,
        "train": {**TRAIN, "max_steps": 12, **train},
    }
    return build_method(OmegaConf.create(cfg))


def _atp(attention_space: str = "heads", **train):
    cfg = {
        "_target_": "prunelab.methods.atp.ATP",
        "name": "atp",
        "attention_space": attention_space,
        "generator": {"dim": 16, "heads": 2, "layers": 1, "lr": 5e-2},
        "schedule": "fast",
        "freeze_patience": 3,
        "freeze_by": 0.5,
        "train": {**TRAIN, "max_steps": 12, **train},
    }
    return build_method(OmegaConf.create(cfg))


def _lorashear(**train):
    cfg = {
        "_target_": "prunelab.methods.lorashear.LoRAShear",
        "name": "lorashear",
        "train": {k: v for k, v in {**TRAIN, **train}.items() if k != "data"},
        "knowledge": {"enabled": False},
        "lhspg": {"warmup_steps": 2, "periods": 3, "period_steps": 3},
        "recovery": {"enabled": False},
    }
    return build_method(OmegaConf.create(cfg))


def _prune(method, out, tok, ratio=0.2):
    from prunelab.data.sources import load_source_config

    model = make_model("llama", 2, layers=4, vocab=2048, max_pos=256, inter=128)
    arch = arch_info(model.config)
    plan = plan_ratio(arch, ratio, ("attn", "mlp"), method.layers(arch.num_layers), 0.05)
    ctx = PruneContext(
        tok,
        None,
        0,
        data_cfg=load_source_config("embedded"),
        out_dir=out / "prune_train",
        run_dir=out,
        ratio_tolerance=0.05,
    )
    return model, method.prune(model, plan, ctx)


def _kill_prune(kind: str, out: str) -> None:
    """The interrupted run of each pruning method's test, killed at the step its test names."""
    from prunelab.methods.atp.pruner import JointTraining
    from prunelab.methods.loraprune.pruner import PruneSchedule
    from prunelab.methods.lorashear.pruner import LHSPGSchedule

    mp, tok = pytest.MonkeyPatch(), _tok()
    if kind == "loraprune":
        interrupt(mp, PruneSchedule, "after_backward", at=8)
        _prune(_loraprune(checkpoint_every=3), Path(out), tok, ratio=0.1)
    elif kind.startswith("atp:"):
        interrupt(mp, JointTraining, "before_step", at=5)
        _prune(_atp(kind.split(":")[1], checkpoint_every=4), Path(out), tok)
    elif kind == "lorashear":
        interrupt(mp, LHSPGSchedule, "after_step", at=7)
        _prune(_lorashear(checkpoint_every=3), Path(out), tok)


def _same_pruning(got, ref) -> None:
    (model, masks), (ref_model, ref_masks) = got, ref
    assert masks.keys() == ref_masks.keys() and masks
    for k in masks:
        assert torch.equal(masks[k], ref_masks[k]), k
    same_params(model, ref_model)


@pytest.mark.slow  # ~25 s: LoRAPrune scores every step, three trainings
def test_loraprune_resumes_masks_scores_and_adapter_bit_identically(tok, tmp_path, monkeypatch):
    from prunelab.methods.loraprune.pruner import PruneSchedule

    ref_method = _loraprune(checkpoint_every=0)
    ref = _prune(ref_method, tmp_path / "ref", tok, ratio=0.1)

    out = tmp_path / "run"
    killed("_kill_prune", "loraprune", str(out))
    assert checkpoint_step(out / "prune_train") == 6  # masks grown at steps 2, 4, 6 are in it
    ran = interrupt(monkeypatch, PruneSchedule, "after_backward", at=None)
    method = _loraprune(checkpoint_every=3)
    got = _prune(method, out, tok, ratio=0.1)
    assert ran == list(range(7, 13))  # the steps after the checkpoint, and only those
    _same_pruning(got, ref)
    assert method.history["prune_steps"] == ref_method.history["prune_steps"]


@pytest.mark.parametrize(
    "space",
    ["heads", pytest.param("head_dim", marks=pytest.mark.slow)],  # head_dim: the paper's (masked)
)
def test_atp_resumes_generator_decisions_and_adapter_bit_identically(tok, tmp_path, monkeypatch, space):
    from prunelab.methods.atp.pruner import JointTraining

    ref_method = _atp(space, checkpoint_every=0)
    ref = _prune(ref_method, tmp_path / "ref", tok)
    assert ref_method.history["frozen_at"] > 4  # the generator still trains at the checkpoint

    out = tmp_path / "run"
    killed("_kill_prune", f"atp:{space}", str(out))
    assert checkpoint_step(out / "prune_train") == 4
    ran = interrupt(monkeypatch, JointTraining, "before_step", at=None)
    method = _atp(space, checkpoint_every=4)
    got = _prune(method, out, tok)
    assert ran == list(range(5, 13))
    _same_pruning(got, ref)
    assert method.history["decisions"] == ref_method.history["decisions"]
    assert method.history["frozen_at"] == ref_method.history["frozen_at"]
    if space == "head_dim":  # the shared head-dimension channels were searched and masked alike
        assert any(k.endswith((".qk", ".vo")) for k in got[1])


def test_lorashear_lhspg_resumes_mid_period_bit_identically(tok, tmp_path, monkeypatch):
    from prunelab.methods.lorashear.pruner import LHSPGSchedule

    ref_method = _lorashear(checkpoint_every=0)
    ref = _prune(ref_method, tmp_path / "ref", tok)

    out = tmp_path / "run"
    # periods: selection after steps 2, 5, 8, merges at 5, 8, 11; the checkpoint of step 6 is
    # after a merge (base weights written) and inside the second period
    killed("_kill_prune", "lorashear", str(out))
    assert checkpoint_step(out / "prune_train") == 6
    ran = interrupt(monkeypatch, LHSPGSchedule, "after_step", at=None)
    method = _lorashear(checkpoint_every=3)
    got = _prune(method, out, tok)
    assert ran == list(range(7, 12))
    _same_pruning(got, ref)
    assert method.history["events"] == ref_method.history["events"]


def _recover_mixture(tok, out: Path, every: int):
    """A one-stage LoRAShear recovery whose mixture moves at every validation."""
    from prunelab.data.sources import load_source_config
    from prunelab.methods.lorashear.recovery import DynamicRecovery

    stage = {"name": "text", "format": "text", "sources": ["embedded:reference", "embedded:comments"]}
    lora = {k: TRAIN[k] for k in ("cutoff_len", "batch_size", "micro_batch_size", "dropout")}
    lora.update(val_size=4, eval_every=2, checkpoint_every=every)
    rec = DynamicRecovery(stages=[{**stage, "max_steps": 6}], lora=lora)
    data = load_source_config("embedded")
    model = make_model("llama", 2, layers=2, vocab=2048, max_pos=256, inter=64)
    ref = rec.reference_losses(model, tok, data)
    ref["text"]["embedded:comments"] -= 1.0  # the mixture moves at every validation
    return rec.recover(model, tok, out, None, data, ref)


def _count_samples(monkeypatch, at: int | None) -> list[int]:
    """The steps whose examples the mixture draws; killed (``stop``) at step ``at``."""
    from prunelab.methods.lorashear.recovery import Mixture

    steps: list[int] = []
    sample = getattr(Mixture.sample, "__wrapped__", Mixture.sample)

    def counted(self, step, n):
        if step == at:
            stop(step)
        steps.append(step)
        return sample(self, step, n)

    counted.__wrapped__ = sample
    monkeypatch.setattr(Mixture, "sample", counted)
    return steps


def _kill_mixture(out: str) -> None:
    _count_samples(pytest.MonkeyPatch(), at=5)
    _recover_mixture(_tok(), Path(out), 2)


def test_lorashear_recovery_stage_resumes_its_mixture_bit_identically(tok, tmp_path, monkeypatch):
    ref_model = _recover_mixture(tok, tmp_path / "ref", 0)
    killed("_kill_mixture", str(tmp_path / "run"))
    assert checkpoint_step(tmp_path / "run" / "text") == 4
    steps = _count_samples(monkeypatch, at=None)
    got = _recover_mixture(tok, tmp_path / "run", 2)
    assert steps == [5, 6]
    same_params(got, ref_model)
    hist, ref_hist = (
        json.loads((d / "text" / "history.json").read_text()) for d in (tmp_path / "run", tmp_path / "ref")
    )
    assert hist["mixture"] == ref_hist["mixture"] and len(hist["mixture"]) == 4  # steps 0, 2, 4, 6
    assert not (tmp_path / "run" / "text" / train_state.STATE_DIR).exists()  # the finished stage's is gone


# ----------------------------------------------------------------------------- the Python API

API = {"overrides": ["debug=fast"], "max_steps": 6, "eval_every": 3}


def _kill_api_recover(out: str) -> None:
    import prunelab

    save = train_state.save

    def save_then_stop(out_dir, step, key, tree):
        path = save(out_dir, step, key, tree)
        if step == 4:  # right after the checkpoint of step 4 is committed
            stop(step)
        return path

    pytest.MonkeyPatch().setattr(train_state, "save", save_then_stop)
    prunelab.recover(tiny(), _tok(), output_dir=out, checkpoint_every=2, **API)


@pytest.mark.slow  # ~20-35 s: recovery data from the corpus, three trainings
def test_api_recover_with_an_output_dir_resumes_a_killed_call_and_cleans_up(tok, tmp_path):
    import prunelab

    ref = prunelab.recover(tiny(), tok, checkpoint_every=0, **API)
    out = tmp_path / "api"
    killed("_kill_api_recover", str(out))
    assert checkpoint_step(out) == 4
    got = prunelab.recover(tiny(), tok, output_dir=out, checkpoint_every=2, **API)
    assert got.history["resumed_at"] == [4]
    assert got.history["train"] == ref.history["train"] and len(ref.history["train"]) == 6
    same_params(got.model, ref.model)
    assert not (out / train_state.STATE_DIR).exists()  # the call returned: nothing to resume
