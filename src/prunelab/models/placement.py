"""Models placed over several devices (GPUs, CPU, disk) with accelerate's big-model machinery.

``model.device_map`` (null: the whole model on ``device``, as before) hands placement to
accelerate: a strategy (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``) or an
explicit ``{module name prefix: device}`` map, bounded by ``model.max_memory``. Checkpoints
load through ``from_pretrained(device_map=..., max_memory=..., offload_folder=...)``
(:func:`load_kwargs`); a model already in memory is dispatched with accelerate's
``infer_auto_device_map`` + ``dispatch_model`` (:func:`dispatch`). Either way accelerate
attaches an ``AlignDevicesHook`` to each placed module: it moves the module's inputs to its
execution device and, for an offloaded module, loads its weights from the offload store
(``weights_map``) before the forward and drops them (back to ``meta``) after it.

Every stage uses this module and nothing else of accelerate's hooks:

- :func:`is_dispatched` / :func:`input_device` / :func:`execution_device`: where things run;
- :func:`materialized`: a module's offloaded weights as real tensors for the duration, and on
  exit every change made to them (masks, pruned weights, smaller shapes) written back into
  the offload store, so the next forward sees it;
- :func:`place`: a model loaded for a stage goes where the run puts it (never ``.to`` a
  dispatched model: accelerate refuses to move one with offloaded modules).

Validation (no model loads): :func:`check_placement`.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*$", re.IGNORECASE)
_CUDA = re.compile(r"^cuda:(\d+)$")
DEVICES_ALLOWED = "cpu, disk, a GPU index (0, 1, …) or cuda:N"


# ----------------------------------------------------------------------------- validation
def parse_device(value: Any) -> int | str | None:
    """A device of a device map or of ``max_memory``: ``cpu``, ``disk``, a GPU index, ``cuda:N``
    (-> N). None when it is none of those."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str):
        if value in ("cpu", "disk"):
            return value
        if value.isdigit():
            return int(value)
        m = _CUDA.match(value)
        if m:
            return int(m.group(1))
    return None


