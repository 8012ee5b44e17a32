"""Every config composes; every bad input is refused with the key, the value and what is
allowed, before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import open_dict

import prunelab.cli  # noqa: F401  (registers the run_dir_name resolver)
from prunelab.errors import ConfigError
from prunelab.models import loading
from prunelab.paths import conf_dir
from prunelab.runner import run, validate

GROUPS = ["model", "method", "data", "recovery", "eval", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_composes(group, option):
    cfg = compose_cfg(f"{group}={option}")
    assert cfg[group].name == option
    from omegaconf import OmegaConf

    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_group_options_are_complete():
    assert {
        "tiny_llama",
        "tiny_llama_gqa",
        "llama_7b",
        "llama2_7b",
        "llama3_8b",
        "vicuna_7b",
        "mistral_7b",
        "qwen2_7b",
    } <= set(options("model"))
    assert {"embedded", "wikitext2", "ptb", "c4", "bookcorpus", "alpaca_cleaned"} <= set(options("data"))
    assert {"embedded", "paper"} <= set(options("eval"))


def test_unknown_group_option_lists_available():
    with pytest.raises(
        MissingConfigException, match=r"(?s)method/llm_prunr.*Available options in 'method'.*structured"
    ):
        compose_cfg("method=llm_prunr")
    with pytest.raises(MissingConfigException, match=r"(?s)Available options in 'model'.*tiny_llama"):
        compose_cfg("model=tiny_lama")
    with pytest.raises(MissingConfigException, match=r"(?s)Available options in 'data'.*wikitext2"):
        compose_cfg("data=wikitext")


def test_unknown_key_is_refused():
    with pytest.raises(ConfigCompositionException, match=r"method\.importanc"):
        compose_cfg("method.importanc=random")


def test_appended_unknown_method_key_is_refused():
    cfg = compose_cfg("method=structured", "+method.importanc=random")
    with pytest.raises(
        ConfigError, match=r"method\.importanc is not a key of method=structured; allowed: .*importance"
    ):
        validate(cfg)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to load weights fails the test loudly."""

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(loading, "load_model", boom)
    monkeypatch.setattr(loading, "load_pretrained", boom)


