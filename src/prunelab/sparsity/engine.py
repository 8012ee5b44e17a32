"""The sequential block-by-block calibration engine of the layer-wise methods.

1. Stream the calibration set through the embeddings batch by batch and keep each batch's
   block-0 inputs in an ``ActivationStore`` (a pre-hook stops the forward there).
2. For each block: hooks on its linear layers accumulate input statistics (Σx² per column,
   or XᵀX in fp32) while the stored batches run through it one at a time; each linear is
   handed to the solver; then the *pruned* block runs on the same batches and its outputs
   go to a second store, the next block's inputs.

Held at once on the compute device: one block's weights, its statistics (q/k/v share one,
gate/up share one) and the activations of *one batch* (input, output and the block's
internals). Where the other batches wait is ``activations``: ``memory`` keeps every batch's
hidden states in memory on the device (2 × n × T × H values: fastest, grows with the
number of samples n); ``disk`` writes each batch to a safetensors file and reads it back
when it is used, so memory does not grow with n at all; ``auto`` picks ``memory`` while
those 2 × n × T × H values fit in ``activation_budget_mb`` and ``disk`` beyond. The model
may stay on the CPU (``offload``): each block moves to ``device`` while it is processed
and goes back afterwards, so a model larger than the accelerator can be pruned on it.

A model dispatched by accelerate (``model.device_map``; ``models/placement.py``) is not moved:
each block is processed on the device it lives on (its execution device; an offloaded
block's weights are materialized there for the duration and the pruned weights written back
into the offload store), and each batch's inputs follow it there — as Wanda's own code does
for the models that span several GPUs.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prunelab.errors import NonFiniteError, bad_value
from prunelab.models.placement import execution_device, input_device, is_dispatched, materialized
from prunelab.numerics import DTYPE_HINT, all_finite
from prunelab.progress import bar
from prunelab.sparsity.blocks import block_linears, decoder_layers, leaf, resolve_modules
from prunelab.sparsity.solvers import InputStats, reconstruction_error

# LLaMA-family linear layers by the input they read: layers reading one input share its stats.
SITES = {
    "q_proj": ("self_attn.q_proj", "attn_in"),
    "k_proj": ("self_attn.k_proj", "attn_in"),
    "v_proj": ("self_attn.v_proj", "attn_in"),
    "o_proj": ("self_attn.o_proj", "o_in"),
    "gate_proj": ("mlp.gate_proj", "mlp_in"),
    "up_proj": ("mlp.up_proj", "mlp_in"),
    "down_proj": ("mlp.down_proj", "down_in"),
}
LINEARS = tuple(SITES)

# solve(module name, fp32 weight, stats or None) -> (new weight, keep-mask, info)
Solve = Callable[[str, torch.Tensor, InputStats | None], tuple[torch.Tensor, torch.Tensor, dict]]


class _Captured(Exception):
    """Raised by the block-0 pre-hook: the rest of the forward is not needed."""


def _device_of(module: nn.Module) -> torch.device:
    for t in [*module.parameters(), *module.buffers()]:
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def on_device(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Move ``modules`` to ``device`` for the duration, then back where each was."""
    homes = [_device_of(m) for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes, strict=True):
            m.to(home)


@contextlib.contextmanager
def block_on_device(block: nn.Module, device: torch.device, dispatched: bool) -> Iterator[torch.device]:
    """Where one block is processed: on ``device`` (moved there and back, :func:`on_device`),
    or, in a dispatched model, where accelerate placed it (its offloaded weights materialized
    and written back on exit). Yields that device."""
    if dispatched:
        with materialized(block):
            yield execution_device(block)
    else:
        with on_device([block], device):
            yield device


