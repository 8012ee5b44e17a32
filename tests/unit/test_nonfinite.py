"""Non-finite numbers are errors (docs/reliability.md, "Non-finite numbers"): a NaN or an
infinity in the loaded weights, an evaluation, the calibration loss, importance scores or a
training loss stops the run with a ``NonFiniteError`` that names where; float16 training
scales its loss. Each test fails if its check is removed (no exception, or an unscaled step)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

import prunelab.cli  # noqa: F401  (registers the run-dir resolver)
from prunelab.errors import NonFiniteError
from prunelab.models.embedded import asset_dir
from prunelab.numerics import check_weights, loss_scaler, watch_outputs
from prunelab.paths import conf_dir
from tests.conftest import Recorder, make_model
from tests.unit.test_recovery import EXAMPLES, quick, tiny

BAD = "model.layers.2.mlp.up_proj.weight"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def poisoned_copy(tmp_path: Path, value: float) -> Path:
    """The embedded tiny_llama as a local folder, with ``value`` at two places of one weight."""
    out = tmp_path / "poisoned"
    shutil.copytree(asset_dir("tiny_llama"), out)
    tensors = load_file(out / "model.safetensors")
    tensors[BAD][3, 5] = value
    tensors[BAD][0, 0] = value
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def fast_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose(
            config_name="config",
            overrides=["debug=fast", "logger=none", "recovery=none", f"output_root={tmp_path}", *overrides],
        )


@pytest.mark.parametrize(
    "value, count", [(float("nan"), "2 NaN and 0 inf"), (float("inf"), "0 NaN and 2 inf")]
)
def test_a_poisoned_weight_stops_the_run_before_anything_else(tmp_path, value, count):
    """End to end through the runner on the embedded model: the error names the parameter and
    what is wrong with it; nothing is evaluated (no dense cache), pruned or reported."""
    from prunelab.runner import run

    folder = poisoned_copy(tmp_path, value)
    cfg = fast_cfg(tmp_path, "model=tiny_llama", f"model.path={folder}")
    with pytest.raises(NonFiniteError) as e:
        run(cfg, tmp_path / "run")
    msg = str(e.value)
    assert f"{BAD} has {count} of {64 * 256} values" in msg or f"{BAD} has {count}" in msg
    assert f"model.path={str(folder)!r}" in msg and "re-download or re-export" in msg
    assert not list((tmp_path / "cache").rglob("*.json"))  # no dense evaluation was cached
    assert not (tmp_path / "run" / "results.json").exists()
    error = json.loads((tmp_path / "run" / "error.json").read_text())  # the failure is recorded
    assert error["type"] == "NonFiniteError" and BAD in error["message"]


@pytest.mark.slow
def test_the_cli_reports_a_nan_weight_without_a_traceback(tmp_path):
    """``prunelab model.path=<poisoned>``: exit code 1, the message, no traceback."""
    import os
    import subprocess
    import sys

    folder = poisoned_copy(tmp_path, float("nan"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    args = ["debug=fast", "logger=none", "recovery=none", f"output_root={tmp_path}", f"model.path={folder}"]
    p = subprocess.run(
        [sys.executable, "-m", "prunelab.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = p.stdout + p.stderr  # (hydra's job logging writes to stdout)
    assert p.returncode == 1, out[-3000:]
    assert f"non-finite weights in the model loaded from model.path={str(folder)!r}" in out
    assert BAD in out and "Traceback" not in out


def test_check_weights_names_the_first_bad_tensor_and_passes_a_finite_model():
    model = make_model()
    check_weights(model, "a finite model", "-")  # no error
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[2, 3] = float("nan")
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("-inf")
    with pytest.raises(
        NonFiniteError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight has 1 NaN and 0 inf"
    ):
        check_weights(model, "the model", "do something")


# ------------------------------------------------------------------ evaluation
def nan_after(layer: torch.nn.Module):
    """A forward hook making ``layer``'s output NaN (what a float16 overflow leaves)."""
    return layer.register_forward_hook(lambda m, a, out: out * float("nan"))


