"""Where prunelab's files live, for a source checkout and for a wheel install alike."""

from __future__ import annotations

from pathlib import Path


def conf_dir() -> Path:
    """The Hydra config root: packaged ``prunelab/conf`` (wheel) or the repo's top-level ``conf/``."""
    packaged = Path(__file__).parent / "conf"  # the wheel force-includes conf/ here
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "conf"