def _to(value: Any, device: torch.device) -> Any:
    """Tensors of ``value`` (nested tuples, lists, dicts) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


ACTIVATION_STORES = ("auto", "memory", "disk")


def _batches(calibration: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [calibration[i : i + batch_size] for i in range(0, calibration.shape[0], batch_size)]


class ActivationStore:
    """The hidden states of every calibration batch between two blocks, in order.

    ``memory``: tensors kept on ``device``. ``disk``: one safetensors file per batch under
    ``root``; iterating loads one batch at a time onto ``device``, so at most one stored
    batch is in memory whatever the number of batches."""

    def __init__(self, where: str, device: torch.device, root: Path | None = None) -> None:
        if where not in ("memory", "disk"):
            raise bad_value("activations", where, ("memory", "disk"))
        self.where, self.device, self.root = where, device, root
        self._held: list[torch.Tensor] = []
        self._count = 0
        if where == "disk":
            if root is None:
                raise ValueError("a disk ActivationStore needs a folder")
            root.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return self._count

    def append(self, x: torch.Tensor) -> None:
        if self.where == "memory":
            self._held.append(x)
        else:
            save_file({"x": x.detach().contiguous().cpu()}, str(self.root / f"{self._count:06d}.safetensors"))
        self._count += 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.where == "memory":
            yield from self._held
            return
        for i in range(self._count):
            yield load_file(str(self.root / f"{i:06d}.safetensors"), device=str(self.device))["x"]

    def clear(self) -> None:
        """Forget every batch (files removed); the store can be filled again."""
        if self.where == "disk":
            for i in range(self._count):
                (self.root / f"{i:06d}.safetensors").unlink(missing_ok=True)
        self._held = []
        self._count = 0


def pick_store(
    where: str, calibration: torch.Tensor, hidden: int, dtype: torch.dtype, budget_mb: float
) -> str:
    """``auto`` -> ``memory`` when two stores' worth of hidden states (the inputs and outputs
    of a block for all n × T calibration tokens) fit in ``budget_mb``, else ``disk``."""
    if where not in ACTIVATION_STORES:
        raise bad_value("method.activations", where, ACTIVATION_STORES)
    if where != "auto":
        return where
    need = 2 * calibration.numel() * hidden * torch.finfo(dtype).bits / 8 / 2**20
    return "memory" if need <= budget_mb else "disk"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a is b or a == b)
    except Exception:  # objects without a plain equality (arrays, masks): not known to be equal
        return False


class BlockInputs:
    """Block 0's inputs (hidden states in a store) and every block's keyword arguments
    (positions, rotary embeddings, attention mask) for every batch: layers of different
    types get different ones — a sliding-window layer its banded mask, Gemma's local layers
    their own rotary base. Identical arguments are kept once: within a batch, the layers of
    one type receive the very same objects; across batches, unpadded windows of one shape
    get equal ones (compared by value; arguments that cannot be compared — flex attention
    builds a new mask object per forward — are kept per batch)."""

    def __init__(self, store: ActivationStore, num_blocks: int = 1) -> None:
        self.store = store
        self._pool: dict[tuple[int, ...], list[dict[str, Any]]] = {}
        self._index: list[list[dict[str, Any]]] = [[] for _ in range(num_blocks)]
        self._batch: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (received, kept) this batch

    def add(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        """Block 0's input of one batch and its keyword arguments."""
        self.store.append(hidden)
        self.add_kwargs(0, tuple(hidden.shape), kwargs)

    def add_kwargs(self, block: int, shape: tuple[int, ...], kwargs: dict[str, Any]) -> None:
        """One block's keyword arguments for the batch being captured (block 0 starts a batch)."""
        if block == 0:
            self._batch = []
        # the very objects an earlier block of this batch got (the usual case: every layer of a type)
        for raw, kept in self._batch:
            if _identical(raw, kwargs):
                self._index[block].append(kept)
                return
        kept = next((known for known in self._pool.setdefault(shape, []) if _same(known, kwargs)), None)
        if kept is None:
            self._pool[shape].append(kwargs)
            kept = kwargs
        self._batch.append((kwargs, kept))
        self._index[block].append(kept)

    def kwargs(self, block: int = 0) -> list[dict[str, Any]]:
        """``block``'s keyword arguments, one per stored batch."""
        return self._index[block]


def _identical(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    calibration: torch.Tensor,
    device: torch.device,
    batch_size: int = 8,
    store: ActivationStore | None = None,
) -> BlockInputs:
    """Block 0's hidden states (into ``store``, default in memory) and every block's keyword
    arguments, as the model's own forward builds them for each layer. The blocks do not run:
    each is replaced for the duration by a recorder that passes its input through."""
    name, blocks = decoder_layers(model)
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    captured = BlockInputs(store if store is not None else ActivationStore("memory", device), len(blocks))
    last = len(blocks) - 1

    def recorder(i: int):
        def forward(*args, **kw):
            if len(args) > 1:
                raise TypeError(
                    f"{type(blocks[i]).__name__} takes positional arguments besides the hidden states; the "
                    "layer-wise engine needs them by keyword (transformers ≥ 5 decoder layers do)"
                )
            hs = args[0] if args else kw["hidden_states"]
            rest = {k: v for k, v in kw.items() if k != "hidden_states"}
            if i == 0:
                captured.add(hs.detach(), rest)
            else:
                captured.add_kwargs(i, tuple(hs.shape), rest)
            if i == last:
                raise _Captured
            return hs

        return forward

    # A forward set on the instance (accelerate's hooks set one) is put back afterwards.
    own = [b.__dict__.get("forward") for b in blocks]
    stem = [m for m in parent.children() if m is not blocks]
    dispatched = is_dispatched(model)
    where = input_device(model) if dispatched else device
    try:
        for i, b in enumerate(blocks):
            b.forward = recorder(i)
        # a dispatched model's embeddings run where accelerate put them (their hooks load them)
        with contextlib.nullcontext() if dispatched else on_device(stem, device):
            for batch in _batches(calibration, batch_size):
                with contextlib.suppress(_Captured):
                    model(input_ids=batch.to(where), use_cache=False)
    finally:
        for b, f in zip(blocks, own, strict=True):
            if f is None:
                del b.forward
            else:
                b.forward = f
    return captured