def test_a_nan_perplexity_is_an_error_naming_the_model_and_the_text(tmp_path, tok):
    from prunelab.evaluation.suite import evaluate

    cfg = fast_cfg(tmp_path)
    model = make_model("llama", vocab=2048, max_pos=256)
    assert evaluate(model, tok, cfg.eval, tmp_path, "pruned", cfg.data)["perplexity"]  # finite: no error
    nan_after(model.model.layers[1].mlp)
    with pytest.raises(
        NonFiniteError, match=r"evaluation of the pruned model: the perplexity on embedded:test is nan"
    ):
        evaluate(model, tok, cfg.eval, tmp_path, "pruned", cfg.data)


def test_zero_shot_logits_are_watched_without_a_sync_per_forward():
    """``watch_outputs`` flags a NaN in any forward while inside (zero-shot accuracies from NaN
    log-likelihoods would still be numbers), and nothing once a clean model runs."""
    model = make_model()
    x = torch.randint(0, 128, (2, 8))
    with watch_outputs(model.get_output_embeddings()) as nonfinite, torch.no_grad():
        model(input_ids=x)
        assert not nonfinite()
        handle = nan_after(model.model.layers[0].mlp)
        model(input_ids=x)
        handle.remove()
        model(input_ids=x)  # a clean forward afterwards does not clear it
        assert nonfinite()


def test_nan_zero_shot_logits_are_an_error_through_the_suite(tmp_path, tok):
    from prunelab.evaluation.suite import evaluate

    cfg = fast_cfg(
        tmp_path,
        "eval.perplexity.datasets=[]",
        "eval.zeroshot.tasks=[prunelab_ending]",
        "eval.zeroshot.num_examples=4",
        "eval.zeroshot.limit=4",
    )
    model = make_model("llama", vocab=2048, max_pos=256)
    assert evaluate(model, tok, cfg.eval, tmp_path, "dense", cfg.data)["zeroshot"]["prunelab_ending"]
    nan_after(model.model.layers[1].mlp)
    with pytest.raises(NonFiniteError, match=r"dense model: its logits held NaN or inf during the zero-shot"):
        evaluate(model, tok, cfg.eval, tmp_path, "dense", cfg.data)


# ------------------------------------------------------------------ calibration and importance
def test_a_nan_calibration_loss_is_an_error_naming_the_sequences():
    from prunelab.importance.taylor import TaylorImportance
    from prunelab.structure import arch_info, units

    model = make_model()
    arch = arch_info(model.config)
    calib = torch.randint(0, 128, (10, 16), generator=torch.Generator().manual_seed(0))
    todo = units(arch, ("attn", "mlp"))
    TaylorImportance(micro_batch=4).scores(model, arch, todo, calib)  # finite: no error
    seen = []

    def poison(m, a, out):  # the second micro-batch (sequences 4-7) only
        seen.append(1)
        return out * float("nan") if len(seen) == 2 else out

    model.model.layers[0].mlp.register_forward_hook(poison)
    with pytest.raises(
        NonFiniteError, match=r"loss of calibration sequences 4-7 of 10 is nan \(1 of 3 batches"
    ):
        TaylorImportance(micro_batch=4).scores(model, arch, todo, calib)


def test_nan_importance_scores_are_an_error_naming_the_unit():
    """A structured method's estimator output is checked (a NaN weight that got past loading,
    e.g. through the Python API); the shared ranking refuses NaN but keeps +inf ("never")."""
    from prunelab.importance import select_global, select_masks
    from prunelab.methods.structured.pruner import StructuredPruner
    from prunelab.structure import arch_info
    from prunelab.structure.plan import plan_ratio

    model = make_model()
    arch = arch_info(model.config)
    method = StructuredPruner(targets=("attn", "mlp"))
    plan = plan_ratio(arch, 0.2, ("attn", "mlp"), [0, 1, 2], tolerance=0.5)
    method.select(model, plan, None)  # finite: no error
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[7, 0] = float("nan")
    with pytest.raises(
        NonFiniteError, match=r"method=structured importance=magnitude: unit 1\.mlp has 1 NaN"
    ):
        method.select(model, plan, None)
    scores = {"0.mlp": torch.tensor([1.0, float("inf"), 0.5]), "1.mlp": torch.tensor([2.0, 1.0, 3.0])}
    assert select_masks(scores, {"0.mlp": 1, "1.mlp": 1})["0.mlp"].tolist() == [True, True, False]
    scores["1.mlp"][1] = float("nan")
    for pick in (select_masks, select_global):
        with pytest.raises(NonFiniteError, match=r"unit 1\.mlp has 1 NaN and 0 inf of 3"):
            pick(scores, {"0.mlp": 1, "1.mlp": 1})


