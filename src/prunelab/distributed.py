"""Several processes (``accelerate launch --num_processes N``): who this process is, and the few
collectives data-parallel LoRA recovery needs (docs/performance.md, "Several processes").

A single process (plain ``prunelab``, ``python``, pytest) never touches torch.distributed: the
launcher's ``WORLD_SIZE`` environment variable decides, and accelerate's ``PartialState`` (which
creates the process group: gloo on CPU, NCCL on GPUs) is only built when it is above 1.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch

from prunelab.errors import ConfigError

# The followers wait in a collective while the main process evaluates and prunes (hours at
# 70B); torch's default of 30 minutes would end the run. A failing main process still ends
# them at once: the launcher stops every process when one exits with an error.
TIMEOUT = timedelta(hours=48)

_state: Any = None


def num_processes() -> int:
    """Processes of this launch (1 without a launcher): read from the environment, so a dry
    run and the config checks know it before any process group exists."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _partial_state() -> Any:
    global _state
    if _state is None:
        from accelerate import PartialState

        # without a GPU, accelerate sets up the CPU (gloo) process group only when told ``cpu``
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in (
            "1",
            "true",
        )
        _state = PartialState(cpu=cpu, timeout=TIMEOUT)
        if _state.num_processes != num_processes():
            raise RuntimeError(
                f"accelerate set up {_state.num_processes} process(es) but WORLD_SIZE is {num_processes()}"
            )
    return _state


def rank() -> int:
    """This process's index (0: the main process, which alone writes the run directory)."""
    return _partial_state().process_index if num_processes() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def device(default: torch.device) -> torch.device:
    """The device of this process: its own GPU (local rank) under a launcher, else ``default``."""
    if num_processes() == 1:
        return default
    d = torch.device(_partial_state().device)
    return torch.device("cpu") if d.type == "cpu" else d


def barrier() -> None:
    if num_processes() > 1:
        _partial_state().wait_for_everyone()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the processes, in place (every process gets the same values)."""
    if num_processes() > 1:
        _partial_state()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def broadcast(obj: Any) -> Any:
    """The main process's ``obj`` on every process (a picklable object)."""
    if num_processes() == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    _partial_state()
    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def refuse(what: str, why: str) -> None:
    """A ConfigError for something that cannot run data-parallel (under more than one process)."""
    n = num_processes()
    if n > 1:
        raise ConfigError(
            f"{what} cannot run in {n} processes ({why}); launch it as one process "
            "(plain `prunelab ...`, or `accelerate launch --num_processes 1`). "
            "Only LoRA recovery (recovery=lora*) trains data-parallel"
        )
