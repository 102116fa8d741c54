"""resolve_source: HF folders, .gguf files converted once into the cache, named assets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dspark_jax.checkpoint.assets import ASSETS, asset_gguf, resolve_source
from dspark_jax.checkpoint.gguf import CONVERTER_VERSION
from dspark_jax.checkpoint.hf import CheckpointError
from synthetic_gguf import tiny_gguf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("DSPARK_CACHE", str(folder))
    return folder


def _identity(path):
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def test_gguf_is_converted_once(tmp_path, cache):
    path, _ = tiny_gguf(tmp_path / "tiny.gguf")
    folder = resolve_source(path)
    assert folder.parent == cache / "gguf" and (folder / "config.json").is_file()
    weights = _identity(folder / "model.safetensors")
    assert resolve_source(str(path)) == folder
    assert _identity(folder / "model.safetensors") == weights  # reused, not rewritten

    # a folder made by another converter version is redone
    source = json.loads((folder / "gguf_source.json").read_text())
    (folder / "gguf_source.json").write_text(json.dumps(source | {"converter_version": CONVERTER_VERSION - 1}))
    assert resolve_source(path) == folder
    assert _identity(folder / "model.safetensors") != weights
    assert json.loads((folder / "gguf_source.json").read_text()) == source

    # different content, different folder
    other, _ = tiny_gguf(tmp_path / "tiny.gguf", seed=5)
    assert resolve_source(other) != folder
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == sorted([folder.name, resolve_source(other).name])


def test_folders_and_bad_sources(tmp_path, cache):
    path, _ = tiny_gguf(tmp_path / "tiny.gguf")
    converted = resolve_source(path)
    assert resolve_source(converted) == converted  # an HF folder is used in place
    with pytest.raises(CheckpointError, match="needs config.json"):
        resolve_source(tmp_path)
    with pytest.raises(CheckpointError, match=r"not an HF model folder, a \.gguf file or a named asset; "
                                              r"known assets: \['smollm2-135m-instruct'\]"):
        resolve_source("smollm3-nope")


def test_asset_override_is_verified(tmp_path, cache, monkeypatch):
    asset = ASSETS["smollm2-135m-instruct"]
    wrong, _ = tiny_gguf(tmp_path / "wrong.gguf")
    monkeypatch.setenv(asset.env_var, str(wrong))
    with pytest.raises(CheckpointError, match=f"has sha256 [0-9a-f]{{64}}; asset 'smollm2-135m-instruct' "
                                              f"expects {asset.sha256}"):
        resolve_source(asset.name)
    assert not (cache / asset.name).exists()
    monkeypatch.setenv(asset.env_var, str(tmp_path / "absent.gguf"))
    with pytest.raises(CheckpointError, match="no such file"):
        asset_gguf(asset.name)


@pytest.mark.slow
def test_interrupted_conversion_leaves_nothing_half_written(tmp_path, cache, smollm2_gguf):
    """Kill a conversion mid-write: no folder appears, and the next run clears the leftovers and converts."""
    code = "import sys; from dspark_jax.checkpoint.assets import resolve_source; resolve_source(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code, str(smollm2_gguf)], env=env)
    staged = None
    deadline = time.monotonic() + 120
    while staged is None and time.monotonic() < deadline and proc.poll() is None:
        staged = next((cache / "gguf").glob(".*/model.safetensors"), None) if (cache / "gguf").is_dir() else None
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert staged is not None, "the conversion never started writing"
    folders = list((cache / "gguf").iterdir())
    assert [f.name.startswith(".") for f in folders] == [True]  # only the staging folder

    folder = resolve_source(smollm2_gguf)
    assert [f.name for f in (cache / "gguf").iterdir()] == [folder.name]
    assert json.loads((folder / "gguf_source.json").read_text())["sha256"] == ASSETS["smollm2-135m-instruct"].sha256