BAD = [
    (["ratio=1.5"], r"ratio=1\.5 is outside the allowed range \(0, 1\)"),
    (["ratio=0"], r"ratio=0 is outside the allowed range \(0, 1\)"),
    (
        ["method=structured", "method.importance=magnitud"],
        r"method\.importance='magnitud' is not allowed; did you mean 'magnitude'\? allowed: magnitude, random",
    ),
    (
        ["method.importance=element3"],
        r"method\.importance='element3' is not allowed; did you mean 'element.'\? allowed: element1, element2, second",
    ),
    (["recovery.lr=0"], r"recovery\.lr"),
    (["recovery.data=wikitxt"], r"recovery\.data.*wikitxt"),
    (["method.targets=[attn,heads]"], r"method\.targets=\['attn', 'heads'\] is not allowed; allowed:"),
    (
        ["method.aggregation=median"],
        r"method\.aggregation=.median. is not allowed.*allowed: sum, mean, max, prod, first, last",
    ),
    (
        ["data=wikitext2", "data.local_files={train: /nonexistent/wiki.parquet}"],
        r"data\.local_files\.train='/nonexistent/wiki\.parquet'",
    ),
    (["eval.zeroshot.tasks=[prunelab_endin]"], r"eval\.zeroshot\.tasks.*prunelab_endin.*prunelab_ending"),
    (["eval.perplexity.datasets=[wikitxt:test]"], r"wikitxt.*did you mean 'wikitext2'"),
    (
        ["model.path=embedded:tiny_lama"],
        r"model\.path='embedded:tiny_lama' is not allowed.*embedded:tiny_llama",
    ),
    (["model.path=/nonexistent/model"], r"model\.path='/nonexistent/model' does not exist"),
    (["model.dtype=fp8"], r"model\.dtype='fp8' is not allowed; allowed: float32, float16, bfloat16"),
    # security: never coerced — bool("no") is True, and it decides whether a folder's code runs
    (
        ["model.trust_remote_code=no"],
        r"model\.trust_remote_code='no' \(str\) is not allowed; allowed: true or false",
    ),
    (["model.trust_remote_code='false'"], r"model\.trust_remote_code='false' \(str\) is not allowed"),
    (["model.trust_remote_code=1"], r"model\.trust_remote_code=1 \(int\) is not allowed"),
    (["device=tpu"], r"device='tpu' is not allowed"),
    (["checkpoint_layout=padd"], r"checkpoint_layout='padd' is not allowed.*padded.*compact"),
    # the layer-wise family's sparsity patterns
    (
        ["method=llm_pruner", "+method.sparsity_pattern=2:4"],
        r"method\.sparsity_pattern applies to the layer-wise methods.*method=llm_pruner removes whole structures",
    ),
    (["method=wanda", "method.sparsity_pattern=4:4"], r"sparsity_pattern='4:4'.*N must be smaller than M"),
    (
        ["method=sparsegpt", "method.activations=ssd"],
        r"method\.activations='ssd'.*allowed.*auto, memory, disk",
    ),
    (
        ["method=admm", "method.activation_budget_mb=-1"],
        r"method\.activation_budget_mb=-1 is out of range; allowed: ≥ 0",
    ),
    (
        ["model=synthetic_110m", "model.path=synthetic:llama_1t"],
        r"model\.path='synthetic:llama_1t'.*allowed.*synthetic:llama_110m",
    ),
    (["method=admm", "method.sparsity_pattern=6:4"], r"sparsity_pattern='6:4'.*N must be smaller than M"),
    (["method=admm", "method.sparsity_pattern=2to4"], r"sparsity_pattern='2to4' is not allowed.*N:M"),
    (
        ["method=sparsegpt", "method.sparsity_pattern=2:4", "ratio=0.6"],
        r"ratio=0\.6 contradicts method\.sparsity_pattern=2:4.*sparsity 0\.5; use ratio=0\.5",
    ),
    (
        ["method=magnitude", "method.sparsity_pattern=1:4", "ratio=0.5"],
        r"ratio=0\.5 contradicts method\.sparsity_pattern=1:4.*use ratio=0\.75",
    ),
    (["method=wanda", "method.scope=column"], r"method\.scope='column' is not allowed.*layer, row"),
    (["method.vector=rows"], r"method\.vector=.rows. is not allowed"),
    (["method=admm", "method.schedule=linear"], r"method\.schedule='linear' is not allowed.*cubic, none"),
    (["method=admm", "method.mask_iterations=30"], r"mask_iterations=30 exceeds method\.iterations=20"),
    (["method=sparsegpt", "method.damping=0"], r"method\.damping=0 must be > 0"),
    (
        ["method=wanda", "method.modules=[q_proj,lm_head]"],
        r"method\.modules: 'lm_head' is not a linear layer.*allowed: all",
    ),
    (["method=wanda", "ratio=1.0"], r"ratio=1\.0 is outside the allowed range"),
    (
        ["method=structured", "eval.semi_structured=true"],
        r"eval\.semi_structured=true needs 2:4 sparsity from a layer-wise method",
    ),
    (
        ["method=wanda", "ratio=0.5", "eval.semi_structured=true"],
        r"eval\.semi_structured=true needs 2:4.*sparsity_pattern=unstructured",
    ),
    # the papers' protocols
    (["ratio_convention=per-layer"], r"ratio_convention='per-layer' is not allowed; allowed: null or params"),
    (
        ["method=wanda", "ratio_convention=linear"],
        r"ratio_convention='linear' does not apply to method=wanda",
    ),
    (["eval.perplexity.joiner={wikitext2: x}"], r"eval\.perplexity\.joiner names \['wikitext2'\]"),
    (["eval.zeroshot.metric={boolq: acc_norm}"], r"eval\.zeroshot\.metric names \['boolq'\]"),
    # model.device_map / max_memory / offload_folder (models/placement.py)
    (
        ["model.device_map=everywhere"],
        r"model\.device_map='everywhere' is not allowed; allowed: null, auto, balanced",
    ),
    (
        ["model.device_map=3"],
        r"model\.device_map=3 \(int\) is not allowed; allowed: a string or a mapping or null",
    ),
    (
        ["model.device_map={model: tpu, lm_head: cpu}"],
        r"model\.device_map\.model='tpu' is not allowed; allowed: cpu, disk, a GPU index",
    ),
    (
        ["model.device_map={model: 0, lm_head: cpu}"],
        r"model\.device_map\.model names GPU 0 but this machine has no CUDA device",
    ),
    (
        ["model.device_map={model: cpu}", "method=wanda", "recovery=none"],
        r"model\.device_map does not place the whole model.*lm_head",
    ),
    (
        ["model.device_map={model: cpu, lm_hed: cpu}", "method=wanda", "recovery=none"],
        r"model\.device_map\.lm_hed is not a module of this model",
    ),
    (
        ["model.device_map=auto", "model.max_memory={cpu: lots}"],
        r"model\.max_memory\.cpu='lots' is not allowed; allowed: a size",
    ),
    (
        ["model.device_map=auto", "model.max_memory={disk: 1GiB}"],
        r"model\.max_memory: device 'disk' is not allowed",
    ),
    (["model.max_memory={cpu: 1GiB}"], r"model\.max_memory=.* is set but model\.device_map is null"),
    (
        ["model.device_map=auto", "device=cpu"],
        r"device='cpu' together with model\.device_map='auto'.*allowed: device=auto",
    ),
    (
        ["model.device_map=auto", "model.offload_folder=/etc/passwd/offload"],
        r"model\.offload_folder='/etc/passwd/offload' is below '/etc/passwd', which is not a folder.*allowed: a folder",
    ),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_refused_before_model_loads(overrides, message, no_model_loads, tmp_path):
    cfg = compose_cfg(*overrides, "logger=none", f"output_root={tmp_path}")
    with pytest.raises(ConfigError, match=message):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "stages").exists()


