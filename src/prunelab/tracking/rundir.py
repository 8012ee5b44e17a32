"""A run directory that remembers which stages finished — and trusts them only while intact.

Each stage writes its output files, then ``stages/<name>.json`` (atomically, via rename): the
stage's record plus the size, mtime and sha256 of every output file (``files``) and the
library versions it ran under (``environment``). A rerun of the same config loads finished
stages instead of repeating them, after checking their files against the record (``verify``:
``hash`` re-hashes, ``fast`` compares sizes and mtimes; both check that safetensors files are
complete). A damaged or missing file makes the stage count as not done (a warning, then it
is redone); a stage that is redone invalidates the stages that read its output
(``DEPENDS``). A run directory that holds a *different* resolved config, or stages computed
from other weights (``identity.json``), is refused rather than silently mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import struct
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prunelab.errors import ConfigError

log = logging.getLogger(__name__)
VERIFY = ("hash", "fast")
# The packages whose version can change a run's numbers (model code, kernels, LoRA, task
# definitions, tokenization, data processing, prunelab itself).
ENV_PACKAGES = ("torch", "transformers", "peft", "lm_eval", "tokenizers", "datasets", "safetensors")


def unique_tmp(path: Path) -> Path:
    """A temporary name beside ``path`` that no other writer (process or thread) uses."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_json(path: Path, data: Any) -> None:
    """Atomically: a uniquely named temporary file in the same folder, then a rename, so
    concurrent writers (two runs sharing the dense cache) never clobber each other's halves."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp(path)
    try:
        with open(tmp, "x") as f:  # "x": never an existing file; mode from the umask, as before
            f.write(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any | None:
    """The document at ``path``, or None where it is missing or not valid JSON (a torn or
    damaged file: the caller redoes what it held)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError, OSError) as e:
        log.warning("%s is damaged (%s): ignored", path, e)
        return None


def same_config(a: Any, b: Any) -> bool:
    """Equal configs, where a key one side lacks counts as null: a key added to prunelab with
    a null default (``recovery.patience``) does not orphan run directories made before it."""
    if isinstance(a, dict) and isinstance(b, dict):
        return all(same_config(a.get(k), b.get(k)) for k in set(a) | set(b))
    return a == b


# ---------------------------------------------------------------- environment
_ENV: dict[str, str | None] = {}


