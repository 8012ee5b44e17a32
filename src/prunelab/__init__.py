"""prunelab: prune large language models and recover them with LoRA, every method under one
protocol. A library (``prunelab.prune``, ``recover``, ``evaluate``, ``run``) with the
``prunelab`` command on top; see ``prunelab.api`` and docs/."""

from prunelab.api import (
    PruneResult,
    RecoverResult,
    RunResult,
    compose,
    evaluate,
    load_model,
    options_of,
    prune,
    recover,
    run,
)
from prunelab.errors import ConfigError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "PruneResult",
    "RecoverResult",
    "RunResult",
    "__version__",
    "compose",
    "evaluate",
    "load_model",
    "options_of",
    "prune",
    "recover",
    "run",
]
