"""Every hub data config loads through the real ``datasets`` / ``huggingface_hub`` clients,
against a local stand-in of the hub (``tests/hub_standin.py``) that serves each repository in
its hub layout, built here from the small fixtures in ``tests/fixtures/data``.

The clients run in a subprocess with ``HF_ENDPOINT`` pointing at the stand-in (their endpoint
and offline switches are read at import time). What the layouts assume about the live hub is
stated in ``REPOS``; a wrong id, config name, revision, split, field or file pattern in a data
config fails here as it would against the hub, and so do an un-namespaced id and a
loading-script repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hub_standin import HubStandIn, revision_dir_name

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
pytestmark = pytest.mark.slow

WIKI_README = """---
configs:
- config_name: wikitext-2-raw-v1
  data_files:
  - split: test
    path: wikitext-2-raw-v1/test-*
  - split: train
    path: wikitext-2-raw-v1/train-*
  - split: validation
    path: wikitext-2-raw-v1/validation-*
---
"""
PUBMEDQA_README = """---
configs:
- config_name: pqa_artificial
  data_files:
  - split: train
    path: pqa_artificial/train-*
---
"""
SCRIPT = "import datasets\n\nclass Builder(datasets.GeneratorBasedBuilder):\n    pass\n"


def _parquet(path: Path, columns: dict[str, list]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def _rows(n: int, stem: str) -> list[str]:
    return [
        f"{stem} number {i} , with enough words to make a window of text for the test ." for i in range(n)
    ]


# (repo id, revision) -> {path in the repo: fixture file | callable(dest)}; the layouts are the
# hub repositories' as the configs expect them
REPOS = {
    ("Salesforce/wikitext", "main"): {
        "README.md": WIKI_README,
        "wikitext-2-raw-v1/test-00000-of-00001.parquet": "wikitext2-test-00000-of-00001.parquet",
        "wikitext-2-raw-v1/train-00000-of-00001.parquet": "wikitext2-train-00000-of-00001.parquet",
        "wikitext-2-raw-v1/validation-00000-of-00001.parquet": "wikitext2-test-00000-of-00001.parquet",
    },
    # a loading-script repository: its main branch is refused, its parquet conversion loads
    ("ptb-text-only/ptb_text_only", "main"): {"ptb_text_only.py": SCRIPT, "README.md": "---\n---\n"},
    ("ptb-text-only/ptb_text_only", "refs/convert/parquet"): {
        f"penn_treebank/{s}/0000.parquet": "ptb-validation.parquet" for s in ("train", "validation", "test")
    },
    ("bookcorpus/bookcorpus", "main"): {"bookcorpus.py": SCRIPT, "README.md": "---\n---\n"},
    ("bookcorpus/bookcorpus", "refs/convert/parquet"): {
        "plain_text/train/0000.parquet": "bookcorpus-train.parquet"
    },
    ("allenai/c4", "main"): {
        "en/c4-train.00000-of-01024.json.gz": "c4-validation.00000-of-00008.json.gz",
        "en/c4-validation.00000-of-00008.json.gz": "c4-validation.00000-of-00008.json.gz",
    },
    ("yahma/alpaca-cleaned", "main"): {"alpaca_data_cleaned.json": "alpaca_data_cleaned.json"},
    ("FiscalNote/billsum", "main"): {
        f"data/{s}-00000-of-00001.parquet": lambda d, s=s: _parquet(
            d, {"text": _rows(40, f"bill {s}"), "summary": _rows(40, "summary"), "title": _rows(40, "title")}
        )
        for s in ("train", "test")
    },
    # models: a plain one and a gated one (the stand-in marks a repo gated with a .gated file)
    ("models", "org-a/tiny-llama", "main"): {"config.json": '{"model_type": "llama"}'},
    ("models", "org-b/gated-llama", "main"): {"config.json": '{"model_type": "llama"}', ".gated": "manual"},
    ("qiaojin/PubMedQA", "main"): {
        "README.md": PUBMEDQA_README,
        "pqa_artificial/train-00000-of-00001.parquet": lambda d: _parquet(
            d,
            {
                "pubid": list(range(40)),
                "question": _rows(40, "question"),
                "long_answer": _rows(40, "answer"),
                "final_decision": ["yes"] * 40,
            },
        ),
    },
}


def write_repos(root: Path, skip_models: bool = False) -> None:
    """The repositories of ``REPOS`` under ``root`` in the stand-in's layout (``skip_models``:
    data only, for a stand-in that serves its own models)."""
    for key, files in REPOS.items():
        kind, repo, revision = key if len(key) == 3 else ("datasets", *key)
        if skip_models and kind == "models":
            continue
        base = root / kind / repo / revision_dir_name(revision)
        for rel, src in files.items():
            dest = base / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if callable(src):
                src(dest)
            elif src.endswith((".parquet", ".gz", ".json", ".txt")):
                shutil.copy(FIXTURES / src, dest)
            else:
                dest.write_text(src)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    write_repos(root)
    with HubStandIn(root) as server:
        yield server


def load_in_client(hub: HubStandIn, tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


HUB_DATA = ["wikitext2", "ptb", "c4", "bookcorpus", "alpaca_cleaned", "legal_billsum", "health_pubmedqa"]


@pytest.mark.parametrize("name", HUB_DATA)
def test_hub_data_config_loads_through_the_real_clients(name, hub, tmp_path):
    code = f"""