def parse_size(value: Any) -> int | None:
    """``2GiB`` / ``500MB`` / a byte count -> bytes; None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            n = float(m.group(1)) * SIZE_UNITS[m.group(2).upper()]
            return int(n) if n > 0 else None
    return None


def check_placement(
    device_map: Any,
    max_memory: Any,
    offload_folder: Any,
    device: Any = "auto",
    cuda_count: int | None = None,
) -> list[str]:
    """Problems with ``model.device_map`` / ``model.max_memory`` / ``model.offload_folder`` (and
    ``device`` beside them), each naming key, value and what is allowed. Nothing loads."""
    if cuda_count is None:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    problems: list[str] = []
    gpus_used: list[tuple[str, int]] = []
    if device_map is None:
        for key, v in (("model.max_memory", max_memory), ("model.offload_folder", offload_folder)):
            if v is not None:
                problems.append(
                    f"{key}={v!r} is set but model.device_map is null (the whole model on `device`); "
                    "allowed: null, or set model.device_map"
                )
        return problems
    uses_disk = False
    if isinstance(device_map, str):
        if device_map not in STRATEGIES:
            problems.append(
                f"model.device_map={device_map!r} is not allowed; allowed: null, {', '.join(STRATEGIES)}, or a "
                f"mapping {{module name prefix: device}} with devices {DEVICES_ALLOWED}"
            )
        uses_disk = True  # a strategy offloads to disk whatever does not fit max_memory
    elif isinstance(device_map, Mapping):
        if not device_map:
            problems.append("model.device_map={} is empty; allowed: a mapping {module name prefix: device}")
        for name, dev in device_map.items():
            parsed = parse_device(dev)
            if not isinstance(name, str):
                problems.append(f"model.device_map: key {name!r} is not a module name (a string)")
            if parsed is None:
                problems.append(f"model.device_map.{name}={dev!r} is not allowed; allowed: {DEVICES_ALLOWED}")
            elif isinstance(parsed, int):
                gpus_used.append((f"model.device_map.{name}", parsed))
            uses_disk |= parsed == "disk"
    else:
        problems.append(
            f"model.device_map={device_map!r} ({type(device_map).__name__}) is not allowed; allowed: null, "
            f"{', '.join(STRATEGIES)}, or a mapping {{module name prefix: device}}"
        )
    if max_memory is not None:
        if not isinstance(max_memory, Mapping) or not max_memory:
            problems.append(
                f"model.max_memory={max_memory!r} is not allowed; allowed: null or a mapping {{device: size}} "
                "(devices cpu or a GPU index; sizes like 2GiB, 500MB or a byte count)"
            )
        else:
            for dev, size in max_memory.items():
                parsed = parse_device(dev)
                if parsed is None or parsed == "disk":
                    problems.append(
                        f"model.max_memory: device {dev!r} is not allowed; allowed: cpu, a GPU index or cuda:N "
                        "(disk has no limit)"
                    )
                elif isinstance(parsed, int):
                    gpus_used.append((f"model.max_memory.{dev}", parsed))
                if parse_size(size) is None:
                    problems.append(
                        f"model.max_memory.{dev}={size!r} is not allowed; allowed: a size > 0 such as 2GiB, "
                        "500MB or a byte count"
                    )
    for key, index in gpus_used:
        if index >= cuda_count:
            have = f"{cuda_count} CUDA device(s)" if cuda_count else "no CUDA device"
            problems.append(
                f"{key} names GPU {index} but this machine has {have}; allowed: "
                + (f"GPU indices 0-{cuda_count - 1}, cpu or disk" if cuda_count else "cpu or disk")
            )
    if offload_folder is not None:
        if not isinstance(offload_folder, str) or not offload_folder:
            problems.append(
                f"model.offload_folder={offload_folder!r} is not allowed; allowed: null or a folder path"
            )
        elif uses_disk and (why := _unwritable(Path(offload_folder).expanduser())):
            problems.append(
                f"model.offload_folder={offload_folder!r} {why}; allowed: a folder this process can create and "
                "write (disk offload writes the offloaded weights there), or null (a folder in the run directory)"
            )
    if device not in (None, "auto"):
        problems.append(
            f"device={device!r} together with model.device_map={device_map!r}: the device map places the model "
            "and its inputs; allowed: device=auto with a device map, or model.device_map=null"
        )
    return problems


def _unwritable(folder: Path) -> str | None:
    """Why ``folder`` cannot be created and written (None: it can), probed as preflight probes
    output_root."""
    from prunelab.preflight import write_probe

    existing, why = write_probe(folder)
    if why == "not a folder":
        return f"is below {str(existing)!r}, which is not a folder"
    return f"cannot be written ({why} in {str(existing)!r})" if why else None


def check_coverage(device_map: Mapping[str, Any], config: Any) -> list[str]:
    """An explicit map must place every parameter of the model ``config`` describes (built on
    the meta device: no weights). Names that are no module of the model are refused too."""
    from accelerate.utils import check_device_map

    from prunelab.sparsity.blocks import meta_model

    model = meta_model(config)
    names = {n for n, _ in model.named_modules()}
    problems = [
        f"model.device_map.{k} is not a module of this model; allowed: module names such as "
        f"{', '.join(sorted(n for n in names if n and n.count('.') <= 1)[:8])}, …"
        for k in device_map
        if k not in names
    ]
    if problems:
        return problems
    try:
        check_device_map(model, {k: parse_device(v) for k, v in device_map.items()})
    except ValueError as e:
        return [f"model.device_map does not place the whole model: {e}; allowed: a map covering every module"]
    return []


# ----------------------------------------------------------------------------- placing
def normalize(device_map: Any) -> str | dict[str, int | str]:
    """A strategy unchanged; an explicit map with ``cuda:N`` as N (what accelerate takes)."""
    if isinstance(device_map, str):
        return device_map
    return {str(k): parse_device(v) for k, v in dict(device_map).items()}


def memory_map(max_memory: Mapping[Any, Any] | None) -> dict[int | str, int] | None:
    """``model.max_memory`` as accelerate's ``max_memory``: {cpu | GPU index: bytes}."""
    if max_memory is None:
        return None
    return {parse_device(k): parse_size(v) for k, v in dict(max_memory).items()}


def main_device(device_map: Any) -> torch.device:
    """Where a map's inputs go before the first module: the first GPU it uses (a strategy: GPU
    0 when there is one), else the CPU — accelerate's own choice (``dispatch_model``)."""
    if isinstance(device_map, str):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    gpus = [d for d in normalize(device_map).values() if isinstance(d, int)]
    return torch.device(f"cuda:{gpus[0]}") if gpus else torch.device("cpu")


def fresh_folder(root: str | Path, owner: object | None = None) -> Path:
    """A new folder inside ``root`` for one model's disk-offloaded weights, removed when
    ``owner`` (the model) is garbage collected. Never an existing one: accelerate reuses
    weights it finds in an offload folder (``index.json``), which would be another model's."""
    Path(root).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="offload-", dir=root))
    if owner is not None:
        remove_with(owner, folder)
    return folder


