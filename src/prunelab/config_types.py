"""Type checking of the composed config: every key's value must have its declared type, never
coerced (``bool("no")`` is True; ``int(2.7)`` is 2; a string ``"8"`` compares wrongly).

Where each key's type comes from:

- nodes with a ``_target_`` (``method``, ``recovery``, ``data``): the annotations of the class
  it names (a dataclass's fields, else its ``__init__`` parameters); a class lists nested config
  nodes it reads as other classes in ``sub_configs`` (``method.train`` has recovery=lora's keys);
- every other node (``model``, ``eval``, ``logger``, the run keys): the types its values have in
  the group's ``conf/`` options — every option of the group is read — plus ``DECLARED`` for keys
  whose default is null everywhere or that take more than one shape.

Beyond the type: floats must be finite, and numbers must be ≥ 0 unless ``SIGNED`` lists the
key; ``MINIMUM`` holds lower bounds of the keys without a class of their own. Problems name the
key the user typed: a value that reached a key through an interpolation (``recovery.seed:
${seed}``) is checked at its source (``seed``) only. Unknown keys of the class-less nodes are
refused here; the classes' builders refuse their own unknown keys.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Union

from omegaconf import DictConfig, OmegaConf

# groups whose nodes name a class (``_target_``); the others are typed from conf/
CLASS_GROUPS = ("method", "recovery", "data")
YAML_GROUPS = ("model", "eval", "logger", "debug")

# keys whose default is null in every option, or that take several shapes: their types
DECLARED: dict[str, Any] = {
    "ratio": float,
    "ratio_tolerance": float,
    "ratio_convention": str | None,
    "sweep_name": str | None,
    "tags": list[str],
    "push_to_hub": str | None,
    "memory_limit_gib": float | None,
    "rundir.lock_wait_s": float,  # seconds: a fraction is fine
    "rundir.lock_stale_s": float,
    "logger.init_timeout_s": float,
    "model.revision": str | None,
    "model.attn_implementation": str | None,  # null: transformers' default kernel
    "model.device_map": str | dict | None,  # a strategy or {module prefix: device} (models/placement.py)
    "model.max_memory": dict | None,
    "model.offload_folder": str | None,
    "logger.entity": str | None,
    "eval.perplexity.datasets": list[str],
    "eval.perplexity.joiner": str | dict[str, str] | None,
    "eval.perplexity.max_windows": int | None,
    "eval.zeroshot.tasks": list[str],
    "eval.zeroshot.num_fewshot": int | dict[str, int] | None,
    "eval.zeroshot.metric": str | dict[str, str] | None,
    "eval.zeroshot.limit": int | float | None,  # lm-eval: a count, or a fraction of each task
}

# numeric keys that may be negative (every other number must be ≥ 0)
SIGNED = frozenset({"seed", "method.seed", "recovery.seed", "eval.zeroshot.seed", "method.generator.offset"})

# lower bounds of the class-less keys (the classes check their own ranges)
MINIMUM: dict[str, float] = {
    "eval.perplexity.seq_len": 2,  # a window predicts its tokens from the ones before it
    "eval.perplexity.batch_size": 1,
    "eval.perplexity.max_windows": 1,
    "eval.zeroshot.batch_size": 1,
    "eval.zeroshot.max_length": 2,
    "eval.cost.seq_len": 1,
    "eval.cost.batch_size": 1,
    "eval.cost.repeats": 1,
}
EXCLUSIVE_MINIMUM: dict[str, float] = {"eval.zeroshot.limit": 0}

_INTERPOLATION = re.compile(r"^\$\{([\w.]+)\}$")  # ${seed}: a plain alias of another key


# ----------------------------------------------------------------------------- types


def _args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _config_class(tp: Any) -> type | None:
    """The dataclass a (union) annotation names, if any: a nested node of that class's keys."""
    for t in _args(tp) if _is_union(tp) else (tp,):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


