"""Coupled structures of the supported families (``structure.arch.FAMILIES``): the only place that knows the model layout.

Everything downstream speaks of units ``(layer, kind)`` with ``n`` groups each, keep-masks
over those groups, and the member slices that move together.
"""

from prunelab.structure.arch import ArchInfo, LayerShape, arch_info
from prunelab.structure.groups import (
    KINDS,
    MASKED_ONLY,
    Member,
    Unit,
    apply_masks,
    full_masks,
    masked_params,
    members,
    prune_physically,
    set_layer_shapes,
    units,
)

__all__ = [
    "KINDS",
    "MASKED_ONLY",
    "ArchInfo",
    "LayerShape",
    "Member",
    "Unit",
    "apply_masks",
    "arch_info",
    "full_masks",
    "masked_params",
    "members",
    "prune_physically",
    "set_layer_shapes",
    "units",
]
