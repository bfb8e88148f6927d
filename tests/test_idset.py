"""The store's id set: exact membership, compact storage (``dreamgen.idset``)."""

from __future__ import annotations

import hashlib
import random

from hypothesis import given
from hypothesis import strategies as st

from dreamgen import idset
from dreamgen.idset import IdSet

hex_ids = st.binary(min_size=16, max_size=16).map(bytes.hex)
any_ids = st.one_of(hex_ids, st.text(max_size=40))


@given(st.lists(any_ids, max_size=60), st.lists(any_ids, max_size=30))
def test_membership_is_exact(stored: list[str], probes: list[str]) -> None:
    # Trailing zero bytes and ids that are not 32 hex digits are the edge cases.
    stored += ["00" * 16, "ab" + "00" * 15, "not-a-hex-id", "g" * 32]
    ids = IdSet(stored)
    assert len(ids) == len(set(stored))
    for x in stored + probes:
        assert (x in ids) == (x in set(stored))


def test_merged_ids_stay_found_and_cost_16_bytes_each(monkeypatch) -> None:
    monkeypatch.setattr(idset, "MERGE_AT", 1000)
    rng = random.Random(0)
    stored = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(10_500)]
    ids = IdSet()
    for x in stored:
        ids.add(x)
        ids.add(x)  # a repeat adds nothing
    assert len(ids) == 10_500 and ids.nbytes == 16 * 10_000  # 10 merges of 1000
    assert all(x in ids for x in rng.sample(stored, 500))
    absent = [hashlib.sha256(f"x{i}".encode()).hexdigest()[:32] for i in range(500)]
    assert not any(x in ids for x in absent)
    assert 5 not in ids  # not a string