def conforms(value: Any, tp: Any) -> bool:
    """Whether ``value`` (a plain container value) has type ``tp``, with no coercion: a bool is
    not a number, an int is a float, a list stands for a tuple, a mapping for a dataclass."""
    if tp is Any or tp is object:
        return True
    if tp is None or tp is type(None):
        return value is None
    if _is_union(tp):
        return any(conforms(value, t) for t in _args(tp))
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return value in _args(tp)
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = _args(tp)
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(conforms(v, t) for v, t in zip(value, args, strict=True))
        return all(conforms(v, args[0]) for v in value)
    if origin in (dict, Mapping, typing.Mapping) or tp in (dict,):
        if not isinstance(value, Mapping):
            return False
        args = _args(tp)
        return not args or all(conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items())
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return isinstance(value, (Mapping, tp))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation this checker does not read (a Callable, a Protocol): no opinion


def describe(tp: Any) -> str:
    """``int | None`` -> ``an integer or null``: what the message says is allowed."""
    if tp is Any or tp is object:
        return "anything"
    if tp is None or tp is type(None):
        return "null"
    if _is_union(tp):
        parts = [describe(t) for t in _args(tp) if t is not type(None)]
        parts = list(dict.fromkeys(parts))
        if type(None) in _args(tp):
            parts.append("null")
        return " or ".join(parts)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in _args(tp))
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        args = _args(tp)
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        args = _args(tp)
        return f"a mapping of {_plural(args[1])}" if args and args[1] is not Any else "a mapping"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans", dict: "mappings"}.get(
        tp, describe(tp)
    )


# ----------------------------------------------------------------------------- schemas


@functools.cache
def class_schema(cls: type) -> dict[str, Any]:
    """``{key: annotation}`` of the config keys a class reads: a dataclass's init fields, else
    its ``__init__`` parameters (``name`` and the nested ``sub_configs`` are in it too)."""
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls.__init__)
    params = inspect.signature(cls.__init__).parameters
    return {k: hints.get(k, Any) for k in params if k != "self"}


def sub_configs(cls: type) -> dict[str, type]:
    """The nested config nodes a class reads as other classes (``{"train": LoraRecovery}``)."""
    return dict(getattr(cls, "sub_configs", {}) or {})


def _type_of(value: Any) -> Any:
    if isinstance(value, bool):
        return bool
    if isinstance(value, int):
        return int
    if isinstance(value, float):
        return float
    if isinstance(value, str):
        return str
    return None


@functools.cache
def yaml_schema() -> dict[str, Any]:
    """``{dotted key: type}`` of the run keys and of every key of the class-less groups, from the
    values the conf/ options hold (ints widen to numbers where an option has a float), then
    ``DECLARED``. Mappings with fixed keys recurse; lists take their elements' type."""
    from prunelab.paths import conf_dir

    seen: dict[str, set] = {}
    lists: dict[str, set] = {}
    nodes: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, Mapping):
                nodes.add(key)
                walk(v, key)
            elif isinstance(v, list):
                lists.setdefault(key, set()).update(_type_of(x) for x in v)
            else:
                seen.setdefault(key, set()).add(_type_of(v))

    top = OmegaConf.load(conf_dir() / "config.yaml")
    walk(
        {
            k: v
            for k, v in OmegaConf.to_container(top, resolve=False).items()
            if k not in ("defaults", "hydra")
        },
        "",
    )
    for group in YAML_GROUPS:
        for path in sorted((conf_dir() / group).glob("*.yaml")):
            node = _composed_option(group, path.stem)
            if group in node and isinstance(node[group], Mapping):  # a `@package _global_` option (debug)
                node = node[group]
            nodes.add(group)
            walk(node, group)
    schema: dict[str, Any] = {}
    for key, kinds in seen.items():
        kinds.discard(None)
        if kinds == {int, float}:
            kinds = {float}
        if len(kinds) == 1:
            schema[key] = next(iter(kinds))
    for key, kinds in lists.items():
        kinds.discard(None)
        if len(kinds) == 1:
            schema[key] = list[next(iter(kinds))]
    schema = {k: v for k, v in schema.items() if not any(k.startswith(d + ".") for d in DECLARED)}
    schema.update(DECLARED)
    for node in nodes:  # a key declared as a leaf (eval.zeroshot.metric) is not a node
        if node in schema:
            continue
        schema.setdefault(node, dict)
    return schema


