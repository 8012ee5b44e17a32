"""Hub models through the real clients, against the local hub stand-in (``tests/hub_standin.py``).

- A model that cannot be had (an unknown id or revision, a gated repository without access,
  offline and not in the local cache) fails in one paragraph that names ``model.path`` and
  says what to do, ``model.path=<local folder>`` among it, before anything large downloads.
- The dense-eval cache keys on the commit sha the revision resolves to, not on the branch
  name: when the hub repository moves, the dense model is evaluated again.

The clients run in subprocesses: ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are read at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_model
from tests.hub_standin import HubStandIn, tree_sha

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"
TINY = "org-a/tiny-llama"
GATED = "org-b/gated-llama"
# the stand-in refuses a gated repository's files only where it can check tokens


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A tiny LLaMA (safetensors, config, tokenizer) at org-a/tiny-llama and a gated repository."""
    from transformers import AutoTokenizer

    from prunelab.models.embedded import asset_dir

    root = tmp_path_factory.mktemp("hub")
    repo = root / "models" / TINY / "main"
    tok = AutoTokenizer.from_pretrained(asset_dir("tiny_llama"))
    model = make_model("llama", kv=2, heads=4, layers=4, hidden=32, inter=48)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(repo)
    tok.save_pretrained(repo)
    gated = root / "models" / GATED / "main"
    gated.mkdir(parents=True)
    (gated / "config.json").write_text('{"model_type": "llama"}')
    (gated / ".gated").write_text("manual")
    with HubStandIn(root, gate_tokens={"hf_granted"}) as server:
        yield server


