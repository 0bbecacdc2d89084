"""Atomic file output: write to a temporary file in the target folder, then rename over the target.

A reader (a viewer, a second process, a crashed run restarted) therefore sees either the old complete file or the
new complete file, never a half-written one. ``os.replace`` is atomic only within one file system, which is why the
temporary file always lives in the target's own folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["atomic_write", "atomic_save", "write_json", "to_jsonable"]

PathLike = str | os.PathLike


def _umask() -> int:
    # os.umask can only be read by setting it; restore immediately.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _finalise(temp_path: str, path: Path) -> None:
    # mkstemp creates files with mode 0600; give the result the permissions a plain open() would have.
    os.chmod(temp_path, 0o666 & ~_umask())
    os.replace(temp_path, path)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; rename it onto ``path`` when the block succeeds.

    If the block raises, the temporary file is removed and an existing ``path`` is left untouched.
    Missing parent folders are created.

    Args:
        path: the final file name.
        mode: ``"wb"`` (bytes) or ``"w"`` (text).
        encoding: text encoding for ``mode="w"`` (default UTF-8).

    Example::

        with atomic_write("cases.csv", "w") as f:
            df.to_csv(f, index=False)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write supports mode 'w' or 'wb', not {mode!r} (writing {path}).")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_path = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        text_encoding = (encoding or "utf-8") if mode == "w" else None
        with os.fdopen(fd, mode, encoding=text_encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _finalise(temp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        raise


def _full_suffix(path: Path) -> str:
    # Libraries pick the format from the extension (".nii.gz" -> gzipped NIfTI, ".seg.nrrd" -> NRRD), so the
    # temporary name must end with the complete multi-part extension of the target.
    return "".join(path.suffixes)


def atomic_save(path: PathLike, writer_fn: Callable[[str], Any]) -> Path:
    """Atomically produce ``path`` with a library that insists on writing to a file name itself.

    ``writer_fn`` is called with a temporary file name in the same folder that has the same extension as ``path``
    (for example ``.tmp-<hex>.nii.gz``); once it returns, the temporary file is renamed onto ``path``. If it raises,
    the temporary file is removed and an existing ``path`` is left untouched.

    Args:
        path: the final file name.
        writer_fn: ``writer_fn(temp_name: str)`` writes the whole file to ``temp_name``.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Example::

        atomic_save("map.nii.gz", lambda name: nib.save(image, name))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = str(path.parent / f".tmp-{uuid.uuid4().hex}{_full_suffix(path)}")
    try:
        writer_fn(temp_path)
        if not os.path.isfile(temp_path):
            raise RuntimeError(f"The writer for {path} returned without creating the file it was given ({temp_path}).")
        _finalise(temp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        raise
    return path


def to_jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays, paths and non-finite floats to plain JSON values.

    NaN and infinities become ``None`` (JSON has no NaN; ``null`` is what other tools read as "missing").
    """
    if isinstance(obj, Mapping):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(value) for value in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # torch.Tensor without importing torch
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def write_json(path: PathLike, obj: Any, indent: int = 2) -> Path:
    """Atomically write ``obj`` as UTF-8 JSON (numpy/torch values converted, NaN written as ``null``).

    Returns:
        ``path`` as a :class:`pathlib.Path`.
    """
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, sort_keys=False)
    with atomic_write(path, "w") as handle:
        handle.write(text + "\n")
    return Path(path)