def _prunelab_source() -> str | None:
    """The git commit of prunelab's source (``+dirty`` with uncommitted changes), when it runs
    from a checkout; None for an installed wheel."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
            cwd=here.parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip()[:12] + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, str | None]:
    """Versions that can change results: python, the ENV_PACKAGES, prunelab (+ its git commit).
    Once per process."""
    if not _ENV:
        from importlib.metadata import PackageNotFoundError, version

        import prunelab

        _ENV["python"] = ".".join(map(str, sys.version_info[:3]))
        for name in ENV_PACKAGES:
            try:
                _ENV[name] = version(name.replace("_", "-") if name == "lm_eval" else name)
            except PackageNotFoundError:
                _ENV[name] = None
        _ENV["prunelab"] = prunelab.__version__
        _ENV["prunelab_source"] = _prunelab_source()
    return dict(_ENV)


def env_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list]:
    """``{package: [old, new]}`` for every version that differs."""
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


# ---------------------------------------------------------------- output files
def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is incomplete (its header promises more bytes than the file
    holds, or no valid header), or None. Reads the header only: cheap at any size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return f"{size} bytes: no safetensors header"
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                return f"header of {n} bytes in a file of {size} bytes"
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        return f"unreadable safetensors header ({e})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    need = 8 + n + max(ends, default=0)
    return f"{size} bytes, the header describes {need}" if need != size else None


# Files in a stage's output folders that are never recorded nor checked: model cards, written
# into pruned/ and recovered/model/ when the whole run ends (after the stages were recorded)
# and rewritten by every later run of the directory; no stage reads them.
NOT_RECORDED = frozenset({"README.md"})


def _output_files(root: Path, outputs: Iterable[str]) -> list[Path]:
    files = []
    for rel in outputs:
        p = root / rel
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.name not in NOT_RECORDED)
    return files


def file_records(root: Path, outputs: Iterable[str]) -> dict[str, dict]:
    """``{relative path: {size, mtime_ns, sha256}}`` of every file under ``outputs`` (files or
    folders relative to ``root``; absent ones skipped). Only these are checked on resume: a
    file added to an output folder later is ignored."""
    out = {}
    for f in _output_files(root, outputs):
        st = f.stat()
        out[f.relative_to(root).as_posix()] = {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256": sha256_file(f),
        }
    return out


def file_problems(root: Path, files: Mapping[str, Mapping], verify: str = "hash") -> list[str]:
    """What no longer matches the recorded ``files``: missing, another size, an incomplete
    safetensors file, then (``hash``) another sha256 or (``fast``) another mtime."""
    problems = []
    for rel, want in files.items():
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
            continue
        st = p.stat()
        if st.st_size != want["size"]:
            problems.append(f"{rel} has {st.st_size} bytes, {want['size']} were written")
            continue
        if p.suffix == ".safetensors" and (why := safetensors_problem(p)):
            problems.append(f"{rel} is incomplete: {why}")
            continue
        if verify == "fast":
            if st.st_mtime_ns != want["mtime_ns"]:
                problems.append(f"{rel} was modified after it was written (mtime)")
        elif sha256_file(p) != want["sha256"]:
            problems.append(f"{rel} does not match the sha256 recorded when it was written")
    return problems


# ---------------------------------------------------------------- the run directory
class RunDir:
    """``stages``: the stages' order; ``depends``: for a stage, the stages whose output it
    reads; ``outputs``: for a stage, the files/folders (relative to the run dir) later stages
    and results.json read — hashed when it finishes, verified when it is resumed; ``work``: the
    folders a stage resumes partial work from (training checkpoints), deleted when an upstream
    stage is redone (that work was done on the old output)."""

    def __init__(
        self,
        root: Path,
        config: dict,
        weights: str | None = None,
        verify: str = "hash",
        depends: Mapping[str, Iterable[str]] | None = None,
        outputs: Mapping[str, Iterable[str]] | None = None,
        work: Mapping[str, Iterable[str]] | None = None,
        weights_files: list | None = None,
        weights_resolved: bool = True,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.stages = self.root / "stages"
        self.verify = verify
        self.depends = {k: tuple(v) for k, v in (depends or {}).items()}
        self.outputs = {k: tuple(v) for k, v in (outputs or {}).items()}
        self.work = {k: tuple(v) for k, v in (work or {}).items()}
        self.env = environment()
        self.env_mismatch: dict[str, dict] = {}
        saved = self.root / "config.json"
        finished = self.finished_stages()
        if saved.exists() and finished:
            old = read_json(saved)
            new = json.loads(json.dumps(config, default=str))
            if old is not None and not same_config(old, new):
                diff = sorted(k for k in set(old) | set(new) if not same_config(old.get(k), new.get(k)))
                raise ConfigError(
                    f"run directory {self.root} holds finished stages of a different config (differs in: "
                    f"{', '.join(diff)}); choose another output_root/run dir or delete that directory"
                )
        ident_path = self.root / "identity.json"
        ident = read_json(ident_path) if finished else None
        if weights is not None and ident is not None and ident.get("model_weights") not in (None, weights):
            if ident.get("weights_resolved", True) and weights_resolved:
                changed = _changed_files(ident.get("model_files") or [], weights_files or [])
                raise ConfigError(
                    f"run directory {self.root} holds finished stages ({', '.join(finished)}) computed from "
                    f"other weights: model fingerprint {ident['model_weights']} then, {weights} now"
                    + (f" ({changed})" if changed else "")
                    + "; the model folder changed since. Delete that directory (or choose another "
                    "output_root) to prune the new weights"
                )
            log.warning(
                "run directory %s: the weights' fingerprint was %s and is %s now, and one of them is an "
                "unpinned hub revision whose commit is unknown here: resuming, but pin model.revision",
                self.root,
                ident["model_weights"],
                weights,
            )
        if ident is None or not finished:  # a fresh run (or one without finished stages)
            write_json(
                ident_path,
                {
                    "model_weights": weights,
                    "weights_resolved": weights_resolved,
                    "model_files": weights_files,
                    "environment": self.env,
                },
            )
        write_json(saved, config)

    def finished_stages(self) -> list[str]:
        return sorted(p.stem for p in self.stages.glob("*.json")) if self.stages.exists() else []

    def _dependents(self, stage: str) -> list[str]:
        """Every stage that reads ``stage``'s output, directly or through another."""
        out: list[str] = []
        frontier = [stage]
        while frontier:
            s = frontier.pop()
            for child, parents in self.depends.items():
                if s in parents and child not in out:
                    out.append(child)
                    frontier.append(child)
        return out

    def invalidate_after(self, stage: str) -> list[str]:
        """``stage`` is (re)done: the records of the stages that read its output go, and their
        partial work with them. Returns the stages whose records were removed."""
        gone = []
        for child in self._dependents(stage):
            rec = self.stages / f"{child}.json"
            if rec.exists():
                rec.unlink()
                gone.append(child)
            for rel in (*self.work.get(child, ()), *self.outputs.get(child, ())):
                p = self.root / rel
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        if gone:
            log.warning("stage %s is redone: the records of %s are invalid now", stage, ", ".join(gone))
        return gone

    def done(self, stage: str) -> dict | None:
        """The stage's record if it finished and its files are intact; else None (the caller
        redoes it), after invalidating the stages downstream of it."""
        path = self.stages / f"{stage}.json"
        rec = read_json(path) if path.exists() else None
        if rec is not None:
            problems = self._problems(stage, rec)
            if problems:
                log.warning(
                    "stage %s finished earlier but its files are damaged — redoing it: %s",
                    stage,
                    "; ".join(problems),
                )
                rec = None
        if rec is None:
            path.unlink(missing_ok=True)
            self.invalidate_after(stage)
            return None
        if diff := env_diff(rec.get("environment") or {}, self.env):
            self.env_mismatch[stage] = diff
            log.warning(
                "stage %s ran under other versions (%s); resumed as it is (delete stages/%s.json to redo it)",
                stage,
                ", ".join(f"{k} {a} → {b}" for k, (a, b) in diff.items()),
                stage,
            )
        return rec

    def _problems(self, stage: str, rec: dict) -> list[str]:
        if "files" in rec:
            return file_problems(self.root, rec["files"], self.verify)
        # a record written before prunelab recorded files: at least every expected output
        # is there and complete; its hashes are recorded now, so later resumes check them
        outputs = self.outputs.get(stage, ())
        files = _output_files(self.root, outputs)
        problems = [
            f"{f.relative_to(self.root)} is incomplete: {why}"
            for f in files
            if f.suffix == ".safetensors" and (why := safetensors_problem(f))
        ]
        if outputs and not files:
            problems.append(f"none of its outputs ({', '.join(outputs)}) exist")
        if not problems:
            log.warning(
                "stage %s was recorded without file hashes (an older prunelab): hashing them now", stage
            )
            rec["files"] = file_records(self.root, outputs)
            write_json(self.stages / f"{stage}.json", rec)
        return problems

    def finish(self, stage: str, record: dict) -> dict:
        """Record ``stage`` as done: its record, the hashes of its outputs, the versions it ran
        under. Written last, so a stage killed before this line is simply redone."""
        files = file_records(self.root, self.outputs.get(stage, ()))
        for rel in files:
            if rel.endswith(".safetensors") and (why := safetensors_problem(self.root / rel)):
                raise RuntimeError(
                    f"stage {stage} wrote an incomplete file {rel} ({why}); not recorded as done"
                )
        record = {
            **record,
            "files": files,
            "environment": self.env,
        }
        write_json(self.stages / f"{stage}.json", record)
        return record


def _changed_files(old: list, new: list) -> str:
    """Which files of a local model folder differ (name, size, mtime)."""
    a = {row[0]: tuple(row[1:]) for row in old}
    b = {row[0]: tuple(row[1:]) for row in new}
    changed = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
    return (
        "changed files: " + ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "") if changed else ""
    )