def test_layerwise_statistics_and_solver_outputs_are_checked_per_block():
    from prunelab.sparsity.engine import prune_layerwise

    def keep_all(name, w, stats):
        return w, torch.ones_like(w, dtype=torch.bool), {}

    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    args = dict(layers=[0, 1, 2], modules=("q_proj", "down_proj"), gram=False, device=torch.device("cpu"))
    model = make_model()
    prune_layerwise(model, calib, keep_all, **args)  # finite: no error
    nan_after(model.model.layers[0])  # block 1 reads NaN activations
    with pytest.raises(
        NonFiniteError,
        match=r"statistics of the input of block 1's self_attn\.q_proj hold NaN or inf \(blocks 0-0",
    ):
        prune_layerwise(model, calib, keep_all, **args)

    def diverged(name, w, stats):
        return w * float("nan") if name == "down_proj" else w, torch.ones_like(w, dtype=torch.bool), {}

    with pytest.raises(
        NonFiniteError, match=r"new weight of model\.layers\.0\.mlp\.down_proj\.weight holds NaN"
    ):
        prune_layerwise(make_model(), calib, diverged, **args)


def test_a_method_that_leaves_non_finite_weights_is_stopped_before_saving():
    """``apply_method`` (the CLI's prune stage and ``prunelab.prune``) checks the pruned weights."""
    from types import SimpleNamespace

    from prunelab.methods.structured.pruner import StructuredPruner
    from prunelab.runner import apply_method
    from prunelab.structure import arch_info
    from prunelab.structure.plan import plan_ratio

    class Diverging(StructuredPruner):
        def prune(self, model, plan, ctx):
            masks = super().prune(model, plan, ctx)
            with torch.no_grad():
                model.model.layers[0].self_attn.o_proj.weight[1, 1] = float("inf")
            return masks

    model = make_model()
    plan = plan_ratio(arch_info(model.config), 0.2, ("attn", "mlp"), [0, 1, 2], tolerance=0.5)
    apply_method(
        StructuredPruner(targets=("attn", "mlp")), make_model(), plan, SimpleNamespace(calibration=None)
    )
    with pytest.raises(
        NonFiniteError, match=r"model pruned by method=structured: model\.layers\.0\.self_attn"
    ):
        apply_method(Diverging(targets=("attn", "mlp")), model, plan, SimpleNamespace(calibration=None))


def test_lorashear_knowledge_analysis_refuses_a_nan_perplexity():
    """The unprunable groups are chosen by sorting perplexity deviations: NaN ones are refused."""
    from prunelab.methods.lorashear.knowledge import knowledge_distribution
    from prunelab.structure import arch_info

    model = make_model()
    ids = torch.randint(0, 128, (2 * 32,), generator=torch.Generator().manual_seed(0))
    arch = arch_info(model.config)
    probe = dict(seq_len=32, layers=[1], ratios=(0.5,), kinds=("mlp",))
    assert knowledge_distribution(model, arch, ids, **probe).unprunable  # finite: no error
    nan_after(model.model.layers[2].mlp)
    with pytest.raises(
        NonFiniteError, match=r"lorashear knowledge analysis: the perplexity of the unpruned model is nan"
    ):
        knowledge_distribution(model, arch, ids, **probe)