def remove_with(model: object, folder: str | Path) -> None:
    """Remove ``folder`` (a model's disk-offloaded weights) once ``model`` is garbage collected
    (at the latest when the process exits)."""
    weakref.finalize(model, shutil.rmtree, str(folder), True)


def load_kwargs(device_map: Any, max_memory: Any, offload_folder: str | Path) -> dict[str, Any]:
    """The ``from_pretrained`` keywords that load a checkpoint dispatched: ``offload_folder``
    should be a fresh folder (:func:`fresh_folder`; :func:`remove_with` the loaded model)."""
    return {
        "device_map": normalize(device_map),
        "max_memory": memory_map(max_memory),
        "offload_folder": str(offload_folder),
    }


def device_map_for(
    model: nn.Module, device_map: Any, max_memory: Any = None, dtype: torch.dtype | None = None
) -> dict[str, int | str]:
    """An explicit map for an in-memory (or meta-device) model: a strategy resolved as
    ``from_pretrained`` does (accelerate's ``get_balanced_memory`` for the balanced ones, then
    ``infer_auto_device_map`` with the model's unsplittable blocks; ``dtype``: the weights'
    dtype where the model is not in it yet)."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if not isinstance(device_map, str):
        return normalize(device_map)  # type: ignore[return-value]
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    memory = memory_map(max_memory)
    if device_map in ("auto", "balanced", "balanced_low_0"):
        memory = get_balanced_memory(
            model,
            max_memory=memory,
            no_split_module_classes=no_split,
            dtype=dtype,
            low_zero=device_map == "balanced_low_0",
        )
    return infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)


def dispatch(
    model: nn.Module, device_map: Any, max_memory: Any = None, offload_folder: str | Path | None = None
) -> nn.Module:
    """Dispatch an in-memory model (on the CPU) over devices: the map from
    :func:`device_map_for`, disk-offloaded weights in a fresh folder inside ``offload_folder``."""
    from accelerate import dispatch_model

    explicit = device_map_for(model, device_map, max_memory)
    folder = None
    if "disk" in explicit.values():
        if offload_folder is None:
            raise ValueError("device map offloads to disk but no offload_folder was given")
        folder = fresh_folder(offload_folder, model)
    skip = getattr(model, "_skip_keys_device_placement", None)
    # force_hooks: a map onto one device still gets hooks, so every dispatched model behaves alike
    dispatch_model(model, explicit, offload_dir=folder, skip_keys=skip, force_hooks=True)
    return model


def place(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model`` where the run computes: a dispatched model stays where accelerate put it."""
    return model if is_dispatched(model) else model.to(device)


# ----------------------------------------------------------------------------- where things run
def _align_hooks(module: nn.Module) -> list[Any]:
    """The AlignDevicesHooks attached to ``module`` itself (inside a SequentialHook too)."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed ``model`` (a device map with hooks: ``hf_device_map``)."""
    return getattr(model, "hf_device_map", None) is not None and any(_align_hooks(m) for m in model.modules())


def _device(d: Any) -> torch.device:
    return torch.device(f"cuda:{d}") if isinstance(d, int) else torch.device(d)


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its own (or first descendant's) hook's execution device, else
    the device of its first real (non-meta) tensor, else the CPU."""
    for m in module.modules():
        for h in _align_hooks(m):
            if h.execution_device is not None:
                return _device(h.execution_device)
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's ``input_ids`` go: the model's own hook's execution device (accelerate
    sends inputs there) or, without one, the input embedding's."""
    for h in _align_hooks(model):
        if h.execution_device is not None:
            return _device(h.execution_device)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return execution_device(emb if emb is not None else model)


# ----------------------------------------------------------------------------- offloaded weights
def _get(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner), leaf)


def offloaded_units(model: nn.Module) -> list[nn.Module]:
    """The modules whose weights accelerate keeps offloaded (CPU or disk), in module order."""
    return [m for m in model.modules() if any(h.offload for h in _align_hooks(m))]


def _store(weights_map: Any, name: str) -> tuple[Any, str]:
    """The mapping that holds an offloaded tensor and its key there (a PrefixedDataset adds the
    module's prefix to the underlying loader's keys)."""
    from accelerate.utils import PrefixedDataset

    while isinstance(weights_map, PrefixedDataset):
        name = weights_map.prefix + name
        weights_map = weights_map.dataset
    return weights_map, name


