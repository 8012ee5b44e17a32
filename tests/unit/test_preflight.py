"""Preflight (prunelab.preflight): device, writable folders, and — offline — what it says it
could not check. The hub checks run against the local hub stand-in in
tests/integration/test_hub_data.py."""

from __future__ import annotations

import pytest
import torch

from prunelab.api import compose
from prunelab.errors import ConfigError
from prunelab.preflight import check_device, check_writable, preflight


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_on_a_machine_without_one_is_refused_with_what_to_use():
    for name in ("cuda", "cuda:7"):
        msg = check_device(name)
        assert msg and msg.startswith(f"device={name!r}: no CUDA device here") and "device=cpu" in msg


def test_cpu_and_auto_always_pass():
    assert check_device("cpu") is None and check_device("auto") is None


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is present")
def test_mps_off_a_mac_is_refused():
    assert "MPS backend is not available" in check_device("mps")


def test_output_folder_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    msg = check_writable("output_root", blocker / "runs")
    assert msg and msg.startswith("output_root=") and "is not a folder" in msg
    assert check_writable("output_root", tmp_path / "new" / "runs") is None
    assert not (tmp_path / "new").exists()  # nothing is created by checking


def test_dry_run_offline_says_which_hub_ids_it_could_not_check(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose(
        [
            "model=llama_7b",
            "data=wikitext2",
            "recovery=lora",
            "recovery.data=alpaca_cleaned",
            f"output_root={tmp_path}",
        ]
    )
    notes = preflight(cfg)
    assert len(notes) == 1 and "not checked" in notes[0]
    for needle in (
        "model.path='huggyllama/llama-7b'",
        "data='Salesforce/wikitext'",
        "recovery.data='yahma/alpaca-cleaned'",
    ):
        assert needle in notes[0], notes[0]


def test_preflight_problems_are_raised_together(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    blocker = tmp_path / "f"
    blocker.write_text("x")
    overrides = [f"output_root={blocker}/out", f"cache_dir={blocker}/cache"]
    if not torch.cuda.is_available():
        overrides.append("device=cuda:3")
    with pytest.raises(ConfigError) as e:
        preflight(compose(overrides))
    text = str(e.value)
    assert text.startswith("preflight:") and "output_root=" in text and "cache_dir=" in text
    if not torch.cuda.is_available():
        assert "device='cuda:3'" in text


def test_paper_task_data_is_listed_and_other_lm_eval_tasks_are_named_as_unchecked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose(
        [
            "model=llama_7b",
            "eval=paper",
            "eval.zeroshot.tasks=[boolq,hellaswag,rte]",
            f"output_root={tmp_path}",
        ]
    )
    notes = preflight(cfg)
    assert "eval.zeroshot.tasks (boolq)='aps/super_glue'" in notes[0]
    assert "eval.zeroshot.tasks (hellaswag)='Rowan/hellaswag'" in notes[0]
    assert notes[1] == "the hub data of lm-eval tasks rte (lm-eval resolves it when the evaluation runs)"