def test_all_problems_reported_together(no_model_loads, tmp_path):
    cfg = compose_cfg("ratio=2", "method.importance=x", "device=tpu", "logger=none")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert (
        "ratio=2" in str(e.value)
        and "method.importance='x'" in str(e.value)
        and "device='tpu'" in str(e.value)
    )


@pytest.mark.skipif(
    not (Path(loading.__file__).parent / "assets/tiny_llama/model.safetensors").exists(),
    reason="embedded weights not built",
)
def test_unmeetable_ratio_refused_from_config_alone(no_model_loads, tmp_path):
    cfg = compose_cfg("ratio=0.95", "logger=none")
    with pytest.raises(ConfigError, match=r"ratio=0\.95 cannot be met.*allowed: \(0, 0\.\d+\]"):
        run(cfg, tmp_path / "run")
    cfg = compose_cfg("ratio=0.013", "method.targets=[attn]", "logger=none")
    with pytest.raises(
        ConfigError, match=r"cannot be met within ratio_tolerance.*whole head groups.*nearest achievable"
    ):
        run(cfg, tmp_path / "run")


@pytest.mark.skipif(
    not (Path(loading.__file__).parent / "assets/tiny_llama/model.safetensors").exists(),
    reason="embedded weights not built",
)
def test_nm_pattern_must_divide_every_pruned_layer(no_model_loads, tmp_path):
    # tiny_llama's linears read 128 or 384 inputs: 5 divides neither
    cfg = compose_cfg("method=wanda", "method.sparsity_pattern=2:5", "ratio=0.6", "logger=none")
    with pytest.raises(
        ConfigError, match=r"2:5 needs each row's inputs in groups of 5.*q_proj has 128 inputs"
    ):
        run(cfg, tmp_path / "run")


