"""Optional 2:4 semi-structured sparse kernels for inference (``eval.semi_structured=true``).

torch's ``to_sparse_semi_structured`` stores a 2:4-sparse weight compressed and multiplies
it with NVIDIA's sparse tensor cores. It needs a CUDA GPU of compute capability ≥ 8.0
(Ampere or newer) and float16 / bfloat16 weights; elsewhere — CPUs included — prunelab
says so and evaluates the same weights stored dense (identical results, no speed-up).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def support(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """(supported, reason) for semi-structured sparse linears on ``device`` at ``dtype``."""
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError:
        return False, f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    if device.type != "cuda":
        return False, (
            f"semi-structured (2:4) sparse kernels need a CUDA GPU with compute capability ≥ 8.0; "
            f"this run computes on {device.type}, so the 2:4 weights are evaluated stored dense"
        )
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 0):
        return (
            False,
            f"semi-structured (2:4) kernels need compute capability ≥ 8.0; this GPU has {cap[0]}.{cap[1]}",
        )
    if dtype not in (torch.float16, torch.bfloat16):
        return False, f"semi-structured (2:4) kernels need model.dtype float16 or bfloat16, not {dtype}"
    return True, "ok"


@contextlib.contextmanager
def semi_structured(model: nn.Module, names: list[str]) -> Iterator[dict]:
    """Within the block, the listed weights (2:4 sparse) are semi-structured sparse tensors;
    afterwards the original dense parameters are back. Yields a report of what happened."""
    p0 = next(model.parameters())
    ok, reason = support(p0.device, p0.dtype)
    report: dict = {"requested": True, "used": False, "reason": reason, "converted": 0}
    if not ok:
        yield report
        return
    from torch.sparse import to_sparse_semi_structured

    modules = dict(model.named_modules())
    originals: list[tuple[nn.Module, nn.Parameter]] = []
    try:
        for name in names:
            mod = modules[name.rsplit(".", 1)[0]]
            try:
                sparse_w = to_sparse_semi_structured(mod.weight.detach())
            except (RuntimeError, ValueError) as e:  # e.g. a shape the kernels do not tile
                report.setdefault("skipped", {})[name] = str(e).splitlines()[0]
                continue
            originals.append((mod, mod.weight))
            mod.weight = nn.Parameter(sparse_w, requires_grad=False)
        report.update(used=bool(originals), converted=len(originals))
        yield report
    finally:
        for mod, w in originals:
            mod.weight = w
