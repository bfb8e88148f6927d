"""Exact and near-duplicate removal that persists across resumes and runs.

Exact: a hash of the normalised conversation text. Near: MinHash LSH (datasketch) over
word 3-shingles, Jaccard threshold 0.8 by default. The index lives in a folder (by
default ``OUT/dedup``; several runs may share one): an append-only log of signatures,
fsynced with the store's batches, from which the in-memory index is rebuilt on open.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
from datasketch import MinHash, MinHashLSH

from dreamgen.record import Record

_WORD = re.compile(r"\w+")
LOG = "signatures.bin"


def conversation_text(record: Record) -> str:
    """The text dedup compares: the conversation plus both responses."""
    parts = [m.content for m in record.messages] + [record.target.content, record.contrast.content]
    return "\n".join(parts)


def normalize(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(normalize(text).encode(), digest_size=16).digest()


def shingles(text: str, k: int = 3) -> list[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) < k:
        return [" ".join(words).encode()]
    return [" ".join(words[i : i + k]).encode() for i in range(len(words) - k + 1)]


class Dedup:
    """Answers "seen before?" for records; remembers what it is told to add, durably."""

    def __init__(
        self, folder: Path | None, threshold: float = 0.8, num_perm: int = 128
    ) -> None:
        self.threshold = threshold
        self.num_perm = num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.exact: set[bytes] = set()
        self.contaminants = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.folder = folder
        self._log = None
        self._n = 0
        self._row = 16 + 8 * num_perm
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self._load(folder / LOG)
            self._log = open(folder / LOG, "ab")

    def _load(self, path: Path) -> None:
        if not path.exists():
            return
        data = path.read_bytes()
        whole = len(data) - len(data) % self._row  # a torn last row was never committed
        for off in range(0, whole, self._row):
            key = data[off : off + 16]
            hv = np.frombuffer(data[off + 16 : off + self._row], dtype=np.uint64)
            self._insert(key, MinHash(num_perm=self.num_perm, hashvalues=hv))
        if whole != len(data):
            with open(path, "r+b") as f:
                f.truncate(whole)

    def _insert(self, key: bytes, mh: MinHash) -> None:
        if key in self.exact:
            return
        self.exact.add(key)
        self._n += 1
        self.lsh.insert(key.hex(), mh, check_duplication=False)

    def signature(self, text: str) -> tuple[bytes, MinHash]:
        """Exact key and MinHash of a text; pure, so it can run off the event loop."""
        mh = MinHash(num_perm=self.num_perm)
        mh.update_batch(shingles(text))
        return exact_key(text), mh

    def add_contaminants(self, texts: list[str]) -> None:
        """Held-out texts (eval scenarios): any record too close to one is rejected."""
        for i, text in enumerate(texts):
            _, mh = self.signature(text)
            self.contaminants.insert(f"eval-{i}", mh, check_duplication=False)

    def check(self, key: bytes, mh: MinHash) -> str | None:
        """The rejection reason if this signature duplicates something, else None."""
        if key in self.exact:
            return "duplicate"
        if self.lsh.query(mh):
            return "near_duplicate"
        if self.contaminants.query(mh):
            return "contaminated"
        return None

    def add(self, key: bytes, mh: MinHash) -> None:
        """Remember a signature (call once its record is accepted)."""
        if key in self.exact:
            return
        self._insert(key, mh)
        if self._log is not None:
            self._log.write(key + mh.hashvalues.astype(np.uint64).tobytes())

    def sync(self) -> None:
        """Make added signatures durable; called with the store's flush."""
        if self._log is not None:
            self._log.flush()
            os.fsync(self._log.fileno())

    def __len__(self) -> int:
        return self._n

    def close(self) -> None:
        if self._log is not None:
            self.sync()
            self._log.close()
            self._log = None