@torch.no_grad()
def run_block(
    block: nn.Module,
    inputs: ActivationStore,
    kwargs: list[dict[str, Any]],
    outputs: ActivationStore | None = None,
    device: torch.device | None = None,
) -> None:
    """Run every stored batch through ``block``; keep the outputs in ``outputs`` if given.
    ``device``: where the block computes (a dispatched model's block: each batch's hidden
    states and keyword arguments follow it there)."""
    for x, kw in zip(inputs, kwargs, strict=True):
        if device is not None:
            x, kw = x.to(device), _to(kw, device)
        out = block(x, **kw)
        if outputs is not None:
            outputs.append(out[0] if isinstance(out, tuple) else out)
        del out, x  # one batch alive at a time


@torch.no_grad()
def propagate(
    model: nn.Module, calibration: torch.Tensor, device: torch.device, batch_size: int = 8
) -> list[torch.Tensor]:
    """The last block's outputs, block by block as the engine computes them (for checks)."""
    captured = capture_inputs(model, calibration, device, batch_size)
    inputs = captured.store
    dispatched = is_dispatched(model)
    for i, block in enumerate(decoder_layers(model)[1]):
        with block_on_device(block, device, dispatched) as dev:
            outputs = ActivationStore("memory", device)
            run_block(block, inputs, captured.kwargs(i), outputs, dev if dispatched else None)
            inputs = outputs
    return list(inputs)


class SharedInputs:
    """Input statistics of a block's target linears, one per distinct input: linears that
    read the very same tensor (q/k/v reading the normed hidden states, gate/up reading the
    MLP input; nothing in a fused projection) share one Σx² / XᵀX. Which linears share is
    read from the model's own forward — the first batch's inputs, compared by identity —
    not from a family's names, and every later batch must share the same way."""

    def __init__(self, linears: dict[str, nn.Linear], targets: list[str], gram: bool, device: torch.device):
        self.linears, self.targets, self.gram, self.device = linears, targets, gram, device
        self.site: dict[str, int] = {}
        self.stats: dict[int, InputStats] = {}
        self._batch: list[tuple[torch.Tensor, int]] = []  # this batch's inputs (held: ids stay unique)
        self._seen: set[str] = set()

    def _hook(self, path: str):
        def fn(module, args, output):
            x = args[0]
            site = next((s for t, s in self._batch if t is x), None)
            if site is None:
                site = self.site.get(path, len(self.stats))
                if site not in self.stats:
                    self.stats[site] = InputStats(module.in_features, self.gram, self.device)
                self.stats[site].add(x)
                self._batch.append((x, site))
            if self.site.setdefault(path, site) != site:
                raise RuntimeError(
                    f"{path} read a different tensor than in the first batch; cannot share statistics"
                )
            self._seen.add(path)

        return fn

    @contextlib.contextmanager
    def hooked(self, block: nn.Module) -> Iterator[None]:
        """Hooks on the target linears while the block runs its batches."""

        def new_batch(module, args, kwargs):
            self._batch = []

        hooks = [block.register_forward_pre_hook(new_batch, with_kwargs=True)]
        hooks += [self.linears[p].register_forward_hook(self._hook(p)) for p in self.targets]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            self._batch = []
        unseen = [p for p in self.targets if p not in self._seen]
        if unseen:
            raise RuntimeError(f"the block's forward never called {unseen}; their inputs are unknown")

    def stats_of(self, path: str) -> InputStats:
        return self.stats[self.site[path]]

    def release(self, path: str, later: list[str]) -> None:
        """Free ``path``'s statistics when no later target reads the same input."""
        site = self.site[path]
        if not any(self.site.get(p) == site for p in later):
            self.stats.pop(site, None)