import json
from prunelab.data.sources import build_source, load_source_config
src = build_source(load_source_config({name!r}))
out = {{}}
for split in src.splits:
    text = src.text(split)
    out[split] = [len(text), text[:60]]
print(json.dumps(out))
"""
    p = load_in_client(hub, tmp_path, code)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out and all(n > 200 for n, _ in out.values()), out  # every split has text


@pytest.mark.parametrize(
    "path,revision,why",
    [
        ("wikitext", "main", "un-namespaced id"),
        ("ptb-text-only/ptb_text_only", "main", "loading script"),
        ("Salesforce/wikitext-typo", "main", "unknown repo"),
        ("Salesforce/wikitext", "refs/convert/parquet", "unknown revision"),
    ],
)
def test_wrong_ids_revisions_and_script_repos_fail(path, revision, why, hub, tmp_path):
    code = f"""
import datasets
datasets.load_dataset({path!r}, 'wikitext-2-raw-v1' if 'wikitext' in {path!r} else None, split='test', revision={revision!r})
"""
    p = load_in_client(hub, tmp_path, code)
    assert p.returncode != 0, f"{why}: loaded although the hub would refuse it"


def test_unnamespaced_data_path_is_refused_before_loading():
    from prunelab.data.sources import HubText
    from prunelab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.path='wikitext' must be a namespaced hub dataset id"):
        HubText("wikitext2", "wikitext", "wikitext-2-raw-v1")


def test_only_the_requested_shard_is_downloaded(hub, tmp_path):
    """C4's validation split alone: its train shard (hundreds of MB on the hub) is not fetched."""
    before = len(hub.requests)
    code = """
from prunelab.data.sources import build_source, load_source_config
print(len(build_source(load_source_config('c4')).text('validation')))
"""
    p = load_in_client(hub, tmp_path, code)
    assert p.returncode == 0, p.stderr[-3000:]
    fetched = [path for method, path in hub.requests[before:] if "/resolve/" in path and method == "GET"]
    assert any("c4-validation" in f for f in fetched), fetched
    assert not any("c4-train" in f for f in fetched), fetched


PREFLIGHT = """
import json, sys
from prunelab.api import compose
from prunelab.errors import ConfigError
from prunelab.preflight import preflight
try:
    print(json.dumps({"ok": True, "notes": preflight(compose(sys.argv[1:]))}))
except ConfigError as e:
    print(json.dumps({"ok": False, "error": str(e)}))
"""


def preflight_in_client(hub, tmp_path, *overrides):
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_TOKEN": "",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    cmd = [sys.executable, "-c", PREFLIGHT, f"output_root={tmp_path}", *overrides]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_preflight_resolves_every_hub_id_of_a_paper_setup(hub, tmp_path):
    out = preflight_in_client(
        hub,
        tmp_path,
        "model=llama_7b",
        "model.path=org-a/tiny-llama",
        "data=wikitext2",
        "recovery=lora",
        "recovery.data=alpaca_cleaned",
        "eval.perplexity.datasets=[wikitext2:test,ptb:test]",
    )
    assert out == {"ok": True, "notes": []}, out


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["model.path=org-a/tiny-lama"], "model.path='org-a/tiny-lama': no such model on the hub"),
        (
            ["model.path=org-b/gated-llama"],
            "is a gated model: request access on https://huggingface.co/org-b/gated-llama",
        ),
        (["data=ptb", "data.revision=main"], "a loading-script dataset (ptb_text_only.py)"),
        (
            ["data=wikitext2", "data.path=Salesforce/wikitxt"],
            "data='Salesforce/wikitxt' at revision 'main': no such dataset on the hub",
        ),
        (["data=wikitext2", "data.revision=v9"], "has no such revision"),
    ],
)
def test_preflight_names_the_hub_problem_before_anything_loads(overrides, expected, hub, tmp_path):
    out = preflight_in_client(hub, tmp_path, "model=llama_7b", "model.path=org-a/tiny-llama", *overrides)
    assert not out["ok"] and expected in out["error"], out
    assert not any("/resolve/" in path and path.endswith(".parquet") for _, path in hub.requests[-20:])
