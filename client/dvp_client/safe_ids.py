"""Safe sets on the wire: the whole-vocabulary marker and the packed encoding (numpy).

A rollout's safe sets travel with its ``safe_sizes`` ``s_t`` and the vocabulary
size ``V``. Steps fall in three kinds, decided by ``s_t`` alone (so a decoder
needs no per-step tag):

- full (``s_t == V``, the rule pruned nothing): sent as a marker, no ids. In the
  ``"list"`` format its CSR row is empty; in ``"packed"`` it takes no bytes.
- dense (``ceil(V / 8) <= s_t < V``, ``"packed"`` only): a bitmap of
  ``ceil(V / 8)`` bytes; id ``v`` is in S iff bit ``v % 8`` (least significant
  first) of byte ``v // 8`` is set.
- sparse (``s_t < ceil(V / 8)``, ``"packed"`` only): ``s_t`` unsigned LEB128
  varints (7 bits per byte, low group first, high bit set on every byte but the
  last): the first id, then each id minus the one before it (>= 1).

``packed`` bytes = the bitmaps of all dense steps in step order, then the varints
of all sparse steps in step order. A step costs at most ``min(s_t + ceil(V / 127),
ceil(V / 8))`` bytes (:func:`max_step_bytes`): a varint of a gap ``d`` has
``1 + [d >= 2^7] + [d >= 2^14] + ...`` bytes and the gaps of a step sum to less
than V. Encode and decode are vectorised (no Python loop per id or per step).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from dvp_schemas import PackedSafeTokenIds, SafeTokenIds

__all__ = [
    "as_list_form",
    "decode_packed",
    "encode_packed",
    "expand_full",
    "max_step_bytes",
    "packed_parts",
    "step_kinds",
]

_MAX_VARINT_BYTES = 5  # ids < 2^31: gaps < 2^35


def _bitmap_bytes(vocab_size: int) -> int:
    return (vocab_size + 7) // 8


def step_kinds(sizes: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(full, dense)`` bool masks over the steps (sparse: neither).

    Args:
        sizes: int ``(t,)`` ``|S|`` per step; vocab_size: V.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    full = sizes == vocab_size
    dense = (sizes >= _bitmap_bytes(vocab_size)) & ~full
    return full, dense


def max_step_bytes(max_size: int, vocab_size: int) -> int:
    """Most ``packed`` bytes one step of at most ``max_size`` ids can take (< V ids)."""
    if max_size >= vocab_size:
        max_size = vocab_size - 1  # a full step is a marker; the largest listed set is V - 1
    varints = min(max_size * _MAX_VARINT_BYTES, max_size + -(-vocab_size // 127))
    return varints if max_size < _bitmap_bytes(vocab_size) else _bitmap_bytes(vocab_size)


def _rows(offsets: np.ndarray) -> np.ndarray:
    """The step index of every id of a CSR (``offsets`` ``(t + 1,)``)."""
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def _check_csr(offsets: np.ndarray, ids: np.ndarray, sizes: np.ndarray, full: np.ndarray) -> None:
    lengths = np.diff(offsets)
    if len(offsets) != len(sizes) + 1 or offsets[0] != 0 or offsets[-1] != len(ids):
        raise ValueError(
            f"CSR offsets must have {len(sizes) + 1} entries from 0 to {len(ids)}, "
            f"got {len(offsets)} entries ending at {offsets[-1] if len(offsets) else None}"
        )
    bad = np.flatnonzero((lengths != sizes) & ~(full & (lengths == 0)))
    if bad.size:
        t = int(bad[0])
        raise ValueError(f"step {t}: {lengths[t]} ids, safe_sizes says {sizes[t]}")


def encode_packed(
    offsets: np.ndarray, ids: np.ndarray, sizes: np.ndarray, vocab_size: int
) -> bytes:
    """The ``packed`` bytes of CSR safe sets (see the module docstring).

    Args:
        offsets: int ``(t + 1,)`` CSR offsets from 0; a full step's row may be empty
            or hold all V ids.
        ids: int ``(nnz,)`` ids, strictly ascending within a step, in ``[0, V)``.
        sizes: int ``(t,)`` ``|S|`` per step.
        vocab_size: V.

    Raises:
        ValueError: rows that disagree with ``sizes``.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    full, dense = step_kinds(sizes, vocab_size)
    _check_csr(offsets, ids, sizes, full)
    rows = _rows(offsets)
    width = _bitmap_bytes(vocab_size)
    bitmaps = b""
    if dense.any():
        slot = np.cumsum(dense) - 1  # the bitmap row of each dense step
        on = dense[rows]
        bits = np.zeros((int(dense.sum()), width * 8), dtype=bool)
        bits[slot[rows[on]], ids[on]] = True
        bitmaps = np.packbits(bits, axis=1, bitorder="little").tobytes()
    sparse = ~(full | dense)
    keep = sparse[rows]
    values = ids[keep]
    gaps = values.copy()
    if values.size:
        first = np.ones(values.size, dtype=bool)
        first[1:] = rows[keep][1:] != rows[keep][:-1]
        gaps[~first] -= values[np.flatnonzero(~first) - 1]
    return bitmaps + _varint_encode(gaps).tobytes()


