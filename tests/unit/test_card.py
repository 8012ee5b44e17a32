"""Model cards in every saved checkpoint, and push_to_hub against the local hub stand-in."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

import prunelab.cli  # noqa: F401  (registers the run-dir resolver)
from prunelab.errors import ConfigError
from prunelab.paths import conf_dir
from prunelab.runner import run, validate
from tests.hub_standin import HubStandIn, tree_sha


def _cfg(tmp_path, *extra):
    overrides = ["debug=fast", "logger=none", f"output_root={tmp_path}", "ratio=0.2", *extra]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One whole run (prune + LoRA recovery) on the embedded model, with its cards."""
    tmp = tmp_path_factory.mktemp("card")
    return run(_cfg(tmp), tmp / "run"), tmp / "run"


def test_every_checkpoint_gets_a_card_with_the_runs_numbers(finished):
    from huggingface_hub import ModelCard

    results, root = finished
    for stage, folder in (("pruned", root / "pruned"), ("recovered", root / "recovered" / "model")):
        card = ModelCard.load(folder / "README.md")
        assert {"prunelab", "llm_pruner"} <= set(card.data.tags)
        assert ("lora-recovered" in card.data.tags) == (stage == "recovered")
        text = card.text
        r = results["ratio"]
        assert f"{r['params_before']:,} → {r['params_after']:,}" in text
        assert f"achieved {r['achieved']:.4f}" in text
        # the perplexity row: dense, pruned, recovered, each as results.json has it
        row = next(line for line in text.splitlines() if line.startswith("| perplexity `embedded`"))
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        expected = [results[s]["perplexity"]["embedded"] for s in ("dense", "pruned", "recovered")]
        assert cells == [f"{v:.2f}" for v in expected]
        assert "128-token windows" in text and "method:" in text and "name: llm_pruner" in text
        # per-layer shapes saved padded (the default): the card loads it with plain transformers
        assert 'AutoModelForCausalLM.from_pretrained("<this folder or repo>")' in text
        assert "trust_remote_code" not in text and "zero-padded" in text
    # the command that made it: the run's own overrides (composed here without the CLI)
    assert "recovery: LoRA" in (root / "recovered" / "model" / "README.md").read_text()


def test_cards_do_not_change_a_finished_runs_resume(finished, tmp_path):
    results, root = finished
    again = run(_cfg(root.parent), root)
    assert again["resumed_stages"] == ["dense_eval", "prune", "eval", "recover", "eval_recovered"]
    assert again["recovered"] == results["recovered"]


@pytest.mark.parametrize("bad", ["noslash", "a/b/c", "me/-leading-dash", 3])
def test_push_to_hub_must_be_a_repo_id(bad, tmp_path):
    # a number is refused by the type check (prunelab.config_types), a string by its repo-id check
    allowed = r"a string or null" if bad == 3 else r"null \(never push\) or a hub repo id"
    with pytest.raises(ConfigError, match=r"push_to_hub=.*allowed: " + allowed):
        validate(_cfg(tmp_path, f"push_to_hub={bad}"), with_plan=False)


def test_push_refused_offline_before_anything_loads(tmp_path, monkeypatch):
    from prunelab.preflight import preflight

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"push_to_hub='me/pruned' needs the hub, but HF_HUB_OFFLINE=1"):
        preflight(_cfg(tmp_path, "push_to_hub=me/pruned"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no_token_here"))
    with pytest.raises(ConfigError, match=r"needs a hub token with write access"):
        preflight(_cfg(tmp_path, "push_to_hub=me/pruned"))


def test_push_uploads_the_final_model_and_its_card(finished, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    from prunelab.card import push

    _, root = finished
    folder = root / "recovered" / "model"
    with HubStandIn(tmp_path / "hub") as hub:
        monkeypatch.setattr(hc, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        url = push(folder, "me/tiny-pruned", private=True)
        assert hub.created == [("models", "me/tiny-pruned", True)]
        pushed = tmp_path / "hub" / "models" / "me" / "tiny-pruned" / "main"
        sent = {p.name for p in folder.iterdir() if p.is_file()}
        assert {p.name for p in pushed.iterdir()} == sent and "README.md" in sent
        for name in sent:  # byte-identical
            assert (pushed / name).read_bytes() == (folder / name).read_bytes()
        assert url.endswith(tree_sha(pushed))  # the commit the stand-in made of those files


def test_runner_pushes_when_asked_and_records_where(finished, tmp_path, monkeypatch):
    """push_to_hub through the runner: a rerun of the finished run (every stage resumed, the
    option does not change the run's identity) uploads the recovered model and records the commit."""
    import json

    import huggingface_hub.constants as hc

    _, root = finished
    with HubStandIn(tmp_path / "hub") as hub:
        monkeypatch.setattr(hc, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        out = run(_cfg(root.parent, "push_to_hub=me/tiny-run", "push_private=false"), root)
        assert out["resumed_stages"] == ["dense_eval", "prune", "eval", "recover", "eval_recovered"]
        assert hub.created == [("models", "me/tiny-run", False)]
    pushed = tmp_path / "hub" / "models" / "me" / "tiny-run" / "main"
    assert (pushed / "README.md").read_bytes() == (root / "recovered" / "model" / "README.md").read_bytes()
    saved = json.loads((root / "results.json").read_text())
    assert saved["pushed"] == out["pushed"] and saved["pushed"].endswith(tree_sha(pushed))
