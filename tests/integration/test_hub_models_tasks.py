"""Every hub model config and every paper zero-shot task loads through the real clients
(transformers / prunelab's loader, lm-eval's TaskManager and ``datasets``), against a local
stand-in of the hub (``tests/hub_standin.py``).

Models: each hub repository a model config names is served as a tiny model of its family
(LLaMA, Mistral, Qwen2; sharded safetensors, a tokenizer, gated like the hub for meta-llama/*),
and prunelab's loading path for ``model=<name>`` must load it and give finite logits. Tasks: the
dataset repositories lm-eval's task configs read (``TASK_REPOS``, in their hub layouts: README
configs, parquet files per split, the columns the tasks' templates use) are served with a few
rows each, and lm-eval must build every task and evaluate a model on it through prunelab's
``evaluate_zeroshot``. What the layouts assume about the live hub is stated in the tables below;
a wrong repository id, config name or split, in a prunelab config or in lm-eval's own task
configs, fails here as it would against the hub.

The clients run in subprocesses: huggingface_hub reads ``HF_ENDPOINT`` at import time.
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

pytestmark = pytest.mark.slow

TOKEN = "hf_standin_token_with_access"  # the one token the stand-in lets through a gate
LOCAL_PREFIXES = ("embedded:", "synthetic:", "packaged:")
ASSETS = Path(__file__).resolve().parents[2] / "src" / "prunelab" / "models" / "assets" / "tiny_llama"

# ------------------------------------------------------------------------------------- models
# The hub repositories of the paper models, each served as a tiny model of its family:
# repo id -> (family, config overrides, dtype of the stored weights, gated).
MODEL_REPOS = {
    "huggyllama/llama-7b": ("llama", {}, "float16", False),
    "meta-llama/Llama-2-7b-hf": ("llama", {}, "float16", True),
    "meta-llama/Meta-Llama-3-8B": (
        "llama",
        {"num_key_value_heads": 2, "rope_theta": 500000.0},
        "bfloat16",
        True,
    ),
    "lmsys/vicuna-7b-v1.5": ("llama", {}, "float16", False),
    "mistralai/Mistral-7B-v0.1": (
        "mistral",
        {"num_key_value_heads": 2, "sliding_window": 4096},
        "bfloat16",
        False,
    ),
    "Qwen/Qwen2-7B": ("qwen2", {"num_key_value_heads": 2}, "bfloat16", False),
    # the families of issue 21 (gated as on the hub: Gemma)
    "Qwen/Qwen3-8B-Base": ("qwen3", {"num_key_value_heads": 2}, "bfloat16", False),
    "allenai/OLMo-2-1124-7B": ("olmo2", {}, "bfloat16", False),
    "google/gemma-2-9b": ("gemma2", {"num_key_value_heads": 2}, "bfloat16", True),
    "google/gemma-3-1b-pt": ("gemma3_text", {"num_key_value_heads": 1}, "bfloat16", True),
    "microsoft/Phi-3-mini-4k-instruct": ("phi3", {}, "bfloat16", False),
}


def hub_model_configs() -> list[str]:
    """The model configs in conf/model that name a hub repository (not embedded/synthetic/packaged)."""
    from omegaconf import OmegaConf

    from prunelab.api import conf_dir

    out = []
    for f in sorted((Path(conf_dir()) / "model").glob("*.yaml")):
        path = str(OmegaConf.load(f).path)
        if not path.startswith(LOCAL_PREFIXES):
            out.append(f.stem)
    return out


HUB_MODELS = hub_model_configs()


def _save_tiny_model(dest: Path, family: str, overrides: dict, dtype: str) -> None:
    import torch
    import transformers

    classes = {
        "llama": "Llama",
        "mistral": "Mistral",
        "qwen2": "Qwen2",
        "qwen3": "Qwen3",
        "olmo2": "Olmo2",
        "gemma2": "Gemma2",
        "gemma3_text": "Gemma3Text",
        "phi3": "Phi3",
    }
    prefix = classes[family]
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix.replace('Text', '')}ForCausalLM")
    rope_theta = overrides.pop("rope_theta", None)
    if rope_theta is not None:  # only where a repo sets its own (the families' defaults otherwise)
        overrides["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    config = config_cls(
        vocab_size=2048,  # the embedded tokenizer's
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=overrides.pop("num_key_value_heads", 4),
        head_dim=8,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,  # the families' own defaults (OLMo-2's 100277, Phi-3's 32000) lie outside the tiny vocabulary
        tie_word_embeddings=False,
        **overrides,
    )
    torch.manual_seed(0)
    model = model_cls(config).to(getattr(torch, dtype))
    # sharded with an index, as the 7B repositories are
    model.save_pretrained(dest, max_shard_size="150KB")
    assert (dest / "model.safetensors.index.json").exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / name, dest / name)


# -------------------------------------------------------------------------------------- tasks
def _readme(configs: dict[str, list[str]]) -> str:
    """A dataset card whose ``configs`` map each config's splits to ``<config>/<split>-*``."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        for split in splits:
            lines += [f"  - split: {split}", f"    path: {name}/{split}-*"]
    return "\n".join([*lines, "---", ""])


