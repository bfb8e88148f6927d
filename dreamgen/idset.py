"""The set of record ids a store holds, in about 16 bytes per id.

A daemon's store reaches millions of records; a Python ``set`` of 32-character id strings
costs ~120 bytes per id (a 10M-record store: over a gigabyte). Record ids are 128-bit
hex digests (``record.content_id``), so they are kept as 16-byte keys in one sorted
numpy array, with recent additions in a small set merged in batches (a merge is a
search and one copy, never a sort of the whole array). An id of another shape (a
hand-written file) is kept as it is. Membership is exact.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

MERGE_AT = 65_536  # recent ids kept in the set before they join the array


def _key(record_id: str) -> bytes | None:
    if len(record_id) != 32:
        return None
    try:
        return bytes.fromhex(record_id)
    except ValueError:
        return None


class IdSet:
    """An exact set of record ids: ``in``, ``add``, ``update`` and ``len``."""

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._sorted = np.empty(0, dtype="S16")  # merged keys, ascending
        self._recent: set[bytes] = set()  # keys not merged yet
        self._other: set[str] = set()  # ids that are not 32 hex digits
        self.update(ids)

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent) + len(self._other)

    def __contains__(self, record_id: object) -> bool:
        if not isinstance(record_id, str):
            return False
        key = _key(record_id)
        return record_id in self._other if key is None else self._has(key)

    def _has(self, key: bytes) -> bool:
        if key in self._recent:
            return True
        i = int(np.searchsorted(self._sorted, key))
        # numpy's S16 drops trailing NUL bytes on the way out: compare padded.
        return i < len(self._sorted) and self._sorted[i].ljust(16, b"\0") == key

    def add(self, record_id: str) -> None:
        key = _key(record_id)
        if key is None:
            self._other.add(record_id)
        elif not self._has(key):
            self._recent.add(key)
            if len(self._recent) >= MERGE_AT:
                self._merge()

    def update(self, ids: Iterable[str]) -> None:
        for record_id in ids:
            self.add(record_id)

    def _merge(self) -> None:
        new = np.array(sorted(self._recent), dtype="S16")
        self._sorted = np.insert(self._sorted, np.searchsorted(self._sorted, new), new)
        self._recent.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held by the merged array (the part that grows with the store)."""
        return int(self._sorted.nbytes)
