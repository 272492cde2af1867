"""The SSD tier's DRAM: which lookups an mmap server (`serve --storage mmap`) finds in its page cache.

A server with `--storage mmap` keeps its rows in a file on the node's local SSD and reads them
through the page cache: the DRAM the process does not use holds the pages read most. A lookup that
finds its page resident costs what a DRAM lookup costs; one that misses waits for one random
4 KiB read from the SSD (`LookupCost.ssd_read_s`), blocking the core that faulted.

Rows are popular by a Zipf law (exponent `Traffic.zipf_skew`) and their ids are hashed, so the hot
rows lie scattered over the file: each resident page is taken to hold one hot row and otherwise
cold ones (conservative: hot neighbours would only add hits). With a fraction f < 1 of a server's
rows' pages resident, the hits of a table of n rows held there are the share of lookups that go to
its f n / (rows per page) most popular rows; with f >= 1 every lookup hits.

    Zipf share of the top k of n rows:  H(k, s) / H(n, s),   H(n, s) ~ 1 + integral_1^n x^-s dx
"""

from __future__ import annotations

import numpy as np

PAGE_BYTES = 4096
"""The page cache's unit (x86-64 and arm64 Linux base pages)."""


def _harmonic(n: np.ndarray, skew: float) -> np.ndarray:
    n = np.maximum(n, 1.0)
    if abs(skew - 1.0) < 1e-9:
        return np.asarray(1.0 + np.log(n))
    return np.asarray(1.0 + (n ** (1.0 - skew) - 1.0) / (1.0 - skew))


def zipf_share(top: np.ndarray, rows: np.ndarray, skew: float) -> np.ndarray:
    """The share of lookups that go to the `top` most popular of `rows` rows (elementwise);
    linear below one row, 1 at `top` >= `rows`."""
    top = np.minimum(np.asarray(top, dtype=np.float64), rows)
    whole = _harmonic(rows, skew)
    return np.asarray(np.where(top >= 1.0, _harmonic(top, skew), top) / whole)


def hit_ratio(rows_held: np.ndarray, row_bytes: np.ndarray, cache_bytes: float, skew: float) -> np.ndarray:
    """[servers, tables]: the share of a table's lookups on a server that find their row resident,
    given the rows each server holds of each table ([servers, tables]), each table's bytes per
    row ([tables]) and each server's page cache."""
    held_bytes = rows_held @ row_bytes
    resident = np.minimum(cache_bytes / np.maximum(held_bytes, 1.0), 1.0)[:, None]
    rows_per_page = np.maximum(PAGE_BYTES // row_bytes, 1)
    hot = resident * rows_held / rows_per_page
    return np.where(resident >= 1.0, 1.0, zipf_share(hot, np.maximum(rows_held, 1.0), skew))