def _words(i: int, stem: str) -> str:
    return f"{stem} {['red', 'green', 'blue', 'small', 'large', 'early'][i % 6]} number {i}"


def _boolq(split: str, n: int) -> dict:
    return {
        "question": [_words(i, "is the sky") for i in range(n)],
        "passage": [_words(i, "The sky is a passage about the weather") + "." for i in range(n)],
        "idx": list(range(n)),
        "label": [i % 2 if split != "test" else -1 for i in range(n)],
    }


def _piqa(split: str, n: int) -> dict:
    return {
        "goal": [_words(i, "how to open a jar") for i in range(n)],
        "sol1": [_words(i, "twist the lid") for i in range(n)],
        "sol2": [_words(i, "hit it with a hammer") for i in range(n)],
        "label": [i % 2 if split != "test" else -1 for i in range(n)],
    }


def _hellaswag(split: str, n: int) -> dict:
    return {
        "ind": list(range(n)),
        "activity_label": ["Making a cake"] * n,
        "ctx_a": [_words(i, "A woman mixes flour and eggs in a bowl.") for i in range(n)],
        "ctx_b": ["she"] * n,
        "ctx": [_words(i, "A woman mixes flour and eggs in a bowl. she") for i in range(n)],
        "endings": [
            [_words(i + k, "pours the batter [title] into a pan") for k in range(4)] for i in range(n)
        ],
        "source_id": [f"activitynet~v_{i}" for i in range(n)],
        "split": [split] * n,
        "split_type": ["indomain"] * n,
        "label": [str(i % 4) if split != "test" else "" for i in range(n)],
    }


def _winogrande(split: str, n: int) -> dict:
    return {
        "sentence": [f"Sarah gave the book to Maria because _ had finished it {i}." for i in range(n)],
        "option1": ["Sarah"] * n,
        "option2": ["Maria"] * n,
        "answer": [str(1 + i % 2) if split != "test" else "" for i in range(n)],
    }


def _arc(split: str, n: int) -> dict:
    labels = ["A", "B", "C", "D"]
    return {
        "id": [f"Mercury_{split}_{i}" for i in range(n)],
        "question": [_words(i, "Which of these conducts electricity") + "?" for i in range(n)],
        "choices": [
            {"text": [_words(i + k, "a metal") for k in range(4)], "label": labels} for i in range(n)
        ],
        "answerKey": [labels[i % 4] for i in range(n)],
    }


def _openbookqa(split: str, n: int) -> dict:
    labels = ["A", "B", "C", "D"]
    return {
        "id": [f"{i}-{split}" for i in range(n)],
        "question_stem": [_words(i, "The sun is responsible for") for i in range(n)],
        "choices": [{"text": [_words(i + k, "plants") for k in range(4)], "label": labels} for i in range(n)],
        "answerKey": [labels[i % 4] for i in range(n)],
    }


def _parquet(columns: dict):
    def write(dest: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), dest)

    return write


SPLITS = ("train", "validation", "test")
ROWS = 4
SCRIPT = "import datasets\n\nclass Builder(datasets.GeneratorBasedBuilder):\n    pass\n"