@contextlib.contextmanager
def _scratch(activations: str, folder: str | Path | None) -> Iterator[Path | None]:
    """For the disk store: a fresh folder (inside ``folder``, else the system's temporary
    one; never a folder that was already there), removed afterwards. None otherwise."""
    if activations != "disk":
        yield None
        return
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="prunelab-activations-", dir=folder or None))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@torch.no_grad()
def prune_layerwise(
    model: nn.Module,
    calibration: torch.Tensor | None,
    solve: Solve,
    layers: list[int],
    modules: tuple[str, ...] | list[str],
    gram: bool,
    device: torch.device,
    batch_size: int = 8,
    errors: bool = False,
    desc: str = "layer-wise",
    activations: str = "memory",
    activation_dir: str | Path | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Prune ``modules`` of each block in ``layers``; weights are updated in place.

    Returns keep-masks by parameter name (``model.layers.3.mlp.up_proj.weight``) and a
    per-layer report (sparsity; relative reconstruction error when ``errors``).
    ``calibration=None`` (data-free solvers) skips the forward passes entirely.
    ``activations``: where the batches wait between blocks (``memory`` | ``disk``, see the
    module docstring); ``disk`` uses ``activation_dir`` (default: a temporary folder).
    """
    with _scratch(activations, activation_dir) as root:

        def store(name: str) -> ActivationStore:
            return ActivationStore(activations, device, None if root is None else root / name)

        prefix, blocks = decoder_layers(model)
        where = str(getattr(model.config, "model_type", type(model).__name__))
        masks: dict[str, torch.Tensor] = {}
        report: dict[str, dict] = {}
        inputs = captured = None
        if calibration is not None:
            captured = capture_inputs(model, calibration, device, batch_size, store("a"))
            inputs = captured.store
            spare = store("b")
        last = max(layers)
        todo = set(layers)
        dispatched = is_dispatched(model)
        for i in bar(range(last + 1), desc=desc, unit="block", leave=False):
            block = blocks[i]
            kwargs = captured.kwargs(i) if captured is not None else None
            with block_on_device(block, device, dispatched) as dev:
                follow = dev if dispatched else None  # the inputs follow a dispatched block
                if i in todo:
                    linears = block_linears(block)
                    targets = resolve_modules(modules, list(linears), where)
                    shared = (
                        SharedInputs(linears, targets, gram or errors, dev) if inputs is not None else None
                    )
                    if shared is not None:
                        with shared.hooked(block):
                            run_block(block, inputs, kwargs, device=follow)
                        for site, st in shared.stats.items():  # Σx² is NaN/inf iff some input is
                            if not bool(torch.isfinite(st.col_sq).all()):
                                readers = [p for p in targets if shared.site.get(p) == site]
                                raise NonFiniteError(
                                    f"{desc}: the calibration statistics of the input of block {i}'s "
                                    f"{', '.join(readers)} hold NaN or inf "
                                    f"({'the embeddings' if i == 0 else f'blocks 0-{i - 1}, as pruned,'} give "
                                    f"non-finite activations on the calibration data); {DTYPE_HINT}"
                                )
                    for n, path in enumerate(targets):
                        lin = linears[path]
                        st = shared.stats_of(path) if shared is not None else None
                        w = lin.weight.detach().float()
                        if errors:
                            w = w.clone()  # .float() of an fp32 weight is the weight itself
                        new, keep, info = solve(leaf(path), w, st)
                        if not all_finite(new):
                            raise NonFiniteError(
                                f"{desc}: the solver's new weight of {prefix}.{i}.{path}.weight holds NaN or "
                                "inf although its inputs and statistics are finite (a numerically failed "
                                "solve): raise method.damping (sparsegpt, admm), or prune at model.dtype=float32"
                            )
                        lin.weight.copy_(new.to(lin.weight.dtype))
                        key = f"{prefix}.{i}.{path}.weight"
                        masks[key] = keep.cpu()
                        entry = {"sparsity": 1.0 - keep.sum().item() / keep.numel(), **info}
                        if errors and st is not None:
                            entry["rel_error"] = reconstruction_error(w, lin.weight.detach().float(), st)
                        report[key] = entry
                        del w, new, st
                        if shared is not None:
                            shared.release(path, targets[n + 1 :])  # its last reader is solved: free XᵀX
                    del shared
                if inputs is not None and i < last:  # the pruned block feeds the next one
                    run_block(block, inputs, kwargs, spare, follow)
                    inputs.clear()
                    inputs, spare = spare, inputs
        if inputs is not None:
            inputs.clear()
        return masks, report
