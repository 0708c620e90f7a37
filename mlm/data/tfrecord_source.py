"""Random access to the records of TFRecord files, as a grain data source.

A TFRecord file is a sequence of `uint64 length | uint32 masked crc32c(length) | data |
uint32 masked crc32c(data)` frames. Opening the source scans the frame headers once (seeking over
the data) to index every record; reading record `i` is then one seek and one read, so grain can
shuffle, shard and resume over TFRecords exactly as over ArrayRecord files. Both checksums are
verified; a damaged file raises DataError naming it.

Gzip-compressed files (named `*.gz`, or starting with the gzip magic bytes where a TFRecord header
would not) are read too: a gzip stream cannot be entered in the middle, so each one is decompressed
once into a cache directory (`cache_dir`, by default `$MLM_CACHE_DIR` or `~/.cache/mlm`, under
`tfrecords/`) and the copy is indexed and read like any other file. The copy is keyed by the
file's real path, size and modification time and written atomically, so later runs reuse it and a
changed file gets a new copy. The records, their order and so the batches and resume points are
the same as from the uncompressed file; messages name the `.gz` file.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator, Sequence

import google_crc32c
import numpy as np

from mlm.errors import DataError

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_SUFFIX = ".gz"
CACHE_DIR_VARIABLE = "MLM_CACHE_DIR"
_CHUNK = 1 << 20


def masked_crc32c(data: bytes) -> int:
    """Returns the TFRecord checksum of `data`: crc32c rotated right by 15 bits plus a constant."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _cannot_read(path: str, error: OSError) -> DataError:
    return DataError(
        f"{path}: cannot read ({error.strerror or error}); check the path and its permissions"
    )


class _Where:
    """How messages name a file and a byte offset in it (of the decompressed data for a .gz)."""

    def __init__(self, name: str, compressed: bool):
        self.name = name
        self.compressed = compressed

    def byte(self, offset: int) -> str:
        return f"{'decompressed ' if self.compressed else ''}byte {offset}"


def index_records(path: str, *, name: str | None = None) -> np.ndarray:
    """Returns the byte offset of every record frame in one TFRecord file.

    Args:
      path: an uncompressed TFRecord file.
      name: the file that messages name (default `path`); given, offsets are called
        decompressed bytes (`path` is the decompressed copy of `name`).

    Returns:
      int64 [num_records] offsets of the frame headers.

    Raises:
      DataError: unreadable, gzip-compressed, truncated, or a header checksum does not match.
    """
    where = _Where(name or path, compressed=name is not None)
    offsets = []
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as file:
            if name is None and _starts_gzip(file.read(_HEADER.size)):
                raise DataError(
                    f"{path}: is gzip-compressed; read it through TFRecordDataSource (which "
                    "decompresses it once into a cache) or decompress it (gunzip)"
                )
            offset = 0
            while offset < size:
                file.seek(offset)
                header = file.read(_HEADER.size)
                length = _check_header(where, offset, header)
                end = offset + _HEADER.size + length + _FOOTER.size
                if end > size:
                    raise DataError(
                        f"{where.name}: truncated record at {where.byte(offset)} (needs {end} "
                        f"bytes, file has {size}); the file is incomplete: copy or regenerate it"
                    )
                offsets.append(offset)
                offset = end
    except OSError as error:
        raise _cannot_read(path, error) from None
    return np.asarray(offsets, np.int64)


def _starts_gzip(start: bytes) -> bool:
    """Whether a file starting with `start` is gzip: its magic bytes, no valid TFRecord header."""
    if start[:2] != _GZIP_MAGIC:
        return False
    if len(start) < _HEADER.size:
        return True
    return masked_crc32c(start[:8]) != _HEADER.unpack(start)[1]


def _check_header(where: _Where, offset: int, header: bytes) -> int:
    """Returns the data length of a frame header, or raises DataError on a damaged one."""
    if len(header) < _HEADER.size:
        raise DataError(
            f"{where.name}: truncated record header at {where.byte(offset)}; the file is "
            "incomplete: copy or regenerate it"
        )
    length, length_crc = _HEADER.unpack(header)
    if masked_crc32c(header[:8]) != length_crc:
        raise DataError(
            f"{where.name}: corrupt record header at {where.byte(offset)} (checksum mismatch); "
            "this is not an intact TFRecord file: copy or regenerate it"
        )
    return length


# --------------------------------------------------------------------------- gzip files


def default_cache_dir() -> str:
    """Returns `$MLM_CACHE_DIR`, else `$XDG_CACHE_HOME/mlm`, else `~/.cache/mlm`."""
    explicit = os.environ.get(CACHE_DIR_VARIABLE, "").strip()
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join("~", ".cache")
    return os.path.join(os.path.expanduser(base), "mlm")


def is_gzip(path: str) -> bool:
    """Whether `path` is read as gzip: it is named `*.gz` or starts with the gzip magic bytes.

    Raises:
      DataError: the file cannot be read.
    """
    if path.endswith(_GZIP_SUFFIX):
        return True
    try:
        with open(path, "rb") as file:
            return _starts_gzip(file.read(_HEADER.size))
    except OSError as error:
        raise _cannot_read(path, error) from None