@pytest.mark.parametrize("scope", ["global", "unit"])
@pytest.mark.parametrize("saliency", ["lora_aware", "magnitude"])
def test_lorashear_lhspg_selection_refuses_nan_saliency_naming_the_unit(scope, saliency):
    """A NaN in one LoRA factor (intermediate channel 7 of layer 1's MLP) is named by unit,
    in both selection scopes, before any ranking (the global one would spread it to every unit)."""
    from prunelab.structure import arch_info, units
    from tests.unit.test_lorashear import _lorashear, _peft_model

    pm = _peft_model()
    arch = arch_info(pm.base_model.model.config)
    todo = units(arch, ("mlp",))
    method = _lorashear(lhspg={"scope": scope, "saliency": saliency}, knowledge={"enabled": False})
    select = method._select_global if scope == "global" else method._select
    want = {"mlp": 4} if scope == "global" else {u.key: 2 for u in todo}

    def fresh():
        return {u.key: torch.zeros(u.n, dtype=torch.bool) for u in todo}

    redundant = fresh()
    select(pm, arch, todo, redundant, want)
    assert sum(int(m.sum()) for m in redundant.values()) == (4 if scope == "global" else 2 * len(todo))
    with torch.no_grad():
        pm.base_model.model.model.layers[1].mlp.up_proj.lora_B["default"].weight[7, 0] = float("nan")
    with pytest.raises(
        NonFiniteError, match=rf"LHSPG selection \({saliency} saliency.*unit 1\.mlp has [1-9]"
    ):
        select(pm, arch, todo, fresh(), want)


def test_atp_generator_step_refuses_a_nan_lm_loss(tmp_path, tok):
    """ATP's generator step has its own LM loss (the LoRA step's is checked by the trainer): a
    NaN there stops the run at that step, before the generator is updated from it."""
    from prunelab.data.sources import load_source_config
    from prunelab.methods import PruneContext
    from prunelab.structure import arch_info
    from prunelab.structure.plan import plan_ratio
    from tests.unit.test_atp import _atp

    model = make_model("llama", 2, layers=4, vocab=2048, max_pos=256, inter=128)
    # training forwards only (validation runs without gradients): the generator's comes first
    model.lm_head.register_forward_hook(
        lambda m, a, out: out * float("nan") if torch.is_grad_enabled() else out
    )
    arch = arch_info(model.config)
    method = _atp()
    plan = plan_ratio(arch, 0.2, ("attn", "mlp"), method.layers(arch.num_layers), 0.05)
    ctx = PruneContext(
        tok,
        None,
        0,
        data_cfg=load_source_config("embedded"),
        out_dir=tmp_path / "t",
        tracker=Recorder(),
        run_dir=tmp_path,
    )
    with pytest.raises(NonFiniteError, match=r"atp generator step 1/\d+: the LM loss is nan"):
        method.prune(model, plan, ctx)