# The dataset repositories lm-eval's paper tasks read, in their hub layouts: (repo id, revision)
# -> {path in the repo: text | writer}. Configs named in a card's YAML, or (no card configs) the
# default config found from ``data/<split>-*`` file names.
TASK_REPOS = {
    ("aps/super_glue", "main"): {
        "README.md": _readme({"boolq": list(SPLITS)}),
        **{f"boolq/{s}-00000-of-00001.parquet": _parquet(_boolq(s, ROWS)) for s in SPLITS},
    },
    ("baber/piqa", "main"): {f"data/{s}-00000-of-00001.parquet": _parquet(_piqa(s, ROWS)) for s in SPLITS},
    ("Rowan/hellaswag", "main"): {
        f"data/{s}-00000-of-00001.parquet": _parquet(_hellaswag(s, ROWS)) for s in SPLITS
    },
    ("allenai/winogrande", "main"): {
        "README.md": _readme({"winogrande_xl": list(SPLITS), "winogrande_debiased": list(SPLITS)}),
        **{
            f"{c}/{s}-00000-of-00001.parquet": _parquet(_winogrande(s, ROWS))
            for c in ("winogrande_xl", "winogrande_debiased")
            for s in SPLITS
        },
    },
    ("allenai/ai2_arc", "main"): {
        "README.md": _readme({"ARC-Challenge": list(SPLITS), "ARC-Easy": list(SPLITS)}),
        **{
            f"{c}/{s}-00000-of-00001.parquet": _parquet(_arc(s, ROWS))
            for c in ("ARC-Challenge", "ARC-Easy")
            for s in SPLITS
        },
    },
    ("allenai/openbookqa", "main"): {
        "README.md": _readme({"main": list(SPLITS)}),
        **{f"main/{s}-00000-of-00001.parquet": _parquet(_openbookqa(s, ROWS)) for s in SPLITS},
    },
    # PIQA's original repository is a loading script, which datasets >= 4 refuses
    ("ybisk/piqa", "main"): {"piqa.py": SCRIPT, "README.md": "---\n---\n"},
}
# task -> (dataset repo, config name, evaluated split), what lm-eval's task configs must read
PAPER_TASK_DATA = {
    "boolq": ("aps/super_glue", "boolq", "validation"),
    "piqa": ("baber/piqa", None, "validation"),
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "openbookqa": ("allenai/openbookqa", "main", "test"),
}


# ------------------------------------------------------------------------------- the stand-in
def write_models_and_tasks(root: Path) -> None:
    """Every hub model config's repository (a tiny model of its family) and the task data."""
    for repo, (family, overrides, dtype, gated) in MODEL_REPOS.items():
        dest = root / "models" / repo / "main"
        _save_tiny_model(dest, family, dict(overrides), dtype)
        if gated:
            (dest / ".gated").write_text("manual")
    for (repo, revision), files in TASK_REPOS.items():
        base = root / "datasets" / repo / revision_dir_name(revision)
        for rel, src in files.items():
            dest = base / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            src(dest) if callable(src) else dest.write_text(src)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    write_models_and_tasks(root)
    with HubStandIn(root, gate_tokens={TOKEN}) as server:
        yield server


def run_client(hub: HubStandIn, home: Path, code: str, *args: str, token: str = "") -> dict:
    """Run ``code`` with the real clients pointed at the stand-in; its last stdout line is JSON."""
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HOME": str(home / "hf_home"),
        "HF_TOKEN": token,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PRUNELAB_CACHE": str(home / "prunelab"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    p = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- models
