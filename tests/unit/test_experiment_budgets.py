"""experiments/embedded_results.py's budgets: a row's overrides on the real model keep the
tables' equal-tokens protocol (the row's own recovery never outgrows its method's)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from prunelab.api import compose

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "embedded_results.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("embedded_results", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(script, table: str) -> dict[str, list[str]]:
    return {label: overrides for label, overrides, _ in script.TABLES[table]}


def _recovery_steps(overrides: list[str]) -> list[int]:
    return [int(s.max_steps) for s in compose(overrides).method.recovery.stages]


@pytest.mark.parametrize("model", ["tiny_llama", "smollm2_135m"])
def test_lorashear_text_only_row_trains_as_many_steps_as_lorashear(script, model):
    rows = _rows(script, "lorashear")
    full = script.with_budget([f"model={model}", *rows["LoRAShear"]])
    text = script.with_budget([f"model={model}", *rows["LoRAShear, text-only recovery"]])
    assert _recovery_steps(text) == [sum(_recovery_steps(full))]  # one text stage, same steps
    # and otherwise the same job: the method's budget variant, the model's eval
    assert [o for o in text if not o.startswith("method.recovery")] == full


def test_real_model_rows_get_the_budget_variants_and_the_forced_recovery(script):
    got = script.with_budget(["model=smollm2_135m", "method=loraprune", "method.importance=taylor"])
    assert "method=loraprune_smollm2" in got and "eval=smollm2" in got
    row = dict(o.split("=", 1) for o in _rows(script, "llm_pruner")["element1 + LoRA (instruction format)"])
    got = dict(
        o.split("=", 1)
        for o in script.with_budget(["model=smollm2_135m", *[f"{k}={v}" for k, v in row.items()]])
    )
    assert (got["recovery"], got["recovery.max_steps"], got["recovery.batch_size"]) == ("lora", "40", "8")
    # the embedded model runs the row as written
    assert script.with_budget(["model=tiny_llama", "method=loraprune"]) == [
        "model=tiny_llama",
        "method=loraprune",
    ]


def test_seeded_jobs_keep_old_run_directories_and_add_the_other_seeds(script):
    assert compose([]).seed == script.DEFAULT_SEED
    base = ["model=m", "method=llm_pruner"]
    assert script.seeded_jobs(base, False, None) == [base]  # the row as it always ran
    assert script.seeded_jobs(base, False, [0, 1, 2]) == [base, [*base, "seed=1"], [*base, "seed=2"]]
    # random rows have always named every seed, the default one included
    assert script.seeded_jobs(base, True, None) == [[*base, f"seed={s}"] for s in (0, 1, 2)]