def in_client(code: str, home: Path, *args: str, endpoint: str | None = None) -> dict:
    """Run ``code`` with the real clients (online against ``endpoint``, else offline); its last
    stdout line is JSON."""
    env = {
        **os.environ,
        "HF_HOME": str(home),
        "HF_TOKEN": "",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0" if endpoint else "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    p = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


LOAD = """
import json, logging, sys, time
from prunelab.api import compose
from prunelab.errors import ConfigError
from prunelab.models.loading import load_config, load_model

warnings = []
logging.getLogger("prunelab").addHandler(type("H", (logging.Handler,), {"emit": lambda s, r: warnings.append(r.getMessage())})())
out = {}
for case in json.loads(sys.argv[1]):
    cfg = compose(case["overrides"]).model
    t = time.perf_counter()
    try:
        (load_model if case["load"] == "model" else load_config)(cfg)
        out[case["name"]] = {"ok": True}
    except ConfigError as e:
        out[case["name"]] = {"ok": False, "error": str(e), "s": time.perf_counter() - t}
if len(sys.argv) > 2:
    from prunelab.runner import model_fingerprint
    out["fingerprint"] = model_fingerprint(compose(["model=llama_7b"]).model)
out["warnings"] = warnings
print(json.dumps(out))
"""


def _load(hub: HubStandIn | None, home: Path, cases: list[dict], *extra: str) -> dict:
    return in_client(LOAD, home, json.dumps(cases), *extra, endpoint=hub.endpoint if hub else None)


def _one_paragraph(msg: str) -> None:
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert "model.path=<local folder>" in msg, msg


def test_an_unknown_model_id_or_revision_fails_in_one_paragraph(hub, tmp_path):
    out = _load(
        hub,
        tmp_path / "hf",
        [
            {"name": "id", "load": "config", "overrides": ["model=llama_7b", "model.path=org-a/tiny-lama"]},
            {
                "name": "id_model",
                "load": "model",
                "overrides": ["model=llama_7b", "model.path=org-a/tiny-lama"],
            },
            {
                "name": "revision",
                "load": "config",
                "overrides": ["model=llama_7b", f"model.path={TINY}", "model.revision=v9"],
            },
            {
                "name": "found",
                "load": "model",
                "overrides": ["model=llama_7b", f"model.path={TINY}", "model.dtype=float32"],
            },
        ],
    )
    assert out["found"] == {"ok": True}, out
    for name in ("id", "id_model", "revision"):
        assert not out[name]["ok"], out
        _one_paragraph(out[name]["error"])
        assert out[name]["s"] < 10, out  # no retries, no download
    assert out["id"]["error"].startswith("model.path='org-a/tiny-lama': no such model on the hub"), out
    assert out["id_model"]["error"] == out["id"]["error"]
    assert out["revision"]["error"].startswith(
        f"model.path='{TINY}' (model.revision='v9'): the model repository has no such revision"
    ), out
    assert "model.revision=<sha>" in out["revision"]["error"]


def test_a_gated_model_without_access_says_how_to_get_it(hub, tmp_path):
    out = _load(
        hub, tmp_path / "hf", [{"name": "gated", "load": "config", "overrides": [f"model.path={GATED}"]}]
    )
    msg = out["gated"]["error"]
    _one_paragraph(msg.replace("model.path=<folder>", "model.path=<local folder>"))
    assert msg.startswith(
        f"model.path='{GATED}' is a gated model: request access on https://huggingface.co/{GATED}"
    )
    assert "`hf auth login`" in msg and "HF_TOKEN" in msg


def test_offline_without_a_cached_copy_fails_fast_naming_the_repo(tmp_path):
    """model=llama_7b offline on a machine that never downloaded it: one paragraph, in seconds,
    and its fingerprint falls back to the branch name with a warning."""
    cases = [
        {"name": "config", "load": "config", "overrides": ["model=llama_7b"]},
        {"name": "model", "load": "model", "overrides": ["model=llama_7b"]},
    ]
    out = _load(None, tmp_path / "hf", cases, "fingerprint")
    for name in ("config", "model"):
        msg = out[name]["error"]
        _one_paragraph(msg)
        assert msg.startswith("model.path='huggyllama/llama-7b': offline (HF_HUB_OFFLINE=1)"), msg
        assert out[name]["s"] < 10, out
    assert out["fingerprint"] == "huggyllama/llama-7b@None"
    assert any(
        "cached under the branch name" in w and "model.revision=<commit sha>" in w for w in out["warnings"]
    )


DENSE = """
import json, os, sys
from pathlib import Path
from prunelab.api import compose
from prunelab.models.loading import hub_commit
from prunelab.runner import dense_eval, model_fingerprint, start

tmp, repo, wiki = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
cfg = compose([
    "model=llama_7b", "model.path=org-a/tiny-llama", "model.dtype=float32", "data=wikitext2",
    f"data.local_files={{train: {wiki['train']}, test: {wiki['test']}}}", "eval=paper",
    "eval.perplexity.datasets=[wikitext2:test]", "eval.perplexity.seq_len=32",
    "eval.perplexity.max_windows=4", "eval.zeroshot.tasks=[]", "eval.cost.enabled=false",
    "logger=none", f"output_root={tmp}", f"cache_dir={tmp / 'cache'}", "device=cpu",
    "method=magnitude", "ratio=0.5", "recovery=none",
])
runs = []
for name in ("first", "again", "moved"):
    if name == "moved":  # a new commit on the hub's main branch
        (repo / "README.md").write_text("a new commit\\n")
        hub_commit.cache_clear()  # a new process would ask the hub again
    job = start(cfg, tmp / name)
    dense_eval(job)
    runs.append({"weights": model_fingerprint(cfg.model), "cached": "dense_eval" in job.resumed})
print(json.dumps({"runs": runs, "cache": sorted(os.listdir(tmp / "cache" / "dense"))}))
"""


def test_dense_eval_cache_keys_on_the_resolved_commit(hub, tmp_path):
    repo = hub.root / "models" / TINY / "main"
    before = tree_sha(repo)
    wiki = {
        "train": str(FIXTURES / "wikitext2-train-00000-of-00001.parquet"),
        "test": str(FIXTURES / "wikitext2-test-00000-of-00001.parquet"),
    }
    home = tmp_path / "hf"
    try:
        out = in_client(DENSE, home, str(tmp_path), str(repo), json.dumps(wiki), endpoint=hub.endpoint)
        after = tree_sha(repo)
    finally:
        (repo / "README.md").unlink(missing_ok=True)
    assert before != after
    first, again, moved = out["runs"]
    assert first == {"weights": f"{TINY}@{before}", "cached": False}, out
    assert again == {"weights": f"{TINY}@{before}", "cached": True}, out  # same commit: served from the cache
    assert moved == {"weights": f"{TINY}@{after}", "cached": False}, out  # the branch moved: evaluated again
    assert len(out["cache"]) == 2, out

    # offline, the commit is the one the local cache recorded (what from_pretrained would load offline)
    code = "import json; from omegaconf import OmegaConf; from prunelab.runner import model_fingerprint; "
    code += f"print(json.dumps(model_fingerprint(OmegaConf.create({{'path': '{TINY}', 'revision': None}}))))"
    assert in_client(code, home) == f"{TINY}@{after}"


def test_a_pinned_commit_is_its_own_fingerprint():
    from omegaconf import OmegaConf

    from prunelab.runner import model_fingerprint

    sha = "0123456789abcdef0123456789abcdef01234567"
    assert model_fingerprint(OmegaConf.create({"path": "org/model", "revision": sha})) == f"org/model@{sha}"


def test_hub_eval_texts_fingerprint_by_commit_and_local_or_embedded_texts_do_not(tmp_path, monkeypatch):
    """The dense cache's data part: each hub eval text at its commit (offline and never fetched:
    its revision), a pinned sha as is; texts read from local files or the embedded corpus add
    nothing (so cache keys made before this existed stay valid)."""
    from prunelab.api import compose
    from prunelab.runner import data_fingerprints

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    cfg = compose(["model=llama_7b", "eval=paper", "data=wikitext2", f"data.revision={sha}"])
    assert data_fingerprints(cfg) == {
        "wikitext2": f"Salesforce/wikitext@{sha}",  # the run's own data node, pinned
        "ptb": "ptb-text-only/ptb_text_only@refs/convert/parquet",
    }
    local = str(FIXTURES / "wikitext2-test-00000-of-00001.parquet")
    cfg = compose(["model=llama_7b", "eval=paper", "data=wikitext2", f"data.local_files={{test: {local}}}"])
    assert set(data_fingerprints(cfg)) == {"ptb"}
    assert data_fingerprints(compose([])) == {}  # the embedded corpus