@functools.cache
def _composed_option(group: str, option: str) -> dict:
    """One option of a class-less group, its defaults list followed (``eval=quick`` may build on
    ``eval=embedded``), interpolations left as written."""
    from prunelab.paths import conf_dir

    raw = OmegaConf.load(conf_dir() / group / f"{option}.yaml")
    merged = OmegaConf.create()
    for entry in raw.get("defaults") or []:
        if isinstance(entry, str) and entry != "_self_" and "/" not in entry:
            merged = OmegaConf.merge(merged, _composed_option(group, entry))
    body = {k: v for k, v in OmegaConf.to_container(raw, resolve=False).items() if k != "defaults"}
    return OmegaConf.to_container(OmegaConf.merge(merged, body), resolve=False)


# ----------------------------------------------------------------------------- the check


def aliases(cfg: DictConfig) -> dict[str, str]:
    """``{key: source}`` of the keys whose value is a plain interpolation of another key
    (``recovery.seed: ${seed}`` -> ``{"recovery.seed": "seed"}``)."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, str) and (m := _INTERPOLATION.match(node)):
            out[prefix] = m.group(1)

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


class _Checker:
    def __init__(self, alias: dict[str, str]) -> None:
        self.alias = alias
        self.problems: list[tuple[str, str]] = []  # (key, message)
        self.types: dict[str, Any] = {}  # every leaf key met, with its type

    def add(self, key: str, message: str) -> None:
        self.problems.append((key, message))

    def value(self, key: str, value: Any, tp: Any) -> None:
        cls = _config_class(tp)
        if cls is None or not isinstance(value, Mapping):
            self.types[key] = tp
        if key in self.alias:  # checked where the user typed it
            return
        if cls is not None and isinstance(value, Mapping):
            self.node(key, value, class_schema(cls), sub_configs(cls), closed=False)
            return
        if not conforms(value, tp):
            self.add(key, self._mismatch(key, value, tp))
            return
        self.numbers(key, value)

    @staticmethod
    def _mismatch(key: str, value: Any, tp: Any) -> str:
        """The message for a value of the wrong type: for a list or mapping of the right kind,
        the first item of the wrong type (``data.max_rows.train='abc' (str)``)."""
        members = _args(tp) if _is_union(tp) else (tp,)
        for member in members:
            origin = typing.get_origin(member)
            args = _args(member)
            if isinstance(value, Mapping) and origin in (dict, Mapping, typing.Mapping) and args:
                for k, v in value.items():
                    if not conforms(v, args[1]):
                        return f"{key}.{k}={_show(v)} is not allowed; allowed: {describe(args[1])}"
            if isinstance(value, (list, tuple)) and origin in (list, tuple, Sequence) and args:
                for v in value:
                    if not conforms(v, args[0]):
                        return f"{key}={value!r}: {_show(v)} is not allowed; allowed: {describe(member)}"
        return f"{key}={_show(value)} is not allowed; allowed: {describe(tp)}"

    def numbers(self, key: str, value: Any) -> None:
        """Finite, and ≥ 0 unless SIGNED; MINIMUM where declared (lists and mappings: each item)."""
        items = (
            [(f"{key}[{i}]", v) for i, v in enumerate(value)]
            if isinstance(value, (list, tuple))
            else [(f"{key}.{k}", v) for k, v in value.items()]
            if isinstance(value, Mapping)
            else [(key, value)]
        )
        for where, v in items:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            shown = key if where == key else f"{key}={value!r}: {where}"
            if isinstance(v, float) and not math.isfinite(v):
                self.add(key, f"{shown}={v!r} is not allowed; allowed: a finite number")
            elif key in MINIMUM and v < MINIMUM[key]:
                self.add(key, f"{shown}={v!r} is out of range; allowed: ≥ {MINIMUM[key]:g}")
            elif key in EXCLUSIVE_MINIMUM and v <= EXCLUSIVE_MINIMUM[key]:
                self.add(key, f"{shown}={v!r} is out of range; allowed: > {EXCLUSIVE_MINIMUM[key]:g}")
            elif v < 0 and key not in SIGNED:
                self.add(key, f"{shown}={v!r} is out of range; allowed: ≥ 0")

    def node(
        self, prefix: str, node: Mapping, schema: Mapping[str, Any], subs: Mapping[str, type], closed: bool
    ) -> None:
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if k == "_target_":
                continue
            if k in subs:
                if key in self.alias:
                    continue
                if isinstance(v, Mapping):
                    self.node(key, v, class_schema(subs[k]), sub_configs(subs[k]), closed=False)
                elif v is not None:
                    self.add(
                        key,
                        f"{key}={_show(v)} is not allowed; allowed: a mapping (keys of {subs[k].__name__})",
                    )
                continue
            if k not in schema:
                if closed:
                    self.add(key, f"{key} is not a key of the config; allowed: {', '.join(sorted(schema))}")
                continue  # a class's builder refuses its own unknown keys, naming the allowed ones
            self.value(key, v, schema[k])


def _yaml_node_schema(prefix: str) -> dict[str, Any]:
    """The keys directly under ``prefix`` in the yaml-derived schema, with their types."""
    full = yaml_schema()
    depth = 0 if not prefix else prefix.count(".") + 1
    out = {}
    for key, tp in full.items():
        parts = key.split(".")
        if len(parts) == depth + 1 and (not prefix or key.startswith(prefix + ".")):
            out[parts[-1]] = tp
    return out


def check_types(cfg: DictConfig) -> list[tuple[str, str]]:
    """Every type problem of the composed config as ``(key, message)``, keys as the user typed
    them. ``cfg`` must resolve (interpolations); nothing loads."""
    return _check(cfg).problems


def key_types(cfg: DictConfig) -> dict[str, Any]:
    """``{dotted key: type}`` of every typed leaf of ``cfg`` (what ``check_types`` holds it to)."""
    return _check(cfg).types


def _check(cfg: DictConfig) -> _Checker:
    from hydra.utils import get_class

    checker = _Checker(aliases(cfg))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    top = _yaml_node_schema("")
    for k, v in resolved.items():
        if k == "hydra":
            continue
        if k in CLASS_GROUPS:
            if not isinstance(v, Mapping):
                checker.add(k, f"{k}={_show(v)} is not allowed; allowed: a config group option")
                continue
            target = v.get("_target_")
            if target is None and k == "data":  # the data builder's default classes
                target = "prunelab.data.sources." + (
                    "EmbeddedText" if v.get("name") == "embedded" else "HubText"
                )
            if not isinstance(target, str) or target.rsplit(".", 1)[0] == target:
                continue  # recovery=none has no class; a bad _target_ is refused by the group's builder
            try:
                cls = get_class(target)
            except Exception:  # an unknown _target_: refused by the group's builder, with the choices
                continue
            checker.node(k, v, class_schema(cls), sub_configs(cls), closed=False)
        elif k in YAML_GROUPS:
            _yaml_node(checker, k, v)
        elif k not in top:
            allowed = sorted({*top, *CLASS_GROUPS})
            checker.add(k, f"{k} is not a key of the config; allowed: {', '.join(allowed)}")
        else:
            checker.value(k, v, top[k])
    return checker


def _yaml_node(checker: _Checker, prefix: str, node: Any) -> None:
    schema = _yaml_node_schema(prefix)
    if not isinstance(node, Mapping):
        checker.add(prefix, f"{prefix}={_show(node)} is not allowed; allowed: a mapping")
        return
    for k, v in node.items():
        key = f"{prefix}.{k}"
        if k not in schema:
            checker.add(key, f"{key} is not a key of {prefix}; allowed: {', '.join(sorted(schema))}")
        elif schema[k] is dict and key not in DECLARED:
            _yaml_node(checker, key, v)
        else:
            checker.value(key, v, schema[k])
