"""Weights & Biases: one run per job, grouped per sweep, offline unless configured.

``logger=none`` disables it. The run id is derived from the run directory and the config,
so a resumed job continues its W&B run instead of starting a second one, while a new config
in a reused directory gets a run of its own. Stages log their own step counters as a
``stage_step`` field, never as W&B's step: a stage redone after a kill starts again at 0,
and W&B would drop steps lower than ones it has already seen.

W&B never holds a job up: ``wandb.init`` waits at most ``logger.init_timeout_s`` seconds (W&B's
own ``init_timeout`` setting); when an online init fails (timeout, unreachable server, refused
key), the run goes on logging offline, with a warning — ``wandb sync`` uploads it later.
"""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prunelab.errors import ConfigError, bad_value

LOGGERS = ("wandb", "none")
MODES = ("offline", "online", "disabled", "shared")  # wandb.init's modes (less the legacy aliases)


def wandb_credentials() -> bool:
    """Whether W&B has a key to log in with, as wandb looks for one: ``WANDB_API_KEY`` (or an
    identity token file), else the netrc entry of the W&B host (``wandb login`` writes it)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    try:
        return netrc.netrc(path).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_logger(cfg: Any) -> None:
    """Cheap checks of the ``logger`` node: a known logger and mode, and a key for online mode
    (otherwise wandb stops the job to ask for one, or fails after the model loaded)."""
    if cfg.name not in LOGGERS:
        raise bad_value("logger.name", cfg.name, LOGGERS)
    if cfg.name == "none":
        return
    if cfg.mode not in MODES:
        raise bad_value("logger.mode", cfg.mode, MODES)
    if cfg.mode == "online" and not wandb_credentials():
        raise ConfigError(
            "logger.mode='online' needs a W&B API key and none was found (WANDB_API_KEY, or `wandb login`'s "
            "netrc entry); allowed without one: logger.mode=offline (sync later with `wandb sync`) or logger=none"
        )


log = logging.getLogger(__name__)


class NullTracker:
    run_id: str | None = None

    def log(self, data: dict, step: int | None = None) -> None:
        pass

    def summary(self, data: dict) -> None:
        pass

    def image(self, key: str, path: str | Path) -> None:
        pass

    def table(self, key: str, rows: list[dict]) -> None:
        pass

    def artifact(self, name: str, path: str | Path, kind: str = "model") -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


class WandbTracker:
    def __init__(
        self,
        cfg: Any,
        run_dir: Path,
        config: dict,
        name: str,
        group: str | None,
        tags: list[str],
        key: str = "",
        job_type: str | None = None,
    ) -> None:
        import wandb

        # key: a hash of the config keys that change results (the runner's), not logger/device
        run_id = hashlib.sha1((str(Path(run_dir).resolve()) + key).encode()).hexdigest()[:16]
        self.run_id = run_id
        self.mode = str(cfg.mode)
        kwargs = dict(
            project=cfg.project,
            entity=cfg.entity,
            group=group,
            job_type=job_type,
            name=name,
            tags=tags,
            config=config,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            reinit="finish_previous",
        )
        timeout = float(cfg.get("init_timeout_s") or 90.0)
        try:
            self.run = wandb.init(mode=self.mode, settings=wandb.Settings(init_timeout=timeout), **kwargs)
        except Exception as e:  # wandb.errors.CommError on a timeout; others for a refused key
            if self.mode != "online":
                raise
            log.warning(
                "W&B: wandb.init online failed (%s: %s; logger.init_timeout_s=%g); logging offline instead, "
                "upload later with `wandb sync %s/wandb/offline-run-*`",
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
                timeout,
                run_dir,
            )
            self.mode = "offline"
            wandb.teardown()  # the service still holds the run id of the attempt that timed out
            self.run = wandb.init(mode="offline", settings=wandb.Settings(init_timeout=timeout), **kwargs)

    def log(self, data: dict, step: int | None = None) -> None:
        payload = flatten(data)
        if step is not None:
            payload["stage_step"] = step
        self.run.log(payload)

    def summary(self, data: dict) -> None:
        self.run.summary.update(flatten(data))

    def image(self, key: str, path: str | Path) -> None:
        """A figure the run produced (a PNG file), shown in the run's media panel."""
        import wandb

        self.run.log({key: wandb.Image(str(path))})

    def table(self, key: str, rows: list[dict]) -> None:
        """Rows of dicts as a W&B table (the run summary, the per-layer plan)."""
        import wandb

        if not rows:
            return
        columns = list(dict.fromkeys(k for r in rows for k in r))
        self.run.log({key: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})

    def artifact(self, name: str, path: str | Path, kind: str = "model") -> None:
        """A folder (the pruned / recovered checkpoint) as a versioned W&B artifact."""
        import wandb

        art = wandb.Artifact(name, type=kind)
        art.add_dir(str(path))
        self.run.log_artifact(art)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