def _write_back(weights_map: Any, name: str, value: torch.Tensor) -> None:
    """Replace one offloaded tensor in accelerate's store: the CPU state dict's entry, or the
    disk file (a ``.dat`` in the offload folder, whose index entry is rewritten — also for a
    weight that was read from the checkpoint's own safetensors, which is never written)."""
    from accelerate.utils import OffloadedWeightsLoader, offload_weight

    store, key = _store(weights_map, name)
    value = value.detach()
    if isinstance(store, OffloadedWeightsLoader):
        if key in store.state_dict:
            old = store.state_dict[key]
            store.state_dict[key] = value.to(old.device, copy=True)
            return
        if store.save_folder is None:
            raise RuntimeError(f"{key}: disk-offloaded without an offload folder to write it back to")
        offload_weight(value.cpu(), key, store.save_folder, index=store.index)
        return
    if isinstance(store, dict):  # accelerate's cpu_offload keeps a plain state dict
        old = store[key]
        store[key] = value.to(old.device, copy=True)
        return
    raise TypeError(f"{key}: cannot write back into an offload store of type {type(store).__name__}")


def _tensor_names(module: nn.Module, hook: Any) -> list[str]:
    from accelerate.utils import named_module_tensors

    return [
        n
        for n, _ in named_module_tensors(
            module,
            include_buffers=hook.offload_buffers,
            recurse=hook.place_submodules,
            remove_non_persistent=True,
        )
    ]


@contextlib.contextmanager
def materialized(
    module: nn.Module, device: torch.device | str | None = None, write_back: bool = True
) -> Iterator[nn.Module]:
    """``module`` with every offloaded weight at or below it as a real tensor, on its execution
    device (or on ``device``, e.g. ``"cpu"`` for a whole-model edit). Inside, forwards use these
    tensors (the hooks do not reload or drop them) and in-place or shape changes are allowed;
    on exit each tensor is written back into accelerate's offload store and dropped to ``meta``
    again, so the change persists in the next forward (``write_back=False``: a read-only look,
    nothing is written). Modules that are not offloaded (on a
    device of their own) are used as they are. On an undispatched model: nothing happens.

    A module *inside* an offloaded unit (one Linear of an offloaded block) is not found from
    below: pass the unit or an ancestor (the block, or the model)."""
    from accelerate.utils import find_tied_parameters, retie_parameters, set_module_tensor_to_device

    units = [(m, h) for m in module.modules() for h in _align_hooks(m) if h.offload]
    if not units:
        yield module
        return
    # tied weights (a head tied to the embedding) are one Parameter: materializing each module
    # separately would untie them (a checkpoint saved then would hold the head twice)
    tied = find_tied_parameters(module)
    originals: dict[tuple[int, str], torch.Tensor] = {}  # the meta tensors, put back on exit
    done: list[tuple[nn.Module, Any, list[str]]] = []
    try:
        for m, h in units:
            target = _device(device if device is not None else h.execution_device or "cpu")
            names = _tensor_names(m, h)
            for name in names:
                originals[(id(m), name)] = _get(m, name)
                value = h.weights_map[name]
                # a copy: disk values are read-only memory maps, CPU ones the store itself
                set_module_tensor_to_device(m, name, target, value=value.to(target, copy=True))
            h.offload = False  # the hook neither reloads nor drops them while we hold them
            done.append((m, h, names))
        retie_parameters(module, tied)
        if hasattr(module, "tie_weights"):
            # a whole transformers model: accelerate's hooks untie offloaded tied weights at every
            # forward (each module reloads its own copy); tied again as its config says
            module.tie_weights()
        yield module
    finally:
        for m, h, names in done:
            for name in names:
                value = _get(m, name)
                if write_back:
                    _write_back(h.weights_map, name, value)
                old = originals[(id(m), name)]
                if old.shape == value.shape:  # the very meta tensor: ties to other modules survive
                    owner, _, leaf = name.rpartition(".")
                    sub = m.get_submodule(owner)
                    (sub._parameters if leaf in sub._parameters else sub._buffers)[leaf] = old
                else:
                    set_module_tensor_to_device(m, name, "meta")
            h.offload = True
        retie_parameters(module, tied)


