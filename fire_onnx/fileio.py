"""Small file helpers: atomic writes and safe npz loading."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from fire_onnx.errors import FireError


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; move it onto ``dest`` only if the block succeeds.

    A failure (or Ctrl-C) leaves no partial file behind and ``dest`` untouched.
    """
    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise FireError(f"output folder does not exist: {parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(dest: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(dest, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_npz(path: str | os.PathLike, what: str = "npz file") -> dict[str, np.ndarray]:
    """Load every array of an npz file without ever unpickling; user errors become FireError."""
    path = Path(path)
    if not path.is_file():
        raise FireError(f"{what} not found: {path}")
    if not zipfile.is_zipfile(path):
        raise FireError(f"{what} {path} is not a valid npz file (not a zip archive of .npy arrays)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise FireError(
                f"{what} {path} contains pickled objects, which fire-onnx refuses to load "
                "(save plain numeric/string arrays only)"
            ) from None
        raise FireError(f"{what} {path} is not a valid npz file: {e}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise FireError(f"{what} {path} is not a valid npz file: {e}") from None