LOAD_MODELS = """
import json, os, sys, torch
from prunelab.api import compose
from prunelab.models.loading import check_model_config, load_config, load_model
from prunelab.structure.arch import arch_info

torch.set_num_threads(1)
out = {}
token = os.environ.get("HF_TOKEN", "")
for arg in sys.argv[1:]:
    name, *overrides = arg.split(",")
    # HF_TOKEN=<t> among the overrides: the token this case sends (read by huggingface_hub per call)
    os.environ["HF_TOKEN"] = next((o[9:] for o in overrides if o.startswith("HF_TOKEN=")), token)
    overrides = [o for o in overrides if not o.startswith("HF_TOKEN=")]
    try:  # the runner's path: config checks, config.json (the plan), then weights and tokenizer
        cfg = compose([f"model={name}", *overrides])
        check_model_config(cfg.model)
        arch = arch_info(load_config(cfg.model))
        model, tok = load_model(cfg.model, "cpu")
        ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits
        out[arg] = {
            "ok": True,
            "repo": str(cfg.model.path),
            "model_type": arch.model_type,
            "kv_heads": arch.layers[0].num_key_value_heads,
            "class": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "finite": bool(torch.isfinite(logits.float()).all()),
            "shape": list(logits.shape),
        }
    except Exception as e:
        out[arg] = {"ok": False, "type": type(e).__name__, "error": str(e)}
    out[arg]["token_sent"] = bool(os.environ["HF_TOKEN"])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def loaded(hub, tmp_path_factory):
    """Every hub model config loaded once, with a token that has access to the gated ones."""
    return run_client(hub, tmp_path_factory.mktemp("client"), LOAD_MODELS, *HUB_MODELS, token=TOKEN)


def test_every_hub_model_config_has_a_stand_in_repo():
    assert len(HUB_MODELS) >= 6, HUB_MODELS
    from omegaconf import OmegaConf

    from prunelab.api import conf_dir

    for name in HUB_MODELS:
        path = str(OmegaConf.load(Path(conf_dir()) / "model" / f"{name}.yaml").path)
        assert path in MODEL_REPOS, f"model={name}: {path!r} is not a known hub repository"


@pytest.mark.parametrize("name", HUB_MODELS)
def test_hub_model_config_loads_through_prunelab(name, loaded, hub):
    from omegaconf import OmegaConf

    from prunelab.api import conf_dir

    out = loaded[name]
    assert out["ok"], out
    cfg = OmegaConf.load(Path(conf_dir()) / "model" / f"{name}.yaml")
    family, overrides, _, _ = MODEL_REPOS[out["repo"]]
    assert out["model_type"] == family and out["kv_heads"] == overrides.get("num_key_value_heads", 4)
    assert out["dtype"] == cfg.dtype and out["finite"], out
    assert out["shape"][-1] == 2048, out
    # its weights came from the stand-in, every shard of them
    fetched = {p for m, p in hub.requests if m == "GET" and f"/{out['repo']}/resolve/" in p}
    assert any(p.endswith("model.safetensors.index.json") for p in fetched), fetched
    assert sum(p.endswith(".safetensors") for p in fetched) >= 2, fetched


MODEL_FAILURES = {
    "wrong_repo": ("llama_7b", "model.path=huggyllama/llama-7b-typo"),
    "wrong_revision": ("mistral_7b", "model.revision=v9.9"),
    "gated_without_token": ("llama2_7b",),
    "gated_without_access": ("llama3_8b", "HF_TOKEN=hf_a_token_without_access"),
}


@pytest.fixture(scope="module")
def failures(hub, tmp_path_factory):
    """The load path on a wrong id, a wrong revision and a gated repository (no token, or one
    without access)."""
    args = [",".join(v) for v in MODEL_FAILURES.values()]
    out = run_client(hub, tmp_path_factory.mktemp("client"), LOAD_MODELS, *args, token="")
    return {k: out[a] for k, a in zip(MODEL_FAILURES, args, strict=True)}


def _one_paragraph(out: dict) -> str:
    """prunelab's own error (not transformers' OSError chain), one paragraph, with a way out."""
    assert not out["ok"] and out["type"] == "ConfigError", out
    msg = out["error"]
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert "model.path=<" in msg, msg  # or a local copy
    return msg


def test_a_wrong_model_repo_id_fails_naming_it(failures):
    msg = _one_paragraph(failures["wrong_repo"])
    assert msg.startswith("model.path='huggyllama/llama-7b-typo': no such model on the hub"), msg


def test_a_wrong_model_revision_fails_naming_it(failures):
    msg = _one_paragraph(failures["wrong_revision"])
    assert "model.path='mistralai/Mistral-7B-v0.1'" in msg and "model.revision='v9.9'" in msg, msg
    assert "no such revision" in msg, msg


@pytest.mark.parametrize("case", ["gated_without_token", "gated_without_access"])
def test_a_gated_model_without_access_says_how_to_get_it(case, failures):
    repo = {"llama2_7b": "meta-llama/Llama-2-7b-hf", "llama3_8b": "meta-llama/Meta-Llama-3-8B"}[
        MODEL_FAILURES[case][0]
    ]
    out = failures[case]
    assert out["token_sent"] == (case == "gated_without_access"), out
    msg = _one_paragraph(out)
    assert msg.startswith(
        f"model.path='{repo}' is a gated model: request access on https://huggingface.co/{repo}"
    )
    assert "`hf auth login`" in msg and "HF_TOKEN" in msg, msg
    if case == "gated_without_access":  # a token was sent and refused (403): said so
        assert "refused the token" in msg, msg


# -------------------------------------------------------------------------------------- tasks
LOAD_TASKS = """
import json, sys
import torch
from lm_eval.tasks import TaskManager, get_task_dict