def test_yaml_nm_pattern_parsed_as_string():
    # unquoted in a YAML file, 2:4 would be the base-60 integer 124
    cfg = compose_cfg("method=admm", "method.sparsity_pattern=2:4")
    assert cfg.method.sparsity_pattern == "2:4"


def test_layerwise_sparsity_plan_from_config_alone(no_model_loads):
    cfg = compose_cfg("method=admm", "ratio=0.7", "logger=none")
    _, _, plan = validate(cfg)
    assert plan.sparse and plan.requested == 0.7 and abs(plan.achieved - 0.7) < 1e-3
    assert plan.params_after == plan.params_before and 0 < plan.zero_fraction < 0.7


def test_struct_mode_guards_typos_in_code():
    cfg = compose_cfg()
    with pytest.raises(Exception, match="ratio_tol"):
        _ = cfg.ratio_tol
    with open_dict(cfg):
        cfg.extra = 1
    assert cfg.extra == 1


def test_long_override_lists_get_a_short_unique_run_dir_name():
    from prunelab.cli import MAX_DIR_NAME, _run_dir_name

    short = "method=wanda,method.sparsity_pattern=2\\:4"
    assert _run_dir_name(short) == "method=wanda,method.sparsity_pattern=2:4"
    long_a = ",".join(f"method.knob{i}={i}" for i in range(40))
    long_b = long_a + ",ratio=0.5"
    a, b = _run_dir_name(long_a), _run_dir_name(long_b)
    assert len(a.encode()) <= MAX_DIR_NAME and len(b.encode()) <= MAX_DIR_NAME
    assert a != b and a.startswith("method.knob0=0") and a == _run_dir_name(long_a)


def test_run_identity_ignores_keys_that_only_move_work():
    """Where calibration batches wait and whether activations are recomputed change no
    result: runs that differ only there share a run directory (and resume each other)."""
    from prunelab.runner import run_identity

    base = {
        "seed": 0,
        "device": "cpu",
        "method": {"name": "loraprune", "rho": 1, "train": {"lr": 1e-3}},
        "recovery": {"name": "lora", "lr": 1e-4},
    }
    moved = {
        "seed": 0,
        "device": "cuda",
        "method": {
            "name": "loraprune",
            "rho": 1,
            "activations": "disk",
            "train": {"lr": 1e-3, "gradient_checkpointing": True},
        },
        "recovery": {"name": "lora", "lr": 1e-4, "gradient_checkpointing": True},
    }
    assert run_identity(moved) == run_identity(base) == {k: v for k, v in base.items() if k != "device"}
    assert moved["method"]["train"]["gradient_checkpointing"] is True  # the input is left alone
    assert run_identity({**base, "seed": 1}) != run_identity(base)


def test_the_loader_itself_refuses_a_non_boolean_trust_remote_code():
    """Even a config that skipped validation (the API, a hand-built node) cannot reach
    from_pretrained with a truthy string."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {"path": "embedded:tiny_llama", "revision": None, "trust_remote_code": "no", "dtype": "float32"}
    )
    with pytest.raises(ConfigError, match=r"model\.trust_remote_code='no' \(str\)"):
        loading.load_config(cfg)
    assert loading.trusts_remote_code(OmegaConf.create({"trust_remote_code": False})) is False


REMOTE_CODE = """
import os
from pathlib import Path

from transformers import LlamaConfig

Path(os.environ["PRUNELAB_REMOTE_CODE_MARKER"]).write_text("the model folder's code ran")


class RemoteConfig(LlamaConfig):
    model_type = "prunelab_remote"
