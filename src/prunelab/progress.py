"""Progress bars that appear on a terminal and stay out of log files.

``PRUNELAB_PROGRESS=1`` forces them on (e.g. under a pager), ``=0`` off; by default they show
only when stderr is a terminal, so a job's log (a Slurm file, ``prunelab … 2> run.log``) holds
the informative log lines instead of thousands of carriage-return updates.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def enabled() -> bool:
    forced = os.environ.get("PRUNELAB_PROGRESS", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return sys.stderr.isatty()


def bar(iterable: Iterable[Any], desc: str | None = None, disable: bool = False, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, desc=…)`` that is off when not on a terminal (see the module doc)."""
    return tqdm(iterable, desc=desc, disable=disable or not enabled(), **kwargs)


def quiet_libraries() -> None:
    """transformers' and datasets' own bars follow the same rule."""
    if enabled():
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