# ------------------------------------------------------------------ training
class Corrupt:
    """Training hooks that corrupt steps on purpose: ``loss`` makes the logits of step ``at``
    inf (the loss is then NaN/inf); ``grad`` makes the gradient flowing back through layer 1's
    MLP at step ``at`` inf (the loss stays finite), ``grad_from`` at every step from ``at`` on.
    Records the LoRA state after every step."""

    def __init__(self, kind: str, at: int) -> None:
        self.kind, self.at, self.step, self.states = kind, at, 0, {}

    def hooks(self):
        from prunelab.recovery.lora import TrainHooks

        return TrainHooks(setup=self.setup, before_step=self.before, after_step=self.after)

    def setup(self, peft_model) -> None:
        inner = peft_model.base_model.model
        if self.kind == "loss":
            inner.lm_head.register_forward_hook(lambda m, a, out: out * float("inf") if self.hit() else out)
        else:
            mlp = inner.model.layers[1].mlp

            def hook(m, a, out):
                if self.hit() and out.requires_grad:
                    out.register_hook(lambda g: g * float("inf"))

            mlp.register_forward_hook(hook)

    def hit(self) -> bool:
        return (
            self.step == self.at or (self.kind == "grad_from" and self.step > self.at)
        ) and torch.is_grad_enabled()

    def before(self, model, step, steps, micro) -> None:
        self.step = step

    def after(self, model, step, steps) -> None:
        self.states[step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_non_finite_training_loss_stops_at_its_step(tok, tmp_path):
    rec = quick(max_steps=4, lr=1e-3)
    train, _, _ = rec._tokenize(tok, EXAMPLES, [])
    bad = Corrupt("loss", at=3)
    with pytest.raises(NonFiniteError, match=r"recovery training: the loss of step 3/4 is (nan|inf)"):
        rec.fit_features(tiny(), tok, train, train[:2], tmp_path, hooks=bad.hooks())
    assert sorted(bad.states) == [1, 2]  # step 3 never updated the adapter


def test_a_non_finite_gradient_with_a_finite_loss_stops_at_its_step(tok, tmp_path):
    rec = quick(max_steps=4, lr=1e-3)
    train, _, _ = rec._tokenize(tok, EXAMPLES, [])
    bad = Corrupt("grad", at=2)
    with pytest.raises(
        NonFiniteError, match=r"gradient of the LoRA parameters at step 2/4 is (nan|inf) although"
    ):
        rec.fit_features(tiny(), tok, train, train[:2], tmp_path, hooks=bad.hooks())
    assert sorted(bad.states) == [1]


def test_non_finite_merged_weights_are_an_error(tok, tmp_path):
    """Without validation (nothing would see it) a NaN left in the adapter after the last
    step reaches the merged model: refused, naming the weight."""
    from prunelab.recovery.lora import TrainHooks

    def poison(model, step, steps):
        if step == steps:
            with torch.no_grad():
                model.base_model.model.model.layers[1].self_attn.q_proj.lora_B["default"].weight[0, 0] = (
                    float("nan")
                )

    rec = quick(max_steps=2)
    train, _, _ = rec._tokenize(tok, EXAMPLES, [])
    with pytest.raises(
        NonFiniteError,
        match=r"model after recovery training \(the adapter of step 2 merged\): model\.layers\.1\.self_attn\.q_proj",
    ):
        rec.fit_features(tiny(), tok, train, [], tmp_path, hooks=TrainHooks(after_step=poison))


def test_a_nan_validation_loss_is_an_error(tok, tmp_path, monkeypatch):
    from prunelab.recovery.lora import LoraRecovery

    monkeypatch.setattr(LoraRecovery, "_val_losses", lambda self, m, g: (float("nan"), {"all": float("nan")}))
    rec = quick(max_steps=2)
    train, _, _ = rec._tokenize(tok, EXAMPLES, [])
    with pytest.raises(NonFiniteError, match=r"recovery training: the validation loss at step 0/2 is nan"):
        rec.fit_features(tiny(), tok, train, train[:2], tmp_path)


def test_loraprune_refuses_nan_scores_unless_a_float16_overflow_step():
    from types import SimpleNamespace

    from prunelab.methods.loraprune.pruner import PruneSchedule

    todo = [SimpleNamespace(key="1.mlp", n=4, kind="mlp", layer=1)]
    sch = PruneSchedule(
        None, todo, {"1.mlp": 2}, "lora_grad", beta=0.9, prune_freq=2, warmup=0.0, cooldown=0.25
    )
    nan = {"1.mlp": torch.tensor([1.0, float("nan"), 2.0, 3.0])}
    with pytest.raises(
        NonFiniteError, match=r"lora_grad importance scores of unit 1\.mlp at step 3/8 hold 1 NaN"
    ):
        sch.update(nan, step=3, steps=8)
    sch.fp16 = True
    sch.update(nan, step=3, steps=8)
    assert sch.skipped == 1


# ------------------------------------------------------------------ float16: loss scaling
def test_loss_scaling_is_on_for_float16_models_only():
    assert loss_scaler(make_model().half()).is_enabled()
    assert not loss_scaler(make_model().to(torch.bfloat16)).is_enabled()
    assert not loss_scaler(make_model()).is_enabled()


def lora_grads(model, scale: float, scaler=None) -> torch.Tensor:
    """The LoRA gradients of ``scale`` × the LM loss (a tiny scale stands for a large batch's
    token count), unscaled by ``scaler`` when one is given."""
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=x, labels=x).loss * scale
    (scaler.scale(loss) if scaler is not None else loss).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    if scaler is not None:
        scaler.unscale_(torch.optim.SGD(params, lr=0.0))
    out = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
    return out


