"""CRC-32C for TensorBoard's event records (see :mod:`gradlab._tbwriter`), vectorised with numpy.

Without TensorFlow, TensorBoard checksums every record in pure Python, a loop over bytes: 30 us
for a 100-byte scalar event, 240 us for a 64-bucket histogram. Here all the records of a write
are checksummed together with a few numpy calls. The CRC is linear over GF(2), so a message's
register is the XOR of each byte's contribution, and a byte's contribution depends only on its
value and its distance ``k`` from the end of the message. With ``k = q * _B + r``:

* ``_small[r, b]`` is the register after byte ``b`` and ``r`` zero bytes (r < _B): summed
  (XOR-reduced) over each block of _B bytes, it gives the block's register;
* ``_shift[q, j, v]`` is the register ``v << 8j`` after ``q * _B`` zero bytes: a block's register,
  split into its 4 bytes, moved to the end of the message by 4 lookups.

The tables are small (64 KiB, and 4 KiB per block of distance; built in ~2 ms on first use), so
the lookups stay in cache; a single table indexed by ``k`` directly would not (2 MiB for 2 KiB
messages, 5x slower here). Longer messages (text, images) go through the byte loop.
"""

from __future__ import annotations

import numpy as np

_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected
_B = 64  # bytes per block
_Q = 32  # blocks: messages up to 2 KiB (a 64-bucket histogram event: 1.1 KiB) are vectorised
_SHORT = 32  # below this many bytes a lone message goes through the byte loop (numpy's call overhead)
_small = _shift = _init = None
_TABLE_OFFSETS = np.array([0, 256, 512, 768])  # where the 4 tables of a distance start
_BYTE_TABLE = []
for _b in range(256):
    _c = _b
    for _ in range(8):
        _c = (_c >> 1) ^ (_POLY if _c & 1 else 0)
    _BYTE_TABLE.append(_c)


def _build() -> None:
    global _small, _shift, _init
    small = np.empty((_B, 256), dtype=np.uint32)
    small[0] = _BYTE_TABLE
    byte_table = small[0].copy()
    for r in range(1, _B):  # one more zero byte: register -> table[low byte] ^ (register >> 8)
        small[r] = byte_table[small[r - 1] & 0xFF] ^ (small[r - 1] >> 8)
    # A register c after m >= 4 zero bytes is the register of c's 4 little-endian bytes followed by
    # m - 4 zero bytes (from a zero register), so byte j of c contributes small[m - 1 - j, byte].
    shift = np.empty((_Q, 4, 256), dtype=np.uint32)
    v = np.arange(256, dtype=np.uint32)
    for j in range(4):
        shift[0, j] = v << np.uint32(8 * j)
        shift[1, j] = small[_B - 1 - j]
    for q in range(2, _Q):
        prev = shift[q - 1]
        shift[q] = (shift[1, 0][prev & 0xFF] ^ shift[1, 1][(prev >> 8) & 0xFF]
                    ^ shift[1, 2][(prev >> 16) & 0xFF] ^ shift[1, 3][prev >> 24])
    _small, _shift = small.reshape(-1), shift.reshape(-1)
    # The initial register 0xFFFFFFFF amounts to inverting a message's first 4 bytes: for each
    # length n, the XOR of the contributions of 0xFF at distances n - 1 .. n - 4 from the end.
    k = np.arange(_B * _Q)
    ff = _moved(small[k % _B, 0xFF], k // _B)
    init = np.zeros(_B * _Q + 1, dtype=np.uint32)
    init[4:] = ff[3:] ^ ff[2:-1] ^ ff[1:-2] ^ ff[:-3]
    _init = init


def _moved(reg: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Registers ``reg`` after ``q * _B`` zero bytes: one lookup per register byte."""
    index = reg.view(np.uint8).reshape(-1, 4) + (q * 1024)[:, None] + _TABLE_OFFSETS  # little-endian bytes
    return np.bitwise_xor.reduce(_shift.take(index), axis=1)


def _crc_loop(data) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _BYTE_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _crc_batch(parts: list) -> np.ndarray:
    """CRC-32C of each message (each 4 to _B * _Q bytes long)."""
    if _small is None:
        _build()
    lens = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    ends = np.cumsum(lens)
    starts = ends - lens
    data = np.frombuffer(b"".join(parts), dtype=np.uint8)
    k = np.repeat(ends - 1, lens) - np.arange(len(data))  # each byte's distance from its message's end
    r = k & (_B - 1)
    contrib = _small.take((r << 8) | data)
    first = r == _B - 1  # the first byte of each block (counted from the message's end) ...
    first[starts] = True  # ... and of each message
    block_starts = np.flatnonzero(first)
    moved = _moved(np.bitwise_xor.reduceat(contrib, block_starts), k[block_starts] >> 6)
    raw = np.bitwise_xor.reduceat(moved, np.searchsorted(block_starts, starts))
    return raw ^ _init.take(lens) ^ np.uint32(0xFFFFFFFF)


def crc32c(data: bytes) -> int:
    """The CRC-32C of ``data`` (as zlib.crc32, but the Castagnoli polynomial)."""
    if _SHORT <= len(data) <= _B * _Q:
        return int(_crc_batch([data])[0])
    return _crc_loop(data)


def _mask(x: int) -> int:
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC (what TensorBoard event files store)."""
    return _mask(crc32c(data))


def masked_crc32c_many(messages: list) -> list:
    """:func:`masked_crc32c` of each message, those of 4 bytes to 2 KiB together."""
    out = [0] * len(messages)
    batch = []
    for i, m in enumerate(messages):
        if 4 <= len(m) <= _B * _Q:
            batch.append(i)
        else:
            out[i] = _mask(_crc_loop(m))
    if batch:
        for i, x in zip(batch, _crc_batch([messages[i] for i in batch]).tolist()):
            out[i] = _mask(x)
    return out
