"""Fuzz: bad values for every config key, by type — the wrong type, out of range, a misspelled
option, an unknown key — must each be refused before any model loads, by a dry run and by a
real run alike, with a ConfigError (no traceback) naming the key the user typed and the value.

The cases are generated from the composed configs of the groups' options (one per method
class, the data classes, …) and the types ``prunelab.config_types`` holds each key to; the
counts are reported in docs/reliability.md ("Validation before anything loads")."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf, open_dict

from prunelab.api import compose
from prunelab.config_types import SIGNED, _args, _is_union, key_types
from prunelab.errors import ConfigError
from prunelab.methods import base_method_configs
from prunelab.models import loading
from prunelab.runner import check

# option sets whose keys are fuzzed: every method class, both data classes and their shapes
BASES = {
    "run": [[]],
    "model": [["model=tiny_llama"]],
    "method": [[f"method={m}"] for m in base_method_configs()],
    "data": [
        ["data=embedded_domain"],
        ["data=wikitext2"],
        ["data=ptb"],
        ["data=c4"],
        ["data=alpaca_cleaned"],
    ],
    "recovery": [["recovery=lora"]],
    "eval": [["eval=embedded"], ["eval=paper", "model=tiny_llama"]],
    "logger": [["logger=wandb"]],
}
# string keys that take any string (names, paths, ids, text): no "misspelled option" case
FREE_STRINGS = (
    "name",
    "path",
    "revision",
    "config_name",
    "text_field",
    "joiner",
    "project",
    "entity",
    "sweep_name",
    "output_root",
    "cache_dir",
    "splits.train",
    "splits.validation",
    "splits.test",
    "data_files",
    "stages",
)
# keys whose misspelling is refused by Hydra or is a name users choose (not an option list)
SKIP = ("method.name", "recovery.name", "eval.name", "model.name", "logger.name", "data.name", "_target_")


def _nodes(node: Any, prefix: str = "") -> Iterator[tuple[str, dict]]:
    yield prefix, node
    for k, v in node.items():
        if isinstance(v, dict) and v and k != "hydra":
            yield from _nodes(v, f"{prefix}.{k}" if prefix else str(k))


def _members(tp: Any) -> tuple:
    return _args(tp) if _is_union(tp) else (tp,)


def bad_values(key: str, default: Any, tp: Any) -> Iterator[tuple[str, Any]]:
    """(kind, value) cases for one key of type ``tp`` (default value ``default``)."""
    members = _members(tp)
    numeric = [m for m in members if m in (int, float)]
    if bool in members:
        yield "type", "yes"
        yield "type", 1
    if numeric:
        yield "type", "abc"
        yield "type", True
        if float not in numeric:
            yield "type", 2.5
        if float in numeric:
            yield "range", math.nan
            yield "range", math.inf
        if key not in SIGNED:
            yield "range", -1
    if str in members and not numeric:
        yield "type", 7
    if (
        members in ((str,), (str, type(None)))
        and isinstance(default, str)
        and not key.endswith(FREE_STRINGS)
        and key not in SKIP
    ):
        yield "option", default[:-1] + ("x" if default[-1] != "x" else "y")
    origins = {getattr(m, "__origin__", m) for m in members}
    if (origins & {dict, Mapping}) and str not in members and not numeric:
        yield "type", "abc"
    if (origins & {list, tuple}) and not (origins & {str}):
        yield "type", "abc"
        inner = next((_args(m) for m in members if getattr(m, "__origin__", None) in (list, tuple)), ())
        if inner and inner[0] in (str, int, float):
            yield "type", [{"x": 1}]


def cases() -> list[tuple[str, list[str], str, str, Any]]:
    """(group, base overrides, key, kind, value), each (key, kind, value) once."""
    out, seen = [], set()
    for group, bases in BASES.items():
        for base in bases:
            cfg = compose([*base, "logger=none"] if group != "logger" else base)
            plain = OmegaConf.to_container(cfg, resolve=True)
            types = key_types(cfg)
            tree = OmegaConf.create(plain)
            for key in types:  # every typed key (a mapping-valued one too: data.splits)
                default = OmegaConf.select(tree, key)
                default = OmegaConf.to_container(default) if OmegaConf.is_config(default) else default
                top = key.split(".")[0]
                if (group == "run") != (top not in BASES) or (group != "run" and top != group):
                    continue
                if key.endswith("_target_") or key not in types:
                    continue
                for kind, value in bad_values(key, default, types[key]):
                    if (key, kind, repr(value)) not in seen:
                        seen.add((key, kind, repr(value)))
                        out.append((group, base, key, kind, value))
            for node, content in _nodes(plain):
                if (group == "run") != (node == "") or (group != "run" and node.split(".")[0] != group):
                    continue
                if node in ("method.recovery.stages",):
                    continue
                first = next(k for k in content if k not in ("_target_",))
                key = f"{node}.{first}x" if node else f"{first}x"
                if (key, "unknown") not in seen:
                    seen.add((key, "unknown"))
                    out.append((group, base, key, "unknown", 1))
    return out


CASES = cases()
KEYS = sorted({key for _, _, key, kind, _ in CASES if kind != "unknown"})


@pytest.fixture
def no_model_loads(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the config was refused")

    monkeypatch.setattr(loading, "load_model", boom)
    monkeypatch.setattr(loading, "load_pretrained", boom)


def _shown(value: Any) -> list[str]:
    return [repr(value), str(value)] if not isinstance(value, list) else [repr(value), "{'x': 1}"]


@functools.cache
def _composed(base: tuple[str, ...]) -> DictConfig:
    return compose(list(base))


def refusal(base: list[str], key: str, kind: str, value: Any, tmp_path, dry_run: bool) -> str | None:
    """None when the bad value is refused cleanly (ConfigError naming key and value), else why not."""
    # composed once per base (Hydra takes a second a config): the bad value is set after composing
    cfg = copy.deepcopy(_composed((*base, *(["logger=none"] if "logger" not in key else []))))
    with open_dict(cfg):
        cfg.output_root = str(tmp_path)
        OmegaConf.update(cfg, key, value, force_add=True)
    try:
        check(cfg, dry_run=dry_run)
    except ConfigError as e:
        msg = str(e)
        named = any(f"{key}{sep}" in msg for sep in ("=", ".", " ", "[", ":"))
        valued = kind == "unknown" or any(s in msg for s in _shown(value))  # an unknown key: its name
        return None if named and valued else f"message does not name {key}={value!r}: {msg}"
    except Exception as e:  # a traceback for the user
        return f"{type(e).__name__}: {e}"
    return "accepted"


@pytest.mark.slow  # 570 cases: 0.2-0.5 s each
@pytest.mark.parametrize("group", list(BASES))
def test_every_key_refuses_bad_values_before_anything_loads(group, no_model_loads, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    failures = []
    mine = [c for c in CASES if c[0] == group]
    assert mine, group
    for i, (_, base, key, kind, value) in enumerate(mine):
        why = refusal(base, key, kind, value, tmp_path, dry_run=True)
        if why is None and i % 4 == 0:  # the real run's own check (the same function) on a sample
            why = refusal(base, key, kind, value, tmp_path, dry_run=False)
        if why is not None:
            failures.append(f"{kind} {key}={value!r} ({' '.join(base)}): {why}")
    assert not failures, f"{len(failures)} of {len(mine)} not refused cleanly:\n" + "\n".join(failures)


def test_the_fuzz_covers_every_key_of_every_group():
    """Every typed key of the fuzzed configs gets at least one bad value (none slips through
    the generator because of an unusual type)."""
    covered = set(KEYS)
    for bases in BASES.values():
        for base in bases:
            types = key_types(compose([*base, "logger=none"]))
            for key in types:
                if key.endswith(SKIP):
                    continue
                assert key in covered or key.startswith(tuple(covered)), key


def test_counts_reported(capsys):
    kinds: dict[str, int] = {}
    for _, _, _, kind, _ in CASES:
        kinds[kind] = kinds.get(kind, 0) + 1
    with capsys.disabled():
        print(f"\nvalidation fuzz: {len(KEYS)} keys, {len(CASES)} cases {kinds}")
    assert len(KEYS) > 150 and len(CASES) > 500


# ----------------------------------------------------------------------------- issue 19's list
def _folder_with_config(tmp_path, text: str | None):
    """A model folder (the embedded tiny_llama's files) whose config.json is ``text`` (None: absent)."""
    import shutil

    from prunelab.models.embedded import asset_dir

    folder = tmp_path / "model"
    shutil.copytree(asset_dir("tiny_llama"), folder)
    if text is None:
        (folder / "config.json").unlink()
    else:
        (folder / "config.json").write_text(text)
    return folder


def _pickled_only(tmp_path):
    """A model folder whose weights are a pickle (pytorch_model.bin), no safetensors."""
    folder = _folder_with_config(tmp_path, _tiny_config())
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    return folder


def _tiny_config() -> str:
    from prunelab.models.embedded import asset_dir

    return (asset_dir("tiny_llama") / "config.json").read_text()


# (overrides, what the message must contain): each must be refused before any model loads
LISTED: list[tuple[list[str] | Any, str]] = [
    (["device=cuda:7"], "device='cuda:7'"),
    (["device=mps"], "device='mps'"),
    (["device=tpu"], "device='tpu'"),
    (["model.attn_implementation=flash_attn_9"], "model.attn_implementation='flash_attn_9'"),
    (["eval.perplexity.seq_len=0"], "eval.perplexity.seq_len=0"),
    (["eval.perplexity.seq_len=-8"], "eval.perplexity.seq_len=-8"),
    (["eval.perplexity.seq_len=4096"], "eval.perplexity.seq_len=4096 is longer than the model's positions"),
    (["eval.zeroshot.max_length=1024"], "eval.zeroshot.max_length=1024 is longer"),
    (["eval.cost.seq_len=1024"], "eval.cost.seq_len=1024 is longer"),
    (["eval.perplexity.batch_size=0"], "eval.perplexity.batch_size=0"),
    (["eval.zeroshot.batch_size=0"], "eval.zeroshot.batch_size=0"),
    (["eval.perplexity.datasets=[embedded:tset]"], "eval.perplexity.datasets='embedded:tset'"),
    (["method=wanda", "data.calibration.seq_len=1024"], "data.calibration.seq_len=1024 is longer"),
    (["eval.perplexity.max_windows=0"], "eval.perplexity.max_windows=0"),
    (
        ["eval.perplexity.datasets=[]", "eval.zeroshot.tasks=[]", "eval.cost.enabled=false"],
        "nothing to evaluate",
    ),
    (["recovery.r=100"], "recovery.r=100 is larger than the smallest layer"),
    (["method=loraprune", "method.train.r=200"], "method.train.r=200 is larger"),
    (["+foo=1"], "foo is not a key of the config"),
    (["+model.quantize=true"], "model.quantize is not a key of model"),
    (["tags=abc"], "tags='abc' (str)"),
    (["sweep_name=5"], "sweep_name=5 (int)"),
    (["logger=wandb", "logger.mode=onlne"], "logger.mode='onlne'"),
    (["logger=wandb", "logger.mode=online"], "logger.mode='online' needs a W&B API key"),
    (["seed=abc"], "seed='abc' (str)"),
    (["model.trust_remote_code=no"], "model.trust_remote_code='no' (str)"),
    (["model.trust_remote_code='false'"], "model.trust_remote_code='false' (str)"),
    (["model.trust_remote_code=1"], "model.trust_remote_code=1 (int)"),
    (["ratio=0.999"], "ratio"),
    (["method=magnitude", "method.keep_first_layers=8"], "keep"),
    (["method=magnitude", "method.sparsity_pattern=2:4", "ratio=0.3"], "2:4"),
    (lambda tmp: [f"output_root={_file(tmp)}/out"], "output_root="),
    (lambda tmp: [f"cache_dir={_file(tmp)}/cache"], "cache_dir="),
    (
        lambda tmp: [f"model.path={_folder_with_config(tmp, '{broken')}"],
        "config.json transformers cannot read",
    ),
    (lambda tmp: [f"model.path={_folder_with_config(tmp, '')}"], "config.json transformers cannot read"),
    (lambda tmp: [f"model.path={_folder_with_config(tmp, None)}"], "has no config.json"),
    (lambda tmp: [f"model.path={_pickled_only(tmp)}"], "pickle"),
]


def _file(tmp_path):
    """A plain file: no folder can be made under it (root can write anywhere else)."""
    f = tmp_path / "a-file"
    f.write_text("")
    return f


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry_run", "real"])
@pytest.mark.parametrize("overrides,expected", LISTED, ids=[str(i) for i in range(len(LISTED))])
def test_issue_cases_are_refused_before_anything_loads(
    overrides, expected, dry_run, no_model_loads, tmp_path, monkeypatch
):
    """The dry run calls what the real run calls before its weights load (runner.check); the
    real run is run (runner.run), with model loading replaced by an AssertionError."""
    from prunelab import runner

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    if callable(overrides):
        overrides = overrides(tmp_path)
    cfg = compose([f"output_root={tmp_path}", "logger=none", *overrides, f"dry_run={str(dry_run).lower()}"])
    with pytest.raises(ConfigError) as e:
        if dry_run:
            check(cfg, dry_run=True)
        else:
            runner.run(cfg, tmp_path / "run")
    assert expected in str(e.value), str(e.value)


def test_val_size_0_is_said_before_anything_loads(caplog, no_model_loads, tmp_path):
    """``recovery.val_size=0`` is allowed (LoRAPrune's official run merges its last adapter:
    docs/methods/loraprune.md) but not silent: the dry run already says the best-adapter
    choice is off."""
    import logging

    with caplog.at_level(logging.WARNING, logger="prunelab.runner"):
        check(compose([f"output_root={tmp_path}", "logger=none", "recovery.val_size=0"]), dry_run=True)
    assert "recovery.val_size=0: no validation, so the best adapter is not chosen" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prunelab.runner"):
        check(compose([f"output_root={tmp_path}", "logger=none"]), dry_run=True)
    assert "best adapter" not in caplog.text