torch.set_num_threads(1)
names = sys.argv[1:]
out = {"tasks": {}}
for name, task in get_task_dict(names, TaskManager()).items():
    c = task.config
    split = c.test_split if task.has_test_docs() else c.validation_split
    docs = list(task.eval_docs)
    doc = docs[0]
    out["tasks"][name] = {
        "path": c.dataset_path,
        "name": c.dataset_name,
        "split": split,
        "n": len(docs),
        "text": task.doc_to_text(doc),
        "choices": task.doc_to_choice(doc),
        "target": task.doc_to_target(doc),
    }

# prunelab's zero-shot evaluation of the paper tasks, as eval=paper runs it (limit 2)
from prunelab.api import compose
from prunelab.evaluation.zeroshot import evaluate_zeroshot
from prunelab.models.loading import load_model

model, tok = load_model(compose(["model=tiny_llama"]).model)
out["scores"] = evaluate_zeroshot(model, tok, names, include_defaults=True, limit=2, batch_size=8)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def tasks(hub, tmp_path_factory):
    from prunelab.evaluation.zeroshot import PAPER_TASKS

    return run_client(hub, tmp_path_factory.mktemp("client"), LOAD_TASKS, *PAPER_TASKS)


def test_paper_tasks_are_the_eval_configs_tasks():
    from omegaconf import OmegaConf

    from prunelab.api import conf_dir
    from prunelab.evaluation.zeroshot import PAPER_TASKS

    paper = OmegaConf.load(Path(conf_dir()) / "eval" / "paper.yaml")
    assert set(paper.zeroshot.tasks) <= set(PAPER_TASKS) == set(PAPER_TASK_DATA)


# how each task's first fixture row reads, rendered by lm-eval's own templates
RENDERED = {
    "boolq": "The sky is a passage about the weather red number 0.\nQuestion: is the sky red number 0?",
    "piqa": "Question: how to open a jar red number 0\nAnswer:",
    "hellaswag": "Making a cake: A woman mixes flour and eggs in a bowl. red number 0 She",
    "arc_easy": "Question: Which of these conducts electricity red number 0?\nAnswer:",
    "arc_challenge": "Question: Which of these conducts electricity red number 0?\nAnswer:",
    "openbookqa": "The sun is responsible for red number 0",
}


@pytest.mark.parametrize("task", list(PAPER_TASK_DATA))
def test_lm_eval_builds_each_paper_task_from_the_hub(task, tasks, hub):
    got = tasks["tasks"][task]
    repo, name, split = PAPER_TASK_DATA[task]
    assert (got["path"], got["name"], got["split"]) == (repo, name, split), got
    assert got["n"] == ROWS, got
    assert isinstance(got["choices"], list) and len(got["choices"]) >= 2, got
    if task == "winogrande":  # partial scoring: the choices are the contexts, the target the rest
        assert got["text"] in range(len(got["choices"])) and got["target"].startswith("had finished"), got
    else:  # the fixture's columns went through the task's own templates / process_docs
        assert got["text"].startswith(RENDERED[task]) and got["target"] in range(len(got["choices"])), got
    fetched = [p for m, p in hub.requests if m == "GET" and p.startswith(f"/datasets/{repo}/resolve/")]
    assert any(p.endswith(".parquet") for p in fetched), fetched


def test_prunelab_evaluates_the_paper_tasks_from_the_hub(tasks):
    scores = tasks["scores"]
    for task in PAPER_TASK_DATA:
        assert 0.0 <= scores[task]["acc"] <= 1.0, scores
    assert 0.0 <= scores["average"]["acc"] <= 1.0, scores


WRONG_TASKS = """
import json, sys
from lm_eval.tasks import TaskManager, get_task_dict

out = {}
tm = TaskManager(include_path=sys.argv[1], include_defaults=False)
for name in sys.argv[2:]:
    try:
        task = get_task_dict([name], tm)[name]
        out[name] = {"ok": True, "n": len(list(task.eval_docs))}
    except Exception as e:
        out[name] = {"ok": False, "type": type(e).__name__, "error": str(e)[:500]}
print(json.dumps(out))
"""
# a task that includes one of lm-eval's own, with one field changed: each must fail to load
WRONG_TASK_FIELDS = {
    "arc_easy_as_is": ("arc/arc_easy.yaml", {}),
    "arc_easy_wrong_path": ("arc/arc_easy.yaml", {"dataset_path": "allenai/ai2-arc"}),
    "arc_easy_wrong_name": ("arc/arc_easy.yaml", {"dataset_name": "ARC-Eazy"}),
    "piqa_wrong_split": ("piqa/piqa.yaml", {"validation_split": "dev"}),
    "piqa_script_repo": ("piqa/piqa.yaml", {"dataset_path": "ybisk/piqa"}),
}


