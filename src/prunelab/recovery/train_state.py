"""The training state a rerun resumes from: everything a LoRA training loop — and the hooks of
the methods that prune while they train — needs to go on exactly as if it had never stopped.

    <out_dir>/train_state/latest.json                      which checkpoint is current (the commit)
    <out_dir>/train_state/step-00000050/state.json         the state's JSON part
    <out_dir>/train_state/step-00000050/tensors.safetensors   every tensor of it

A state is a tree of dicts, lists, JSON scalars and tensors (``pack``/``unpack``): tensors go
into safetensors, the rest into JSON; nothing is pickled. A checkpoint is written into a new
step directory, then ``latest.json`` is replaced atomically (temporary file + rename), then the
older step directories are deleted: a kill at any moment leaves the previous checkpoint or the
new one, never half of one. ``key`` (a hash of what the training depends on) guards against
resuming a different training: a checkpoint of another key, or a damaged one, is set aside
with a warning and the training starts from step 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from array import array
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

STATE_DIR = "train_state"
_POINTER = "latest.json"
_TENSOR = "__tensor__"  # a JSON leaf {"__tensor__": name} stands for a tensor of the safetensors file


# ----------------------------------------------------------------------------- trees


def pack(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able tree, tensors): every tensor of ``tree`` replaced by a named reference, copied
    to the CPU (contiguous, sharing no storage: what safetensors stores). Dict keys must be str."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = x.detach().to("cpu", copy=True).contiguous()
            return {_TENSOR: name}
        if isinstance(x, Mapping):
            bad = [k for k in x if not isinstance(k, str)]
            if bad or _TENSOR in x:
                raise TypeError(f"training state: dict keys must be strings (not {_TENSOR!r}), got {bad[:3]}")
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"training state: cannot store a {type(x).__name__} (tensors, dicts, lists, scalars)")

    return walk(tree), tensors


def unpack(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of ``pack`` (tuples come back as lists)."""
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            return tensors[tree[_TENSOR]]
        return {k: unpack(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unpack(v, tensors) for v in tree]
    return tree


# ----------------------------------------------------------------------------- on disk


def save(out_dir: Path, step: int, key: str, tree: Mapping[str, Any]) -> Path:
    """Write the state of optimizer step ``step`` under ``out_dir/train_state`` and make it the
    one a rerun resumes from; older checkpoints are deleted. Returns the step directory."""
    from safetensors.torch import save_file

    root = Path(out_dir) / STATE_DIR
    name = f"step-{step:08d}"
    target = root / name
    obj, tensors = pack(tree)
    tmp = root / f".{name}.{os.getpid()}.tmp"  # unique per writer: never another's half-written files
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "key": key, "state": obj}) + "\n")
    for f in tmp.iterdir():  # on disk before the pointer names them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(target, ignore_errors=True)  # a stale copy of this step (a rerun after a crash)
    os.replace(tmp, target)
    sizes = {f.name: f.stat().st_size for f in target.iterdir()}
    pointer = {"step": step, "dir": name, "key": key, "sizes": sizes}
    ptmp = root / f".{_POINTER}.{os.getpid()}.tmp"
    ptmp.write_text(json.dumps(pointer) + "\n")
    os.replace(ptmp, root / _POINTER)  # the commit: from here on a rerun resumes at `step`
    for old in root.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load(out_dir: Path, key: str) -> tuple[int, dict[str, Any]] | None:
    """(step, state) of the checkpoint under ``out_dir/train_state``; None when there is none.
    A checkpoint of another training (``key`` differs) or a damaged one is discarded with a
    warning (the training starts over), never resumed from."""
    from safetensors.torch import load_file

    root = Path(out_dir) / STATE_DIR
    pointer_path = root / _POINTER
    if not pointer_path.exists():
        return None
    try:
        pointer = json.loads(pointer_path.read_text())
        target = root / pointer["dir"]
        sizes = {f.name: f.stat().st_size for f in target.iterdir()}
        if sizes != pointer["sizes"]:
            raise ValueError(f"file sizes {sizes} differ from the recorded {pointer['sizes']}")
        doc = json.loads((target / "state.json").read_text())
        if doc["key"] != key or pointer["key"] != key:
            log.warning(
                "training state in %s belongs to another training (different model, data or settings): "
                "discarded, training starts from step 0",
                root,
            )
            clear(out_dir)
            return None
        state = unpack(doc["state"], load_file(str(target / "tensors.safetensors")))
    except (OSError, ValueError, KeyError, TypeError) as e:  # json and safetensors errors are ValueErrors
        log.warning("training state in %s is damaged (%s): discarded, training starts from step 0", root, e)
        clear(out_dir)
        return None
    return int(doc["step"]), state


def clear(out_dir: Path) -> None:
    """Delete the training state under ``out_dir`` and every folder below it (a finished stage's
    trainings: LoRAShear's recovery keeps one per sub-stage)."""
    root = Path(out_dir)
    if not root.is_dir():
        return
    for d in list(root.rglob(STATE_DIR)):  # the folder's own and those of folders below it
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------- pieces of a state


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every random stream a training step may draw from: torch's CPU generator (dropout on the
    CPU), the device's CUDA generator, Python's ``random`` and NumPy's global generator."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)],
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if device is not None and device.type == "cuda":
        if "cuda" not in state:
            raise ValueError("the training state was saved without a CUDA generator")
        torch.cuda.set_rng_state(state["cuda"], device)


def optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's per-parameter state (Adam's moments and step counts) by parameter index.
    The hyperparameters are not stored: the config rebuilds them, and the learning rate is set
    from the step every step."""
    return {str(i): dict(s) for i, s in opt.state_dict()["state"].items()}


def load_optimizer_state(opt: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    sd = opt.state_dict()
    sd["state"] = {int(i): dict(s) for i, s in state.items()}
    opt.load_state_dict(sd)


def weights_digest(model: nn.Module, head: int = 1024) -> str:
    """A cheap fingerprint of a model's weights (names, shapes, dtypes, fp64 sum and sum of
    2-norm of each parameter, and the bytes of its first ``head`` elements): a training state
    is resumed only onto the weights it started from. Computed where the weights are (no copy
    of the model to the host)."""
    from prunelab.models.placement import named_parameter_values

    h = hashlib.sha256()
    stats = []
    for name, p in named_parameter_values(model):  # a dispatched model: offloaded ones read too
        t = p.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        stats.append(
            torch.stack([t.sum(dtype=torch.float64), torch.linalg.vector_norm(t, dtype=torch.float64)])
        )
        h.update(t.flatten()[:head].to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    if stats:
        h.update(torch.stack(stats).cpu().numpy().tobytes())
    return h.hexdigest()


def features_digest(*groups: Iterable[Mapping[str, list[int]]]) -> str:
    """A hash of tokenized features (their input ids and labels, in order)."""
    h = hashlib.sha256()
    for feats in groups:
        h.update(b"|")
        for f in feats:
            h.update(array("q", f["input_ids"]).tobytes())
            h.update(b"/")
            h.update(array("q", f["labels"]).tobytes())
    return h.hexdigest()


def config_key(obj: Any, drop: tuple[str, ...] = ()) -> Any:
    """A dataclass config as a JSON-able dict without the fields ``drop`` (a method's ``train``
    node: the trainer's own key covers it); None for anything else."""
    from dataclasses import asdict, is_dataclass

    if not is_dataclass(obj) or isinstance(obj, type):
        return None
    return {k: v for k, v in asdict(obj).items() if k not in drop}


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