# ----------------------------------------------------------------------------- gradients
@contextlib.contextmanager
def live_parameters(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """The tensors a forward really computes with, for the parameters ``names`` (full names):
    the dict is refilled at each forward, so a backward after it can ask autograd for their
    gradients. Why: on a dispatched model accelerate loads an offloaded module's weights as
    *new* tensors before its forward and drops the module's own ones to ``meta`` after it, so
    the model's parameter objects are not the ones gradients flow to (their ``requires_grad``
    is carried over). A module that owns a wanted parameter and is itself an offloaded unit
    (its weights load in its own forward, after any torch pre-hook) is materialized, read
    only, for the duration. On an undispatched model the dict holds the parameters themselves."""
    wanted = set(names)
    owners: dict[nn.Module, list[tuple[str, str]]] = {}
    for full in names:
        owner, _, leaf = full.rpartition(".")
        owners.setdefault(model.get_submodule(owner), []).append((full, leaf))
    live: dict[str, torch.Tensor] = {}

    def grab(module: nn.Module, _args: Any) -> None:
        for full, leaf in owners[module]:
            live[full] = getattr(module, leaf)

    handles = [m.register_forward_pre_hook(grab) for m in owners]
    own_units = [m for m in owners if any(h.offload for h in _align_hooks(m))]
    try:
        with contextlib.ExitStack() as stack:
            for m in own_units:
                stack.enter_context(materialized(m, write_back=False))
            for m, pairs in owners.items():  # modules not run by a forward keep their own
                for full, leaf in pairs:
                    live[full] = getattr(m, leaf)
            assert wanted == set(live)
            yield live
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- adapters (peft)
def _offloaded_tensors(model: nn.Module) -> list[tuple[nn.Module, Any, str]]:
    """(module, hook, tensor name below it) of every offloaded tensor."""
    return [
        (m, h, n) for m in model.modules() for h in _align_hooks(m) if h.offload for n in _tensor_names(m, h)
    ]


@contextlib.contextmanager
def placeholders(model: nn.Module) -> Iterator[nn.Module]:
    """Every offloaded tensor replaced by a placeholder that takes no memory (one zero broadcast
    to its shape) on its execution device, with its dtype and ``requires_grad``, then dropped
    back to ``meta``; for code that reads only where a weight is and what it looks like, not
    its values: peft's adapter injection, which puts each adapter on its base layer's device
    (``meta`` otherwise, which loses the adapter's initial values). ``requires_grad`` changed
    inside persists (accelerate carries it over); values are never written back."""
    from accelerate.utils import set_module_tensor_to_device

    whole = [m for m in model.modules() for h in _align_hooks(m) if h.offload and h.place_submodules]
    if whole:  # accelerate's preload_module_classes: such a hook would drop added adapters too
        raise RuntimeError(
            f"{type(whole[0]).__name__} is offloaded as a whole (accelerate's preload_module_classes): modules "
            "added below it (adapters) would be dropped to meta after every forward; dispatch without it"
        )
    entries = _offloaded_tensors(model)
    for m, h, name in entries:
        owner, _, leaf = name.rpartition(".")
        mod = m.get_submodule(owner)
        old = getattr(mod, leaf)
        device = _device(h.execution_device or "cpu")
        stand_in = torch.zeros((), dtype=old.dtype, device=device).expand(old.shape)
        if isinstance(old, nn.Parameter):
            mod._parameters[leaf] = nn.Parameter(stand_in, requires_grad=old.requires_grad)
        else:
            mod._buffers[leaf] = stand_in
    try:
        yield model
    finally:
        for m, _, name in entries:
            set_module_tensor_to_device(m, name, "meta")


@contextlib.contextmanager
def offload_paused(model: nn.Module) -> Iterator[nn.Module]:
    """The offload hooks switched off, nothing loaded (the offloaded tensors stay ``meta``): for
    code that only rearranges modules and would otherwise load and rewrite offloaded weights on
    its own (peft's ``unload``: its ``onload_layer`` reloads a disk-offloaded base layer and
    rewrites it, reading the checkpoint's safetensors index)."""
    hooks = [h for m in model.modules() for h in _align_hooks(m) if h.offload]
    for h in hooks:
        h.offload = False
    try:
        yield model
    finally:
        for h in hooks:
            h.offload = True


def named_parameter_values(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.named_parameters()`` with the real values of offloaded ones, read (on the CPU)
    one offloaded unit at a time, in the same order."""
    units = {n: m for n, m in model.named_modules() if any(h.offload for h in _align_hooks(m))}
    current: tuple[str, contextlib.ExitStack] | None = None
    try:
        for name, p in model.named_parameters():
            unit = next((u for u in units if name.startswith(u + ".") or u == ""), None)
            if unit is None:
                yield name, p
                continue
            if current is None or current[0] != unit:
                if current is not None:
                    current[1].close()
                stack = contextlib.ExitStack()
                stack.enter_context(materialized(units[unit], "cpu", write_back=False))
                current = (unit, stack)
            yield name, model.get_parameter(name)
    finally:
        if current is not None:
            current[1].close()
