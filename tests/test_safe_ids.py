"""The packed safe-set encoding and the whole-vocabulary marker (dvp_client.safe_ids)."""

from __future__ import annotations

import numpy as np
import pytest
from dvp_client.safe_ids import (
    decode_packed,
    encode_packed,
    expand_full,
    max_step_bytes,
    packed_parts,
    step_kinds,
)


def _random_sets(rng: np.random.Generator, steps: int, vocab: int) -> list[np.ndarray]:
    """Sorted sets of every kind: empty, single, small, dense, full, the largest ids."""
    kinds = ["empty", "single", "small", "dense", "full", "top", "near_full"]
    out = []
    for _ in range(steps):
        kind = kinds[rng.integers(len(kinds))]
        if kind == "empty":
            s = np.zeros(0, np.int64)
        elif kind == "single":
            s = rng.integers(vocab, size=1)
        elif kind == "small":
            size = min(vocab, int(rng.integers(2, max(3, vocab // 10))))
            s = rng.choice(vocab, size=size, replace=False)
        elif kind == "dense":
            size = int(rng.integers(vocab // 8, vocab)) if vocab > 1 else 1
            s = rng.choice(vocab, size=size, replace=False)
        elif kind == "full":
            s = np.arange(vocab)
        elif kind == "top":
            s = np.arange(max(0, vocab - int(rng.integers(1, 4))), vocab)
        else:
            s = np.delete(np.arange(vocab), rng.integers(vocab))
        out.append(np.sort(s).astype(np.int64))
    return out


def _csr(sets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sizes = np.array([len(s) for s in sets], dtype=np.int64)
    offsets = np.zeros(len(sets) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    ids = np.concatenate(sets) if sets else np.zeros(0, np.int64)
    return offsets, ids, sizes


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("vocab", [1, 7, 8, 9, 300, 49152, 2**31 - 1])
def test_round_trip_random_sets(seed: int, vocab: int) -> None:
    rng = np.random.default_rng(seed)
    if vocab > 10**6:  # huge ids: sparse sets only (a full set would be 2^31 ids)
        sets = [
            np.sort(rng.choice(vocab, size=int(rng.integers(0, 20)), replace=False))
            for _ in range(30)
        ]
        sets.append(np.array([0, vocab - 1]))
    else:
        sets = _random_sets(rng, 40, vocab)
    offsets, ids, sizes = _csr(sets)
    data = encode_packed(offsets, ids, sizes, vocab)
    got_offsets, got_ids = decode_packed(data, sizes, vocab)
    full, _ = step_kinds(sizes, vocab)
    # full steps come back as empty rows (the marker); expanded, they are 0..V-1 again
    assert np.array_equal(np.diff(got_offsets), np.where(full, 0, sizes))
    exp_offsets, exp_ids = expand_full(got_offsets, got_ids, sizes, vocab)
    assert np.array_equal(exp_offsets, offsets) and np.array_equal(exp_ids, ids)
    # a full step costs nothing; every other step at most max_step_bytes
    listed = sizes[~full]
    assert len(data) <= sum(max_step_bytes(int(s), vocab) for s in listed)
    # the marker form (empty rows for full steps) encodes to the same bytes
    m_offsets, m_ids = got_offsets, got_ids
    assert encode_packed(m_offsets, m_ids, sizes, vocab) == data


def test_chunks_join_without_decoding() -> None:
    rng = np.random.default_rng(7)
    vocab = 500
    a, b = _random_sets(rng, 10, vocab), _random_sets(rng, 12, vocab)
    parts = []
    for sets in (a, b):
        offsets, ids, sizes = _csr(sets)
        parts.append(packed_parts(encode_packed(offsets, ids, sizes, vocab), sizes, vocab))
    joined = parts[0][0] + parts[1][0] + parts[0][1] + parts[1][1]
    offsets, ids, sizes = _csr(a + b)
    assert joined == encode_packed(offsets, ids, sizes, vocab)


def test_protocol_vectors() -> None:
    """The vectors in docs/protocol.md section 1."""
    sets = [np.array([5]), np.arange(20), np.array([0, 2, 4, 6, 8, 10, 12]), np.array([2, 19])]
    offsets, ids, sizes = _csr(sets)
    assert encode_packed(offsets, ids, sizes, 20).hex() == "551500" + "05" + "0211"
    offsets, ids, sizes = _csr([np.array([3, 4, 290])])
    assert encode_packed(offsets, ids, sizes, 300).hex() == "03019e02"


def test_varint_widths() -> None:
    vocab = 2**31 - 1
    ids = np.array([127, 128, 16383 + 128, 2**21 + 16511, 2**31 - 2], dtype=np.int64)
    gaps = np.diff(ids, prepend=0)
    data = encode_packed(np.array([0, 5]), ids, np.array([5]), vocab)
    widths = [1 + sum(int(g) >= 1 << (7 * k) for k in range(1, 5)) for g in gaps]
    assert len(data) == sum(widths)
    assert np.array_equal(decode_packed(data, np.array([5]), vocab)[1], ids)


@pytest.mark.parametrize(
    ("data", "sizes", "match"),
    [
        (b"\x03", [2], "varints"),  # truncated: one value for a set of two
        (b"\x03\x01\x01", [2], "varints"),  # trailing bytes
        (b"\x83", [1], "varints"),  # last varint unterminated
        (b"\x03\x00", [2], "ascending"),  # a repeated id
        (b"\x14", [1], "outside"),  # id 20 in a vocabulary of 20
        (b"\x80\x00", [1], "shortest"),  # 0 in two bytes
        (b"\xff\x00\x00", [9], "bit count"),  # bitmap: 8 bits for a set of 9
        (b"\xff", [9], "bitmaps"),  # bitmap truncated
    ],
)
def test_malformed_packed_is_refused(data: bytes, sizes: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_packed(data, np.array(sizes), 20)


def test_rows_disagreeing_with_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="safe_sizes says"):
        encode_packed(np.array([0, 2]), np.array([1, 2]), np.array([3]), 10)


def test_protocol_md_packed_vectors() -> None:
    """The table in docs/protocol.md (vectors:packed) is what the encoder writes."""
    import base64
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    block = doc.split("<!-- vectors:packed -->")[1].split("<!-- /vectors:packed -->")[0]
    rows = [r for r in block.strip().splitlines()[2:] if r.startswith("|")]
    assert len(rows) == 2
    for row in rows:
        vocab, sets_text, sizes_text, hex_text, b64_text = (c.strip() for c in row.split("|")[1:6])
        v = int(vocab)
        sets = []
        for part in re.findall(r"\{([^}]*)\}", sets_text):
            if ".." in part:
                lo, hi = (int(x) for x in part.split(".."))
                sets.append(np.arange(lo, hi + 1))
            else:
                sets.append(np.array([int(x) for x in part.split(",")]))
        offsets, ids, sizes = _csr(sets)
        assert sizes.tolist() == [int(x) for x in sizes_text.strip("[]").split(",")]
        data = encode_packed(offsets, ids, sizes, v)
        assert data.hex() == hex_text.strip("`").replace(" ", "")
        assert base64.b64encode(data).decode() == b64_text.strip("`")
