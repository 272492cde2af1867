"""Where an embedding server keeps its rows: anonymous memory, or a file it memory-maps.

`DramStorage` gives anonymous mappings advised for transparent huge pages: random row reads over
gigabytes miss the TLB far less with 2 MiB pages.

`FileStorage` is the SSD tier. The server's segments live in one file that it maps shared; the
kernel's page cache is the DRAM tier (hot rows stay resident, cold ones are read from the device
on a miss and dropped under memory pressure), so a server can hold more rows than its memory.

    file:  | header: 4 KiB, magic + JSON {fingerprint, layout} | segment 0 | segment 1 | ...
                                                                 (each starts 4 KiB-aligned)

The file is written once; the header goes last, after the rows are flushed, so a load that died
halfway leaves a file that is rewritten, not served. A restart with the same fingerprint (the
model source, its rows, the server's shards and formats) maps the file as it is, without loading.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

Layout = list[tuple[np.dtype, int, int]]
"""Per segment: element dtype, row width (elements), rows."""

_MAGIC = b"FLEXEMR-ROWS-1\n"
_HEADER = 4096
_ALIGN = 4096


class Storage(Protocol):
    def open(self, layout: Layout) -> tuple[list[np.ndarray], bool]:
        """One writable array [rows, width] per segment, and whether they still need filling."""
        ...

    def commit(self) -> None:
        """The arrays are filled: make them durable (a file tier) before serving."""
        ...

    def modified(self) -> None:
        """A row update is about to write the arrays: they stop being the checkpoint's rows (a file
        tier refills them at its next open; the update log brings the updates back)."""
        ...

    def resident_bytes(self, layout: Layout) -> int:
        """Memory this storage must have for `layout` (the page cache of a file tier is not counted:
        the kernel drops it under pressure)."""
        ...


def _nbytes(dtype: np.dtype, width: int, rows: int) -> int:
    return dtype.itemsize * width * rows


class DramStorage:
    def open(self, layout: Layout) -> tuple[list[np.ndarray], bool]:
        return [_huge_page_array(*segment) for segment in layout], True

    def commit(self) -> None:
        pass

    def modified(self) -> None:
        pass

    def resident_bytes(self, layout: Layout) -> int:
        return sum(_nbytes(*segment) for segment in layout)


def _huge_page_array(dtype: np.dtype, width: int, rows: int) -> np.ndarray:
    buffer = mmap.mmap(-1, max(_nbytes(dtype, width, rows), 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buffer.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP disabled on this kernel: plain pages still work.
            log.info("transparent huge pages unavailable; using normal pages")
    return np.frombuffer(buffer, dtype=dtype, count=rows * width).reshape(rows, width)


class FileStorage:
    """Segments in `path`, reused while its header carries `fingerprint`."""

    def __init__(self, path: str | Path, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self._header = b""
        self._wiped = False
        self._mmap: mmap.mmap | None = None

    def open(self, layout: Layout) -> tuple[list[np.ndarray], bool]:
        spans, size = [], _HEADER
        for dtype, width, rows in layout:
            spans.append(size)
            size += -(-max(_nbytes(dtype, width, rows), 1) // _ALIGN) * _ALIGN
        description = {"fingerprint": self.fingerprint, "layout": [[d.str, w, r] for d, w, r in layout]}
        self._header = _MAGIC + json.dumps(description).encode()
        if len(self._header) > _HEADER:
            raise ValueError(f"the row file header of {self.path} would exceed {_HEADER} bytes")
        reuse = self._matches()
        if not reuse:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            log.info("writing rows to %s (%.1f MiB)", self.path, size / 2**20)
            with open(self.path, "wb") as f:  # truncates a stale file; its header is gone until commit
                f.truncate(size)
        else:
            log.info("reusing rows in %s", self.path)
        with open(self.path, "r+b") as f:
            self._mmap = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED)
        if hasattr(mmap, "MADV_RANDOM"):
            self._mmap.madvise(mmap.MADV_RANDOM)  # lookups are random: no read-ahead of cold pages
        arrays = [
            np.frombuffer(self._mmap, dtype=dtype, count=rows * width, offset=at).reshape(rows, width)
            for (dtype, width, rows), at in zip(layout, spans, strict=True)
        ]
        return arrays, not reuse

    def _matches(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                return f.read(_HEADER).rstrip(b"\0") == self._header
        except OSError:
            return False

    def commit(self) -> None:
        assert self._mmap is not None
        self._mmap.flush()
        with open(self.path, "r+b") as f:
            f.write(self._header)
            f.flush()
            os.fsync(f.fileno())

    def modified(self) -> None:
        """Wipe the header (durably, before the first write): a restart refills the rows from the
        checkpoint rather than reuse rows holding updates whose log may be gone."""
        if self._wiped:
            return
        with open(self.path, "r+b") as f:
            f.write(b"\0" * _HEADER)
            f.flush()
            os.fsync(f.fileno())
        self._wiped = True

    def resident_bytes(self, layout: Layout) -> int:
        return 0