def test_a_wrong_task_dataset_fails_to_load(hub, tmp_path):
    import lm_eval

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    include = tmp_path / "tasks"
    include.mkdir()
    for name, (base, fields) in WRONG_TASK_FIELDS.items():
        lines = [f"include: {tasks_dir / base}", f"task: {name}", "tag: []"]
        lines += [f"{k}: {v}" for k, v in fields.items()]
        (include / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    out = run_client(hub, tmp_path, WRONG_TASKS, str(include), *WRONG_TASK_FIELDS)
    assert out["arc_easy_as_is"] == {"ok": True, "n": ROWS}, out  # the unchanged include loads
    for name in WRONG_TASK_FIELDS:
        if name != "arc_easy_as_is":
            assert not out[name]["ok"], (name, out[name])
    assert "allenai/ai2-arc" in out["arc_easy_wrong_path"]["error"], out
    assert "ARC-Eazy" in out["arc_easy_wrong_name"]["error"], out
    assert "piqa.py" in out["piqa_script_repo"]["error"], out


# ------------------------------------------------------------------ every paper table's preflight
# One stand-in with everything a paper table reads: the models above, the task data above and
# the data repositories of tests/integration/test_hub_data.py. Each table's jobs (its sweep's
# model / data / method values) preflight with nothing unresolved and nothing left unchecked.
PAPER_TABLE_JOBS = {
    "llm_pruner_table1": [["recovery=none"], ["recovery=lora"]],
    "loraprune_table": [["method=llm_pruner"], ["method=loraprune_paper"]],
    "lorashear_table1": [["method=wanda"], ["method=loraprune_paper"], ["method=lorashear_paper"]],
    "admm_table": [["method=admm"]],
    "admm_nm": [["method=sparsegpt"]],
    "atp_table": [
        ["method=atp_paper", "data=legal_billsum"],
        ["method=llm_pruner", "data=health_pubmedqa", "model=llama3_8b"],
    ],
}


@pytest.fixture(scope="module")
def full_hub(tmp_path_factory):
    from tests.integration.test_hub_data import write_repos

    root = tmp_path_factory.mktemp("full_hub")
    write_models_and_tasks(root)
    write_repos(root, skip_models=True)  # the models above stand in for every model id
    with HubStandIn(root, gate_tokens={TOKEN}) as server:
        yield server


PREFLIGHT_TABLES = """
import json, sys
from prunelab.api import compose
from prunelab.errors import ConfigError
from prunelab.preflight import _hub_ids, preflight
out = {}
for job in json.loads(sys.argv[1]):
    cfg = compose(job)
    try:
        out[" ".join(job)] = {"ok": True, "notes": preflight(cfg), "ids": [r for _, _, r, _ in _hub_ids(cfg)]}
    except ConfigError as e:
        out[" ".join(job)] = {"ok": False, "error": str(e)}
print(json.dumps(out))
"""


def test_every_paper_table_preflights_against_the_hub(full_hub, tmp_path):
    """`prunelab -m experiment=<table> dry_run=true` with the hub reachable: every id of every
    table's jobs resolves (model, data, eval sets, task data, recovery and method data; the gated
    LLaMA-2 with a token), nothing is left unchecked, and the papers' task ids are the ones
    preflight knows."""
    from prunelab.preflight import PAPER_TASK_DATA as KNOWN

    assert {t: (repo, config) for t, (repo, config, _) in PAPER_TASK_DATA.items()} == KNOWN
    jobs = [
        [f"experiment={table}", *extra, f"output_root={tmp_path}"]
        for table, variants in PAPER_TABLE_JOBS.items()
        for extra in variants
    ]
    out = run_client(full_hub, tmp_path, PREFLIGHT_TABLES, json.dumps(jobs), token=TOKEN)
    for job, res in out.items():
        assert res == {"ok": True, "notes": [], "ids": res.get("ids")}, (job, res)
    ids = {i for res in out.values() for i in res["ids"]}
    assert {"aps/super_glue", "Rowan/hellaswag", "meta-llama/Llama-2-7b-hf", "allenai/c4"} <= ids
    assert "yahma/alpaca-cleaned" in ids and "FiscalNote/billsum" in ids
