"""``.npz`` files written as a stream: arrays far larger than memory go in chunk by chunk, atomically.

``np.savez`` needs every array in memory; ``write_npz`` writes each ``.npy`` member of the zip from an
iterator of chunks instead (the header first, then the raw bytes), so a 50k-sample ``samples.npz`` never
sits in memory. The result is an ordinary ``.npz`` (``np.load`` and the ADM evaluator read it).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..artifacts import atomic_write_path

# a member given as (shape, dtype, chunks): chunks are arrays whose rows concatenate to ``shape``
Streamed = tuple[tuple[int, ...], np.dtype | type, Iterable[np.ndarray]]


def write_npz(path: Path, arrays: dict[str, np.ndarray | np.generic | Streamed]) -> Path:
    """Write ``arrays`` (plain arrays or ``Streamed`` triples) to ``path`` through a temporary file."""
    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, value in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    if isinstance(value, tuple):
                        _write_streamed(member, name, *value)
                    else:
                        np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)

    return atomic_write_path(path, write)


def _write_streamed(member, name: str, shape: tuple[int, ...], dtype, chunks: Iterable[np.ndarray]) -> None:
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(member, header)  # what np.save writes; the ADM evaluator reads 1.0 and 2.0
    rows = 0
    for chunk in chunks:
        chunk = np.ascontiguousarray(chunk, dtype=dtype)
        if chunk.shape[1:] != tuple(shape[1:]):
            raise ValueError(f"{name}: chunk of shape {chunk.shape} in an array of shape {shape}")
        member.write(chunk.tobytes())
        rows += len(chunk)
    if rows != shape[0]:
        raise ValueError(f"{name}: wrote {rows} rows of the {shape[0]} announced")


# ------------------------------------------------------------------------------------------- reading
def npz_member(path: Path, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the array ``name`` of an ``.npz`` from its ``.npy`` header alone (no data read)."""
    with zipfile.ZipFile(Path(path)) as archive, archive.open(_member_name(archive, path, name)) as member:
        shape, _, dtype = _read_header(member, path, name)
    return shape, dtype


def iter_npz_rows(path: Path, name: str, rows: int, start: int = 0,
                  stop: int | None = None) -> Iterator[np.ndarray]:
    """Rows ``start..stop-1`` of the array ``name`` of an ``.npz``, ``rows`` at a time, each chunk read from the
    zip member as a stream: only one chunk is ever in memory (``np.load`` reads the whole member; its
    ``mmap_mode`` is ignored inside an ``.npz``). Works for stored (``np.savez``, ``write_npz``) and
    compressed (``np.savez_compressed``) members alike; a skipped prefix of a compressed member is decoded
    and dropped chunk by chunk."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    with zipfile.ZipFile(Path(path)) as archive, archive.open(_member_name(archive, path, name)) as member:
        shape, fortran, dtype = _read_header(member, path, name)
        if fortran and len(shape) > 1:
            raise ValueError(f"{path}: {name} is stored in Fortran order; rows cannot be streamed")
        total = shape[0] if shape else 1
        stop = total if stop is None else min(stop, total)
        row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        if start:
            _skip(member, start * row_bytes, rows * row_bytes)
        for first in range(start, stop, rows):
            n = min(rows, stop - first)
            data = _read_exactly(member, n * row_bytes, path, name)
            yield np.frombuffer(data, dtype=dtype).reshape(n, *shape[1:])


def _member_name(archive: zipfile.ZipFile, path: Path, name: str) -> str:
    names = archive.namelist()
    if f"{name}.npy" in names:
        return f"{name}.npy"
    if name in names:
        return name
    arrays = sorted(n.removesuffix(".npy") for n in names)
    raise KeyError(f"{path} has no array {name!r} (it has {', '.join(arrays)})")


def _read_header(member, path: Path, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(member)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in reader:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran, dtype = reader[version](member)
    except ValueError as error:
        raise ValueError(f"{path}: {name} is not a readable .npy member ({error})") from None
    if dtype.hasobject:
        raise ValueError(f"{path}: {name} holds Python objects (not read: allow_pickle=False)")
    return tuple(shape), bool(fortran), dtype


def _read_exactly(member, size: int, path: Path, name: str) -> bytes:
    parts, left = [], size
    while left > 0:
        chunk = member.read(left)
        if not chunk:
            raise ValueError(f"{path}: {name} ends early (truncated file)")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def _skip(member, size: int, step: int) -> None:
    """Move ``size`` bytes forward: a seek in a stored member, decode-and-drop (``step`` bytes at a time) in a
    compressed one."""
    while size > 0:
        read = len(member.read(min(step, size)))
        if not read:
            return
        size -= read
