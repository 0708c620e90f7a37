"""Random access to the records of TFRecord files, as a grain data source.

A TFRecord file is a sequence of `uint64 length | uint32 masked crc32c(length) | data |
uint32 masked crc32c(data)` frames. Opening the source scans the frame headers once (seeking over
the data) to index every record; reading record `i` is then one seek and one read, so grain can
shuffle, shard and resume over TFRecords exactly as over ArrayRecord files. Both checksums are
verified; a damaged file raises DataError naming it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

import google_crc32c
import numpy as np

from mlm.errors import DataError

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8
_GZIP_MAGIC = b"\x1f\x8b"


def masked_crc32c(data: bytes) -> int:
    """Returns the TFRecord checksum of `data`: crc32c rotated right by 15 bits plus a constant."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def index_records(path: str) -> np.ndarray:
    """Returns the byte offset of every record frame in one TFRecord file.

    Args:
      path: an uncompressed TFRecord file.

    Returns:
      int64 [num_records] offsets of the frame headers.

    Raises:
      DataError: unreadable, gzip-compressed, truncated, or a header checksum does not match.
    """
    offsets = []
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as file:
            if file.read(2) == _GZIP_MAGIC:
                raise DataError(
                    f"{path}: is gzip-compressed; random access needs plain TFRecords: "
                    "decompress it (gunzip) or write it without --gzip_compress"
                )
            offset = 0
            while offset < size:
                file.seek(offset)
                header = file.read(_HEADER.size)
                length = _check_header(path, offset, header)
                end = offset + _HEADER.size + length + _FOOTER.size
                if end > size:
                    raise DataError(
                        f"{path}: truncated record at byte {offset} (needs {end} bytes, file has "
                        f"{size}); the file is incomplete: copy or regenerate it"
                    )
                offsets.append(offset)
                offset = end
    except OSError as error:
        raise DataError(
            f"{path}: cannot read ({error.strerror or error}); check the path and its permissions"
        ) from None
    return np.asarray(offsets, np.int64)


def _check_header(path: str, offset: int, header: bytes) -> int:
    """Returns the data length of a frame header, or raises DataError on a damaged one."""
    if len(header) < _HEADER.size:
        raise DataError(
            f"{path}: truncated record header at byte {offset}; the file is incomplete: copy or "
            "regenerate it"
        )
    length, length_crc = _HEADER.unpack(header)
    if masked_crc32c(header[:8]) != length_crc:
        raise DataError(
            f"{path}: corrupt record header at byte {offset} (checksum mismatch); this is not an "
            "intact TFRecord file: copy or regenerate it"
        )
    return length


class TFRecordDataSource:
    """A grain random-access data source of the serialized records of TFRecord files.

    Records are numbered file by file in the order of `paths`. The source is picklable (file
    handles are reopened lazily in each process), so it works with grain's worker processes.
    """

    def __init__(self, paths: Sequence[str]):
        """Indexes the files.

        Args:
          paths: uncompressed TFRecord files.

        Raises:
          DataError: no paths, or a file is damaged (see `index_records`).
        """
        if not paths:
            raise DataError("no TFRecord files given; set the glob to existing .tfrecord files")
        self._paths = list(paths)
        self._offsets = [index_records(path) for path in self._paths]
        self._starts = np.cumsum([0] + [len(offsets) for offsets in self._offsets])
        self._files: dict[int, int] = {}

    @property
    def paths(self) -> list[str]:
        """The files, in record order."""
        return list(self._paths)

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
        path = self._paths[file_index]
        descriptor = self._files.get(file_index)
        if descriptor is None:
            descriptor = self._files[file_index] = os.open(path, os.O_RDONLY)
        # pread never moves a shared file position: grain reads records from several threads.
        length = _check_header(path, offset, os.pread(descriptor, _HEADER.size, offset))
        body = os.pread(descriptor, length + _FOOTER.size, offset + _HEADER.size)
        data, footer = body[:length], body[length:]
        if len(data) < length or len(footer) < _FOOTER.size:
            raise DataError(
                f"{path}: truncated record at byte {offset}; the file changed since it was "
                "indexed or is incomplete: copy or regenerate it"
            )
        if masked_crc32c(data) != _FOOTER.unpack(footer)[0]:
            raise DataError(
                f"{path}: corrupt record at byte {offset} (data checksum mismatch); copy or "
                "regenerate the file"
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
