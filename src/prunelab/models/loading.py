"""Loading and saving models: embedded assets, hub ids, local folders, pruned checkpoints.

A pruned checkpoint is safetensors + config.json. Where every layer keeps one shape, the
config is a plain transformers config and ``AutoModelForCausalLM.from_pretrained`` loads
it. Otherwise the config records per-layer shapes (``prunelab_layer_shapes``) and
``load_pretrained`` (one call) rebuilds each layer to its shape before the weights load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.errors import ConfigError, bad_value
from prunelab.structure.arch import LAYER_SHAPES_KEY, LayerShape
from prunelab.structure.groups import set_layer_shapes

EMBEDDED_PREFIX = "embedded:"
SYNTHETIC_PREFIX = "synthetic:"
PACKAGED_PREFIX = "packaged:"  # = prunelab.models.packaged.PREFIX: a registry wheel's GGUF, converted once
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PRUNED_CLASSES: dict[type, type] = {}


def resolve_path(path: str) -> str:
    """``embedded:<name>`` -> the shipped asset folder; ``synthetic:<name>`` and
    ``packaged:<name>`` -> their folders (built on first use, verified); anything else unchanged."""
    if path.startswith(EMBEDDED_PREFIX):
        from prunelab.models.embedded import SPECS, asset_dir

        name = path[len(EMBEDDED_PREFIX) :]
        if name not in SPECS:
            raise bad_value("model.path", path, [EMBEDDED_PREFIX + n for n in SPECS])
        d = asset_dir(name)
        if not (d / "model.safetensors").exists():
            raise ConfigError(
                f"model.path={path!r}: the embedded weights are missing from {d}; "
                f"reproduce them with `python -m prunelab.models.embedded --name {name}`"
            )
        return str(d)
    if path.startswith(SYNTHETIC_PREFIX):
        from prunelab.models import synthetic

        name = path[len(SYNTHETIC_PREFIX) :]
        if name not in synthetic.SPECS:
            raise bad_value("model.path", path, [SYNTHETIC_PREFIX + n for n in synthetic.SPECS])
        return str(synthetic.build(name))
    if path.startswith(PACKAGED_PREFIX):
        from prunelab.models import packaged

        return str(packaged.ensure(path[len(PACKAGED_PREFIX) :]))
    return path


def check_model_config(cfg: Any) -> None:
    """Cheap checks on a model config node (no download, no weights)."""
    if cfg.dtype not in DTYPES:
        raise bad_value("model.dtype", cfg.dtype, DTYPES)
    path = str(cfg.path)
    if path.startswith(EMBEDDED_PREFIX):
        resolve_path(path)
    elif path.startswith(SYNTHETIC_PREFIX):
        from prunelab.models import synthetic

        if path[len(SYNTHETIC_PREFIX) :] not in synthetic.SPECS:
            raise bad_value("model.path", path, [SYNTHETIC_PREFIX + n for n in synthetic.SPECS])
    elif path.startswith(PACKAGED_PREFIX):
        from prunelab.models import packaged

        packaged.spec(path[len(PACKAGED_PREFIX) :])  # the name only: a dry run downloads nothing
    elif path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
        raise ConfigError(f"model.path={path!r} does not exist; expected a local model folder or a hub id")


def load_config(cfg: Any):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        resolve_path(str(cfg.path)), revision=cfg.revision, trust_remote_code=bool(cfg.trust_remote_code)
    )


def pruned_class(base: type) -> type:
    """A subclass of ``base`` (e.g. LlamaForCausalLM) that builds per-layer shapes from config."""
    if base.__name__.startswith("Pruned"):
        return base
    if base not in _PRUNED_CLASSES:

        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            shapes = getattr(config, LAYER_SHAPES_KEY, None)
            if shapes:
                set_layer_shapes(self, [LayerShape(**s) for s in shapes], config.head_dim)

        _PRUNED_CLASSES[base] = type(f"Pruned{base.__name__}", (base,), {"__init__": __init__})
    return _PRUNED_CLASSES[base]


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, **kwargs) -> nn.Module:
    """Load any prunelab checkpoint (dense, uniformly or per-layer pruned) or hub model."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(
        str(path), revision=kwargs.get("revision"), trust_remote_code=kwargs.get("trust_remote_code", False)
    )
    if getattr(config, LAYER_SHAPES_KEY, None):
        cls = pruned_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])
        return cls.from_pretrained(str(path), config=config, dtype=dtype, **kwargs)
    return AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=dtype, **kwargs)


def load_model(cfg: Any, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a model config node."""
    from transformers import AutoTokenizer

    path = resolve_path(str(cfg.path))
    model = load_pretrained(
        path,
        dtype=DTYPES[cfg.dtype],
        revision=cfg.revision,
        trust_remote_code=bool(cfg.trust_remote_code),
        attn_implementation=cfg.attn_implementation,
    ).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=cfg.revision, trust_remote_code=bool(cfg.trust_remote_code)
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def save_model(model: nn.Module, tokenizer, out: str | Path, extra: dict | None = None) -> Path:
    """safetensors + config.json (+ tokenizer); never a pickled model object."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if extra:
        (out / "prunelab.json").write_text(json.dumps(extra, indent=2) + "\n")
    return out