def decode_packed(data: bytes, sizes: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR ``(offsets, ids)`` (int64) of ``packed`` bytes; full steps get empty rows.

    Args:
        data: the ``packed`` bytes; sizes: int ``(t,)`` ``|S|`` per step; vocab_size: V.

    Raises:
        ValueError: bytes that do not hold exactly the sets ``sizes`` describes
            (truncated or trailing bytes, an over-long varint, ids not ascending or
            outside ``[0, V)``, a bitmap whose bit count is not its step's size).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    full, dense = step_kinds(sizes, vocab_size)
    if (sizes < 0).any() or (sizes > vocab_size).any():
        raise ValueError(f"safe_sizes must lie in [0, {vocab_size}]")
    buf = np.frombuffer(data, dtype=np.uint8)
    width = _bitmap_bytes(vocab_size)
    n_dense = int(dense.sum())
    if buf.size < n_dense * width:
        raise ValueError(f"packed sets: {buf.size} bytes, the {n_dense} bitmaps need more")
    sparse = ~(full | dense)
    gaps = _varint_decode(buf[n_dense * width :], int(sizes[sparse].sum()))
    lengths = np.where(full, 0, sizes)
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.empty(int(offsets[-1]), dtype=np.int64)
    rows = _rows(offsets)
    if n_dense:
        bits = np.unpackbits(
            buf[: n_dense * width].reshape(n_dense, width), axis=1, bitorder="little"
        )
        if bits[:, vocab_size:].any():
            raise ValueError(f"packed sets: a bitmap sets an id >= {vocab_size}")
        slots, cols = np.nonzero(bits)  # row-major: ascending ids per bitmap
        if not np.array_equal(np.bincount(slots, minlength=n_dense), sizes[dense]):
            raise ValueError("packed sets: a bitmap's bit count differs from its safe_sizes")
        ids[dense[rows]] = cols
    if gaps.size:
        seg = sizes[sparse & (sizes > 0)]  # the non-empty sparse steps' sizes, in order
        seg_starts = np.cumsum(seg) - seg
        values = np.cumsum(gaps)
        values -= np.repeat(np.concatenate([[0], values])[seg_starts], seg)
        later = np.ones(gaps.size, dtype=bool)
        later[seg_starts] = False
        if (gaps[later] < 1).any() or values.max() >= vocab_size:
            raise ValueError(f"packed sets: ids not ascending or outside [0, {vocab_size})")
        ids[sparse[rows]] = values
    return offsets, ids


def packed_parts(data: bytes, sizes: np.ndarray, vocab_size: int) -> tuple[bytes, bytes]:
    """``(bitmaps, varints)`` of ``packed`` bytes: joining the steps of two chunks is
    ``bitmaps_a + bitmaps_b + varints_a + varints_b`` (no decoding)."""
    _, dense = step_kinds(sizes, vocab_size)
    cut = int(dense.sum()) * _bitmap_bytes(vocab_size)
    if len(data) < cut:
        raise ValueError(f"packed sets: {len(data)} bytes, the bitmaps need {cut}")
    return data[:cut], data[cut:]


def expand_full(
    offsets: np.ndarray, ids: np.ndarray, sizes: np.ndarray, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """CSR with every full step's empty row replaced by ``0 .. V - 1`` (int64).

    Memory: ``8 * V`` bytes per full step; a batch whose every step is full needs
    none of it (``SafeSets.full``).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    lengths = np.diff(offsets)
    empty_full = (np.asarray(sizes) == vocab_size) & (lengths == 0)
    if not empty_full.any():
        return offsets, ids
    new_lengths = np.where(empty_full, vocab_size, lengths)
    new_offsets = np.zeros_like(offsets)
    np.cumsum(new_lengths, out=new_offsets[1:])
    out = np.empty(int(new_offsets[-1]), dtype=np.int64)
    rows = _rows(new_offsets)
    fill = empty_full[rows]
    out[~fill] = ids
    out[fill] = np.tile(np.arange(vocab_size, dtype=np.int64), int(empty_full.sum()))
    return new_offsets, out


def _varint_encode(values: np.ndarray) -> np.ndarray:
    """Unsigned LEB128 of non-negative int64 values < 2^35, concatenated (uint8)."""
    v = values.astype(np.uint64)
    nbytes = np.ones(v.size, dtype=np.int64)
    for k in range(1, _MAX_VARINT_BYTES):
        nbytes += v >= np.uint64(1 << (7 * k))
    starts = np.cumsum(nbytes) - nbytes
    out = np.empty(int(nbytes.sum()), dtype=np.uint8)
    for k in range(_MAX_VARINT_BYTES):
        m = nbytes > k
        if not m.any():
            break
        group = ((v[m] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        more = (nbytes[m] > k + 1).astype(np.uint8) << 7
        out[starts[m] + k] = group | more
    return out


def _varint_decode(buf: np.ndarray, count: int) -> np.ndarray:
    """``count`` unsigned LEB128 values (int64) that fill ``buf`` exactly.

    Raises:
        ValueError: a different number of values, a truncated last value, one longer
            than 5 bytes or not in its shortest form.
    """
    ends = np.flatnonzero(buf < 0x80)  # the last byte of every varint
    if ends.size != count or (buf.size and buf[-1] >= 0x80):
        raise ValueError(f"packed sets: {ends.size} varints (or a truncated one), expected {count}")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > _MAX_VARINT_BYTES or ((lengths > 1) & (buf[ends] == 0)).any():
        raise ValueError("packed sets: a varint longer than 5 bytes or not in shortest form")
    k = np.arange(buf.size) - np.repeat(starts, lengths)
    groups = (buf & 0x7F).astype(np.int64) << (7 * k)
    return np.add.reduceat(groups, starts)


def as_list_form(sets: SafeTokenIds | PackedSafeTokenIds, sizes: Sequence[int]) -> SafeTokenIds:
    """Safe sets in the ``"list"`` form (packed ones decoded; full steps stay empty rows).

    Args:
        sets: a rollout's (or stream chunk's) ``safe_token_ids``.
        sizes: its ``safe_sizes``.

    Raises:
        ValueError: packed bytes that do not match ``sizes`` (see :func:`decode_packed`).
    """
    if isinstance(sets, SafeTokenIds):
        return sets
    offsets, ids = decode_packed(sets.data, np.asarray(sizes, dtype=np.int64), sets.vocab_size)
    return SafeTokenIds(ids=ids.tolist(), offsets=offsets.tolist(), vocab_size=sets.vocab_size)
