"""A run directory that remembers which stages finished.

Each stage writes its output, then ``stages/<name>.json`` (atomically, via rename). A rerun
of the same config loads finished stages instead of repeating them. A run directory that
holds a *different* resolved config is refused rather than silently mixed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prunelab.errors import ConfigError


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def same_config(a: Any, b: Any) -> bool:
    """Equal configs, where a key one side lacks counts as null: a key added to prunelab with
    a null default (``recovery.patience``) does not orphan run directories made before it."""
    if isinstance(a, dict) and isinstance(b, dict):
        return all(same_config(a.get(k), b.get(k)) for k in set(a) | set(b))
    return a == b


class RunDir:
    def __init__(self, root: Path, config: dict) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.stages = self.root / "stages"
        saved = self.root / "config.json"
        if saved.exists() and self.finished_stages():
            old = json.loads(saved.read_text())
            new = json.loads(json.dumps(config, default=str))
            if not same_config(old, new):
                diff = sorted(k for k in set(old) | set(new) if not same_config(old.get(k), new.get(k)))
                raise ConfigError(
                    f"run directory {self.root} holds finished stages of a different config (differs in: "
                    f"{', '.join(diff)}); choose another output_root/run dir or delete that directory"
                )
        write_json(saved, config)

    def finished_stages(self) -> list[str]:
        return sorted(p.stem for p in self.stages.glob("*.json")) if self.stages.exists() else []

    def done(self, stage: str) -> dict | None:
        path = self.stages / f"{stage}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def finish(self, stage: str, record: dict) -> dict:
        write_json(self.stages / f"{stage}.json", record)
        return record