def decompressed_copy(path: str, cache_dir: str | None = None) -> str:
    """Returns the path of the decompressed copy of a gzip file, making it on first use.

    The copy lives in `cache_dir/tfrecords/`, named after the file plus a digest of its real path,
    size and modification time; it is written to a temporary file and renamed, so concurrent
    processes and interrupted runs never see a partial copy.

    Args:
      path: a gzip-compressed file.
      cache_dir: the cache directory; None: `default_cache_dir()`.

    Returns:
      The decompressed file.

    Raises:
      DataError: the file is unreadable or not a valid gzip file (bad header, corrupt data or
        checksum, truncated), or the copy cannot be written.
    """
    try:
        stat = os.stat(path)
    except OSError as error:
        raise _cannot_read(path, error) from None
    key = f"{os.path.realpath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = os.path.basename(path).removesuffix(_GZIP_SUFFIX)
    directory = os.path.join(cache_dir or default_cache_dir(), "tfrecords")
    copy = os.path.join(directory, f"{stem}.{digest}")
    if os.path.exists(copy):
        return copy
    temporary = None
    try:
        os.makedirs(directory, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f"{stem}.", suffix=".tmp", dir=directory)
        with os.fdopen(descriptor, "wb") as output:
            for chunk in _decompressed_chunks(path):
                output.write(chunk)
        os.replace(temporary, copy)
    except OSError as error:
        raise DataError(
            f"{path}: cannot write its decompressed copy to {directory} "
            f"({error.strerror or error}); free space there or set {CACHE_DIR_VARIABLE} to a "
            f"writable directory with room for the uncompressed file"
        ) from None
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)
    return copy


def _decompressed_chunks(path: str) -> Iterator[bytes]:
    """Yields the decompressed data of every gzip member of `path`; DataError on a bad file."""
    try:
        with gzip.open(path, "rb") as source:
            while chunk := source.read(_CHUNK):
                yield chunk
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataError(
            f"{path}: not a valid gzip file ({error}); copy or regenerate the file"
        ) from None
    except OSError as error:
        raise _cannot_read(path, error) from None


# ---------------------------------------------------------------------------- the source


class TFRecordDataSource:
    """A grain random-access data source of the serialized records of TFRecord files.

    Records are numbered file by file in the order of `paths`. The source is picklable (file
    handles are reopened lazily in each process), so it works with grain's worker processes.
    """

    def __init__(self, paths: Sequence[str], *, cache_dir: str | None = None):
        """Indexes the files, decompressing gzip files into the cache first (once).

        Args:
          paths: TFRecord files, plain or gzip-compressed (see the module docstring).
          cache_dir: where decompressed copies of gzip files live; None: `default_cache_dir()`.

        Raises:
          DataError: no paths, or a file is damaged (see `index_records`, `decompressed_copy`).
        """
        if not paths:
            raise DataError("no TFRecord files given; set the glob to existing .tfrecord files")
        self._paths = list(paths)
        self._where = [_Where(path, compressed=is_gzip(path)) for path in self._paths]
        self._local_paths = [
            decompressed_copy(path, cache_dir) if where.compressed else path
            for path, where in zip(self._paths, self._where, strict=True)
        ]
        self._offsets = [
            index_records(local, name=path if where.compressed else None)
            for path, local, where in zip(self._paths, self._local_paths, self._where, strict=True)
        ]
        self._starts = np.cumsum([0] + [len(offsets) for offsets in self._offsets])
        self._files: dict[int, int] = {}

    @property
    def paths(self) -> list[str]:
        """The files, in record order (as given, `.gz` names included)."""
        return list(self._paths)

    @property
    def local_paths(self) -> list[str]:
        """The files records are read from: `paths` with each gzip file's decompressed copy."""
        return list(self._local_paths)

    def records_per_file(self) -> list[int]:
        """Returns how many records each file holds."""
        return [len(offsets) for offsets in self._offsets]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> bytes:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        file_index = int(np.searchsorted(self._starts, index, side="right")) - 1
        offset = int(self._offsets[file_index][index - self._starts[file_index]])
        return self._read(file_index, offset)

    def _read(self, file_index: int, offset: int) -> bytes:
        where = self._where[file_index]
        descriptor = self._files.get(file_index)
        if descriptor is None:
            path = self._local_paths[file_index]
            try:
                descriptor = self._files[file_index] = os.open(path, os.O_RDONLY)
            except OSError as error:
                raise _cannot_read(path, error) from None
        # pread never moves a shared file position: grain reads records from several threads.
        length = _check_header(where, offset, os.pread(descriptor, _HEADER.size, offset))
        body = os.pread(descriptor, length + _FOOTER.size, offset + _HEADER.size)
        data, footer = body[:length], body[length:]
        if len(data) < length or len(footer) < _FOOTER.size:
            raise DataError(
                f"{where.name}: truncated record at {where.byte(offset)}; the file changed since "
                "it was indexed or is incomplete: copy or regenerate it"
            )
        if masked_crc32c(data) != _FOOTER.unpack(footer)[0]:
            raise DataError(
                f"{where.name}: corrupt record at {where.byte(offset)} (data checksum mismatch); "
                "copy or regenerate the file"
            )
        return data

    def __del__(self) -> None:
        for descriptor in getattr(self, "_files", {}).values():
            os.close(descriptor)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    def __repr__(self) -> str:
        return f"TFRecordDataSource({len(self._paths)} files, {len(self)} records)"
