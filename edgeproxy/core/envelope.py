"""The resume envelope's hot path, pure-Python reference: number upstream frames, unwrap client frames.

Theory of operation
-------------------
A resumable session (`core.resume`) works on messages, not bytes: every
upstream message goes to the client as ``D<seq>:`` + payload, every client
message arrives as ``D<seq>:`` + payload and goes upstream without the prefix,
masked with a fresh key.  Done one message at a time in Python, that costs
several microseconds per message; most messages, though, are a single complete
frame of the plainest kind.  The two functions here handle runs of exactly
those frames and *stop* in front of the first frame that is anything else
(incomplete, fragmented, a control frame, a ``C`` control message, masked the
wrong way, over the size limit, a gap in the client's numbers), leaving it to
`core.resume.MessageReader` and the session's slow path, which know every rule.
Stopping early never changes the outcome, only who computes it.

Both functions are pure: bytes in, ``(position, seq, frames)`` out; the mask
keys for upstream frames come from the caller's `mask_key_source`, called once
per forwarded frame, in order.  ``edgeproxy._speedups`` has compiled twins with
the same results and the same calls to `mask_key_source`
(``tests/core/test_envelope.py`` proves it); use them through `core._accel`.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable

from edgeproxy.core.frames import apply_mask, encode_header, parse_header

__all__ = ["number_frames", "unwrap_frames", "MAX_SEQ_DIGITS", "ACK_PREFIX"]

#: longer sequence numbers are left to the slow path (they cannot be consecutive anyway)
MAX_SEQ_DIGITS = 18
#: the one spelling of an acknowledgement the fast path reads (what the shipped clients send)
ACK_PREFIX = b'C{"t":"ack","seq":'


def _plain_data_frame(buf, pos: int, masked: bool, max_size: int) -> tuple[int, bytes | None, int, int] | None:
    """``(opcode, mask key, payload length, header length)`` of the frame at `pos` if the fast path takes it, else None.

    It takes a complete, final, text or binary frame without RSV bits, masked as
    `masked` says and no larger than `max_size` (0: any size).
    """
    header = parse_header(buf, pos)
    if header is None:
        return None
    fin, rsv, opcode, key, length, hl = header
    if not fin or rsv or (key is not None) != masked or (opcode != 1 and opcode != 2):
        return None
    if (max_size and length > max_size) or len(buf) - pos < hl + length:
        return None
    return opcode, key, length, hl


def number_frames(buf, pos: int, seq: int, max_size: int) -> tuple[int, int, bytes, bytes]:
    """Re-frame the complete, unmasked, unfragmented data frames at ``buf[pos:]`` as ``D<seq>:`` messages.

    Returns ``(pos, seq, run, ends)``: where it stopped, the last number given,
    the encoded (unmasked) frames of the messages numbered from ``seq + 1``,
    back to back in one bytes object (one allocation and one write for a whole
    run, however many messages), and where each frame ends in `run`, as
    little-endian unsigned 64-bit integers.  `max_size` (0: none) stops in front
    of a frame whose payload is larger.

    Raises:
        FrameError: a 64-bit length with its top bit set (as `parse_header`).
    """
    _check_start(pos, seq)
    frames: list[bytes] = []
    while True:
        header = _plain_data_frame(buf, pos, False, max_size)
        if header is None:
            break
        opcode, key, length, hl = header
        seq += 1
        prefix = b"D%d:" % seq
        start = pos + hl
        frames.append(encode_header(opcode, len(prefix) + length) + prefix + bytes(buf[start:start + length]))
        pos = start + length
    ends = struct.pack(f"<{len(frames)}Q", *itertools.accumulate(map(len, frames)))
    return pos, seq, b"".join(frames), ends


def _data_seq(head: bytes) -> tuple[int, int]:
    """``(seq, prefix length)`` of an unmasked payload start ``D<digits>:``; ``(-1, 0)`` if it is not one."""
    if head[:1] != b"D":
        return -1, 0
    colon = head.find(b":", 1, MAX_SEQ_DIGITS + 2)
    digits = head[1:colon]
    if colon < 0 or not digits.isdigit():
        return -1, 0
    return int(digits), colon + 1


def _ack_seq(payload: bytes) -> int:
    """N of a text payload that is exactly ``C{"t":"ack","seq":N}`` (JSON digits: no leading zero; at most 18); else -1."""
    n = len(ACK_PREFIX)
    digits = payload[n:-1]
    if not payload.startswith(ACK_PREFIX) or payload[-1:] != b"}" or not digits.isdigit() or len(digits) > MAX_SEQ_DIGITS:
        return -1
    if digits[:1] == b"0" and len(digits) > 1:
        return -1  # not a JSON number: the slow path refuses it
    return int(digits)


def _check_start(pos: int, seq: int) -> None:
    if pos < 0:
        raise ValueError("pos must be >= 0")
    if not 0 <= seq < 2**63:
        raise ValueError("seq must be in 0..2**63-1")


def unwrap_frames(buf, pos: int, in_seq: int, max_size: int, mask_key_source: Callable[[], bytes],
                  out_seq: int) -> tuple[int, int, list[bytes], int, int]:
    """Strip the ``D<seq>:`` envelope from the complete client data frames at ``buf[pos:]``.

    A frame is taken when it is masked, final, data (text or binary), within
    `max_size`, and carries the next number (``in_seq + 1``: forwarded, masked
    with a fresh key) or an old one (``<= in_seq``: a resent duplicate, dropped).
    An acknowledgement spelled exactly ``C{"t":"ack","seq":N}`` in a text
    frame, with ``N <= out_seq``, is taken too (acks only free the replay
    buffer, so reading them out of turn with the data changes nothing).
    Returns ``(pos, in_seq, frames, duplicates, ack)``, ``ack`` the highest
    acknowledged number read, or -1.

    Raises:
        FrameError: a 64-bit length with its top bit set (as `parse_header`).
    """
    _check_start(pos, in_seq)
    frames: list[bytes] = []
    duplicates = 0
    ack = -1
    while True:
        header = _plain_data_frame(buf, pos, True, max_size)
        if header is None:
            break
        opcode, key, length, hl = header
        start = pos + hl
        head = apply_mask(bytes(buf[start:start + min(length, len(ACK_PREFIX) + MAX_SEQ_DIGITS + 1)]), key)
        if head[:1] == b"C" and opcode == 1:
            acked = _ack_seq(head) if length <= len(head) else -1
            if acked < 0 or acked > out_seq:
                break
            ack = max(ack, acked)
            pos = start + length
            continue
        seq, skip = _data_seq(head[:MAX_SEQ_DIGITS + 2])
        if seq < 0 or seq > in_seq + 1:
            break
        pos = start + length
        if seq <= in_seq:
            duplicates += 1
            continue
        in_seq = seq
        body = apply_mask(bytes(buf[start + skip:pos]), key, skip)
        new_key = mask_key_source()
        frames.append(encode_header(opcode, len(body), mask_key=new_key) + apply_mask(body, new_key))
    return pos, in_seq, frames, duplicates, ack