"""


@pytest.mark.parametrize("flag", [False, "no", "false", 1, True])
def test_a_model_folders_code_runs_only_for_a_real_true(flag, tmp_path, monkeypatch):
    """A folder whose config.json maps to its own Python code (``auto_map``): its code runs
    only with ``trust_remote_code=true`` (the boolean); ``false`` is refused by transformers,
    a string or a number by prunelab, and in neither case does the code run. The last case
    (a real true) shows that the marker would catch the code running."""
    import json
    import shutil

    from omegaconf import OmegaConf

    from prunelab.models.embedded import asset_dir

    folder = tmp_path / "remote"
    shutil.copytree(asset_dir("tiny_llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="prunelab_remote", auto_map={"AutoConfig": "remote.RemoteConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "remote.py").write_text(REMOTE_CODE)
    marker = tmp_path / "ran"
    monkeypatch.setenv("PRUNELAB_REMOTE_CODE_MARKER", str(marker))
    node = {"path": str(folder), "revision": None, "trust_remote_code": flag, "dtype": "float32"}
    if flag is True:
        loading.load_config(OmegaConf.create(node))
        assert marker.exists()
        return
    with pytest.raises(ConfigError, match=r"model\.trust_remote_code"):
        loading.load_config(OmegaConf.create(node))
    assert not marker.exists()


class _Marker:
    """Unpickling this writes a file (what a hostile pickle could do instead)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "unpickled"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_weights_are_never_loaded(tmp_path):
    """A folder whose only weights are a pickle (pytorch_model.bin) is refused before anything
    reads it, by validation and by the loader itself; transformers alone would read it (the
    control at the end: it opens the .bin, which is what the refusal prevents)."""
    import pickle
    import shutil

    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from prunelab.models.embedded import asset_dir

    folder = tmp_path / "pickled"
    shutil.copytree(asset_dir("tiny_llama"), folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Marker(str(marker))))
    node = OmegaConf.create(
        {"path": str(folder), "revision": None, "trust_remote_code": False, "dtype": "float32"}
    )
    with pytest.raises(ConfigError, match=r"model\.path=.*pickled weights only \(pytorch_model\.bin\)"):
        loading.check_model_config(OmegaConf.merge(node, {"attn_implementation": None}))
    with pytest.raises(ConfigError, match=r"pickled weights only"):
        loading.load_pretrained(folder)
    assert not marker.exists()
    with pytest.raises(Exception, match=r"(?i)pickl|weights_only|pytorch_model"):
        AutoModelForCausalLM.from_pretrained(str(folder))  # without prunelab's refusal: the .bin is opened


def test_eval_window_longer_than_the_text_is_refused_before_the_weights_load(tmp_path, monkeypatch):
    """A test text of a few tokens with eval windows of 128 (within the model's 256 positions):
    refused from the text in the model's own tokens, before any weights load — today's check of
    seq_len against the positions alone would let it through to a failure after loading."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prunelab.runner import check

    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "data"
    short = tmp_path / "wiki-test.parquet"
    pq.write_table(pa.table({"text": [" = Tiny = \n", " a short test text .\n"]}), short)
    overrides = [
        "data=wikitext2",
        f"data.local_files={{train: {fixtures / 'wikitext2-train-00000-of-00001.parquet'}, test: {short}}}",
        "eval.perplexity.datasets=[wikitext2:test]",
        "eval.perplexity.seq_len=128",
        f"output_root={tmp_path}",
    ]

    def no_weights(*a, **k):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(loading, "load_pretrained", no_weights)
    with pytest.raises(
        ConfigError,
        match=r"eval\.perplexity\.seq_len=128 is longer than the text of wikitext2:test \((\d+) tokens",
    ):
        check(compose_cfg(*overrides))
    # a window that fits the text passes the same check
    check(compose_cfg(*overrides[:-1], "eval.perplexity.seq_len=4"))


def test_a_device_map_is_checked_in_a_dry_run_too(no_model_loads, tmp_path):
    """The explicit map's coverage is read from config.json (local), before any weights load."""
    from prunelab.runner import check

    base = ["method=wanda", "recovery=none", "logger=none", f"output_root={tmp_path}", "dry_run=true"]
    with pytest.raises(ConfigError, match=r"model\.device_map does not place the whole model"):
        check(compose_cfg(*base, "model.device_map={model: cpu}"), dry_run=True)
    check(compose_cfg(*base, "model.device_map={model: cpu, lm_head: disk}"), dry_run=True)