def test_float16_gradients_vanish_unscaled_and_survive_with_loss_scaling():
    """Why float16 training scales its loss: gradients through float16 activations below
    6e-8 are zero. A loss scaled by 1e-6 (a batch of ~1e6 target tokens) gives all-zero LoRA
    gradients in plain float16, the float32 gradients (within 2%) with ``loss_scaler``."""
    from peft import LoraConfig, get_peft_model

    def peft(dtype):
        torch.manual_seed(0)
        cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        return get_peft_model(make_model().to(dtype), cfg)

    ref = lora_grads(peft(torch.float32), 1e-6)
    half = peft(torch.float16)
    assert {p.dtype for p in half.parameters() if p.requires_grad} == {torch.float32}  # peft: fp32 adapters
    plain = lora_grads(half, 1e-6)
    scaled = lora_grads(half, 1e-6, loss_scaler(half))
    assert ref.abs().max() > 0 and plain.abs().max() < 1e-3 * ref.abs().max()
    assert torch.allclose(scaled, ref, rtol=0.02, atol=0.02 * float(ref.abs().max()))


def test_float16_training_skips_an_overflowing_step_and_goes_on(tok, tmp_path):
    """A float16 model trains with loss scaling: a step whose scaled gradient overflows is
    skipped (the adapter unchanged, the scale halved) and recorded; the run goes on. The same
    corruption in float32 stops the run (``test_a_non_finite_gradient...``)."""
    rec = quick(max_steps=4, lr=1e-3)
    train, _, _ = rec._tokenize(tok, EXAMPLES, [])
    bad = Corrupt("grad", at=2)
    out = tmp_path / "fp16"
    merged = rec.fit_features(tiny().half(), tok, train, train[:2], out, hooks=bad.hooks())
    hist = json.loads((out / "history.json").read_text())
    assert hist["loss_scaling"] == {"skipped_steps": [2], "final_scale": 2.0**15}
    assert all(torch.equal(bad.states[2][n], bad.states[1][n]) for n in bad.states[1])  # step 2 skipped
    assert any(not torch.equal(bad.states[3][n], bad.states[2][n]) for n in bad.states[2])  # step 3 trained
    assert merged.dtype == torch.float16 and all(torch.isfinite(p).all() for p in merged.parameters())


def test_float16_gradients_that_overflow_at_every_scale_stop_the_run(tok, tmp_path, monkeypatch):
    """Skipping is for the occasional overflow while the scale settles; a gradient that
    overflows step after step is a divergence: stopped after MAX_OVERFLOW_STREAK in a row."""
    from prunelab.recovery import lora

    monkeypatch.setattr(lora, "MAX_OVERFLOW_STREAK", 3)
    rec = quick(max_steps=4, lr=1e-3)
    train, _, _ = rec._tokenize(tok, EXAMPLES, [])
    bad = Corrupt("grad_from", at=2)  # every step from 2 on
    with pytest.raises(
        NonFiniteError, match=r"overflowed at 3 steps in a row \(to step 4/4; loss scale now 8192\)"
    ):
        rec.fit_features(tiny().half(), tok, train, train[:2], tmp_path, hooks=bad.hooks())


class Interrupted(Exception):
    """Stands for a kill (tests/unit/test_train_resume.py kills real processes)."""


class OverflowAt(Recorder):
    """A tracker that makes the gradient through layer 1's MLP inf during step ``at`` (switched
    on when step ``at - 1``'s loss is logged) and interrupts when step ``stop``'s loss is logged."""

    def __init__(self, model, at: int, stop: int | None = None) -> None:
        super().__init__()
        self.at, self.stop, self.on = at, stop, False

        def hook(m, a, out):
            if self.on and out.requires_grad:
                out.register_hook(lambda g: g * float("inf"))

        model.model.layers[1].mlp.register_forward_hook(hook)

    def log(self, data, step=None):
        if "recovery/train_loss" in data:
            if step == self.stop:
                raise Interrupted(step)
            self.on = step + 1 == self.at
        super().log(data, step)


