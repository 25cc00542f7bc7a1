"""Small file helpers: output checks, atomic writes, safe npz and JSON loading."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from fire_onnx.errors import FireError, first_line


def is_special(p: Path) -> bool:
    """An existing output that is neither a regular file nor a folder (a device such as /dev/null, a pipe)."""
    try:
        mode = p.stat().st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def output_parent(dest: Path) -> Path:
    """The folder ``dest`` will be written in; a missing folder or a ``dest`` that is a folder is a FireError."""
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise FireError(f"output folder does not exist: {parent}")
    if dest.is_dir():
        raise FireError(f"output {dest} is a folder; name a file to write")
    return parent


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _probe_writable(folder: Path) -> None:
    """Create and remove a temporary file in ``folder``: the one sure test that an output can be written
    there (permissions, read-only file systems, ACLs; root passes permission bits, as it should)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".fire-onnx-check.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise FireError(f"cannot write to the output folder {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)


def check_outputs(outputs: Iterable[str | os.PathLike | None],
                  inputs: Iterable[str | os.PathLike | None] = (), *, special_ok: bool = True) -> None:
    """Check, before any work, that every output file can be written; raise FireError otherwise.

    ``None`` and ``"-"`` (stdout) entries are skipped. An output must not be an existing folder, nor
    one of ``inputs`` (fire-onnx never overwrites its input: same path, symlink or hard link), nor be
    named twice; its folder must exist and accept a new file. An existing device or pipe (``/dev/null``)
    is accepted when writable and ``special_ok`` (it is written in place); model outputs, which are
    moved into place with their external data, pass ``special_ok=False``.
    """
    ins = [Path(p) for p in inputs if p is not None and str(p) not in ("", "-")]
    seen: list[Path] = []
    for out in outputs:
        if out is None or str(out) in ("", "-"):
            continue
        p = Path(out)
        for q in ins:
            if _same_file(p, q) or (not p.exists() and p.absolute() == q.absolute()):
                raise FireError(f"output {out} is one of the inputs; fire-onnx never overwrites its input")
        for q in seen:
            if _same_file(p, q) or p.absolute() == q.absolute():
                raise FireError(f"output {out} is named twice; give each output its own path")
        seen.append(p)
        if p.is_dir():
            raise FireError(f"output {out} is a folder; name a file to write")
        if is_special(p):
            if not special_ok:
                raise FireError(f"output {out} is not a regular file (a device or a pipe); name a file to write")
            if not os.access(p, os.W_OK):
                raise FireError(f"cannot write to {out} (permission denied)")
            continue
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.exists():
            raise FireError(f"output folder does not exist: {parent}")
        if not parent.is_dir():
            raise FireError(f"output folder {parent} is not a folder")
        _probe_writable(parent)


def check_output_folder(folder: str | os.PathLike) -> None:
    """Check, before any work, that ``folder`` is (or can be made) a writable folder; raise FireError otherwise."""
    p = Path(folder)
    if p.exists():
        if not p.is_dir():
            raise FireError(f"output folder {folder} exists and is not a folder")
        _probe_writable(p)
        return
    base = p.absolute().parent
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise FireError(f"cannot create the output folder {folder}: {base} is not a folder")
    _probe_writable(base)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; move it onto ``dest`` only if the block succeeds.

    A failure (or Ctrl-C) leaves no partial file behind and ``dest`` untouched.
    """
    dest = Path(dest)
    if is_special(dest):  # /dev/null, a named pipe: written in place, never replaced by a regular file
        yield dest
        return
    parent = output_parent(dest)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise FireError(f"cannot write to the output folder {parent} ({e.strerror or e})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def umask() -> int:
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


MAX_JSON_DEPTH = 64


def loads_json(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for untrusted text: every problem (bad syntax, nesting deeper than ``max_depth``,
    integers too long to convert) raises ValueError, never RecursionError."""
    if not isinstance(text, str):
        raise ValueError(f"is not text ({type(text).__name__})")
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError("is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, or an integer literal too long for int()
        raise ValueError(f"is not valid JSON ({getattr(e, 'msg', None) or first_line(e)})") from None
    stack = [(value, 1)]
    while stack:  # iterative: a deep value must not recurse here either
        v, depth = stack.pop()
        if isinstance(v, (list, dict)):
            if depth > max_depth:
                raise ValueError(f"is nested more than {max_depth} levels deep")
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return value


def is_int(v: Any) -> bool:
    """A JSON integer (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite JSON number (not a bool, not an integer too large for a float)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False



def _npy_header(fp, name: str) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, header length) of the .npy member open in ``fp``; ValueError if unusable."""
    fmt = np.lib.format
    version = fmt.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = fmt.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, _, dtype = fmt.read_array_header_2_0(fp)
    else:
        raise ValueError(f"array {name} has unsupported .npy format version {version}")
    if dtype.hasobject:
        raise PickleRefused(name)
    if any(d < 0 for d in shape):
        raise ValueError(f"array {name} has a negative dimension in its shape {shape}")
    return shape, dtype, fp.tell()


class PickleRefused(ValueError):
    pass


def load_npz(path: str | os.PathLike, what: str = "npz file") -> dict[str, np.ndarray]:
    """Load every array of an npz file without ever unpickling; user errors become FireError.

    Each member's .npy header is read first: object arrays are refused (they need pickle), and an
    array whose header claims more bytes than the member holds is refused before any memory is
    allocated for it (a crafted header cannot make fire-onnx allocate terabytes).
    """
    path = Path(path)
    if not path.is_file():
        raise FireError(f"{what} not found: {path}")
    if not zipfile.is_zipfile(path):
        raise FireError(f"{what} {path} is not a valid npz file (not a zip archive of .npy arrays)")
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                name = info.filename
                if not name.endswith(".npy"):
                    raise ValueError(f"member {name!r} is not a .npy array")
                key = name[: -len(".npy")]
                with zf.open(info) as fp:
                    shape, dtype, offset = _npy_header(fp, key)
                count = math.prod(shape)
                held = info.file_size - offset
                if count * dtype.itemsize > held:
                    raise ValueError(f"array {key} claims shape {shape} of {dtype} ({count * dtype.itemsize:,} bytes) "
                                     f"but holds {max(held, 0):,} bytes")
                with zf.open(info) as fp:
                    arrays[key] = np.lib.format.read_array(fp, allow_pickle=False)
    except PickleRefused:
        raise FireError(
            f"{what} {path} contains pickled objects, which fire-onnx refuses to load "
            "(save plain numeric/string arrays only)"
        ) from None
    except Exception as e:  # noqa: BLE001  untrusted bytes: zipfile and numpy's header parser raise many types
        # (ValueError, EOFError, BadZipFile, tokenize.TokenError, RecursionError, MemoryError, ...)
        if isinstance(e, ValueError) and "allow_pickle" in str(e):
            raise FireError(f"{what} {path} contains pickled objects, which fire-onnx refuses to load "
                            "(save plain numeric/string arrays only)") from None
        msg = "out of memory" if isinstance(e, MemoryError) else first_line(e)
        msg = msg if len(msg) <= 200 else msg[:200] + "..."
        raise FireError(f"{what} {path} is not a valid npz file: {msg}") from None
    return arrays