def test_float16_training_resumes_its_loss_scale(tok, tmp_path):
    """A float16 training killed after an overflow step resumes with the halved scale and the
    skipped step on record: the same history and adapter as an uninterrupted run."""
    rec = quick(max_steps=5, lr=1e-3, checkpoint_every=1)
    train, _, _ = rec._tokenize(tok, EXAMPLES, [])
    ref_model = tiny().half()
    ref = rec.fit_features(
        ref_model, tok, train, train[:2], tmp_path / "ref", tracker=OverflowAt(ref_model, 2)
    )
    out = tmp_path / "run"
    first = tiny().half()
    with pytest.raises(Interrupted):  # killed in step 4: the checkpoint of step 3 is kept
        rec.fit_features(first, tok, train, train[:2], out, tracker=OverflowAt(first, 2, stop=4))
    again = tiny().half()
    got = rec.fit_features(again, tok, train, train[:2], out, tracker=OverflowAt(again, 2))
    hist, ref_hist = (json.loads((d / "history.json").read_text()) for d in (out, tmp_path / "ref"))
    assert hist["resumed_at"] == [3]
    assert ref_hist["loss_scaling"] == {"skipped_steps": [2], "final_scale": 2.0**15}
    assert hist["loss_scaling"] == ref_hist["loss_scaling"]
    assert hist["train"] == ref_hist["train"]
    assert all(
        torch.equal(a, b) for a, b in zip(got.state_dict().values(), ref.state_dict().values(), strict=True)
    )


def _atp_run(tmp_path, tok, half: bool, monkeypatch):
    """ATP for 6 steps on a tiny model whose generator step 1 gets an inf gradient (through
    layer 1's MLP, during the generator's LM loss only)."""
    from prunelab.data.sources import load_source_config
    from prunelab.methods import PruneContext
    from prunelab.methods.atp.pruner import JointTraining
    from prunelab.structure import arch_info
    from prunelab.structure.plan import plan_ratio
    from tests.unit.test_atp import ATP_TRAIN, _atp

    model = make_model("llama", 2, layers=4, vocab=2048, max_pos=256, inter=128)
    model = model.half() if half else model
    calls = []

    def hook(m, a, out):
        if calls == [1] and torch.is_grad_enabled() and out.requires_grad:
            out.register_hook(lambda g: g * float("inf"))

    model.model.layers[1].mlp.register_forward_hook(hook)
    real = JointTraining.lm_loss

    def lm_loss(self, peft_model, batches):  # the generator step's loss only
        calls.append(len(calls) + 1)
        try:
            return real(self, peft_model, batches)
        finally:
            calls[:] = [0]  # hooks fire once only (any later call: not 1)

    monkeypatch.setattr(JointTraining, "lm_loss", lm_loss)
    arch = arch_info(model.config)
    method = _atp(train={**ATP_TRAIN, "max_steps": 6, "eval_every": 3})
    plan = plan_ratio(arch, 0.2, ("attn", "mlp"), method.layers(arch.num_layers), 0.05)
    ctx = PruneContext(
        tok,
        None,
        0,
        data_cfg=load_source_config("embedded"),
        out_dir=tmp_path / "t",
        tracker=Recorder(),
        run_dir=tmp_path,
    )
    method.prune(model, plan, ctx)
    return method.history


def test_atp_generator_gradient_inf_is_an_error_in_float32(tmp_path, tok, monkeypatch):
    with pytest.raises(
        NonFiniteError, match=r"atp generator step 1/\d+: the generator's gradient is (inf|nan)"
    ):
        _atp_run(tmp_path, tok, False, monkeypatch)


def test_atp_generator_step_is_loss_scaled_in_float16(tmp_path, tok, monkeypatch):
    """float16: the generator's loss is scaled like the LoRA step's; the overflowing generator
    step 1 is skipped (scale halved) and the run goes on with finite decisions."""
    h = _atp_run(tmp_path, tok, True, monkeypatch)
    assert h["generator_loss_scaling"] == {"skipped_steps": [1], "final_scale": 2.0**15}
    steps = [e for e in h["decisions"] if "lm_loss" in e]  # (the log also holds the freeze event)
    assert len(steps) > 1 and all(math.isfinite(e["lm_loss"]) for e in steps)
    assert all(math.isfinite(v) for e in steps for v in e["kept"].values())
