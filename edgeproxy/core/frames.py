"""WebSocket framing (RFC 6455 section 5): the pure-Python reference implementation.

Theory of operation
===================

edgeproxy relays WebSocket frames *byte for byte*.  Client frames stay masked with the
client's key and go upstream unchanged; upstream frames go to the client unchanged.  The
proxy never re-encodes a relayed frame, so it never needs to decode one either: it only
has to *follow frame boundaries* in each direction, to

* count frames and messages (metrics, limits),
* enforce a maximum message size (close code 1009),
* refuse the few streams it cannot follow (close code 1002), and
* notice the CLOSE frame of each side and read its status code (for logging and for
  the closing handshake).

It does *not* judge whether a stream follows RFC 6455: see "What the scanner judges"
below.

That is the job of :class:`FrameScanner`.  One scanner follows one direction of one
connection.  The transport hands every chunk it reads to :meth:`FrameScanner.scan`,
which returns how many leading bytes of the chunk may be forwarded - normally all of
them.  The scanner is a state machine with two states:

``header``
    Waiting for the next frame header (2 to 14 bytes).  The header is parsed directly
    from the chunk.  If the chunk ends inside a header, the partial header (at most 13
    bytes) is copied into a tiny buffer and completed by the next chunk.  The partial
    bytes still count as forwardable: they are relayed as they arrive; only the copy is
    kept for parsing.  Errors are detected as early as the bytes allow (an oversized
    CLOSE at the header's second byte, a bad 64-bit length at its third, a too big
    message once the length is complete), so a bad header is usually refused before
    any of it is forwarded.

``payload``
    ``remaining`` bytes of the current frame are still to come.  Data payloads are
    skipped, never copied: the scanner only subtracts.  So are control-frame payloads,
    whatever their length, except a CLOSE payload: that one is kept (at most 125
    bytes, in a small buffer, across chunks) because the close code is needed once the
    frame is complete.  It is unmasked with the frame's key when it is masked.

``scan()`` returns early in exactly two cases:

1. Right after the last byte of a complete CLOSE frame: ``close`` is set and the caller
   drops whatever follows (RFC 6455 forbids data after CLOSE).
2. At an error (one of the three in "What the scanner judges" below): ``error`` is set
   to a :class:`~edgeproxy.errors.FrameError` and the return value is the offset where
   the offending frame's header starts, so the frames before it may still be
   forwarded but the bad frame is not.  If the bad header began in an earlier chunk
   (its first bytes were already forwarded), the return value is 0 and
   :attr:`FrameScanner.mid_frame` stays True: the stream that was forwarded ends
   inside a frame.

Once ``close`` or ``error`` is set the scanner is finished and every later ``scan``
returns 0.

What the scanner judges
-----------------------

Only what the proxy itself needs.  Whether a stream is valid RFC 6455 is for the
endpoints to judge: a negotiated extension may give a meaning to RSV bits and reserved
opcodes, and an endpoint fails a connection that breaks the rules itself, with the
right close code.  A proxy that judged in their place would refuse what an extension
allows, or fail a connection earlier than the endpoint would (before frames already
on their way in the other direction, an echo say, are delivered).  So opcodes,
fragmentation, RSV bits, masking and payloads pass through byte for byte, and ``scan``
sets ``error`` in three cases only:

* a 64-bit length with its top bit set (1002): the length has no meaning, so the end of
  the frame, and every frame boundary after it, is unknown: the stream cannot be
  followed past this header;
* a CLOSE frame (opcode 8) with a payload longer than 125 bytes (1002), seen at the
  header's second byte (a 7-bit length of 126 or 127).  The proxy must read every CLOSE
  frame: it ends the relayed stream in its direction (what follows is dropped), and its
  status code is logged and used in the closing handshake.  The payload is kept in a
  fixed buffer of 125 bytes, the most RFC 6455 section 5.5 lets any control frame
  carry (extension data included), so a peer never decides how much the proxy
  buffers.  A longer CLOSE cannot be read, no extension makes it valid, and its
  receiver would fail the connection anyway;
* with ``max_message_size`` > 0, a message whose frames' payload lengths add up to more
  than it (1009), checked at each data frame header, before its payload is relayed.

Optional rules (``rules``, ``allowed_rsv``, ``max_frame_size``)
--------------------------------------------------------------
The relay turns these on (``[websocket] strict``, the default, and
``max_frame_size``); a bare scanner has them off.  Each is a bit of ``rules``
and is checked at the frame's header, before any of the frame is forwarded:

* ``RULE_MASKED`` (client to server, RFC 6455 section 5.1): every frame masked, else 1002;
* ``RULE_UNMASKED`` (server to client, section 5.1): no frame masked, else 1002;
* ``RULE_CONTROL`` (section 5.5): control frames have FIN=1 and at most 125 bytes, else 1002;
* ``RULE_OPCODES`` (section 5.2): no reserved opcode (3-7, 11-15), else 1002;
* ``RULE_FRAGMENTS`` (section 5.4): a continuation frame only inside a fragmented
  message, and no new data frame inside one, else 1002;
* ``allowed_rsv`` (section 5.2): the RSV bits an extension negotiated (``0b100``
  for permessage-deflate's RSV1, 7 = not checked); any other bit set is 1002;
* ``max_frame_size`` > 0: a data frame whose payload is longer is 1009.

The relay leaves ``RULE_OPCODES`` and the RSV bits to the endpoints when they
negotiated an extension the proxy does not know, since that one may give them a
meaning.  Errors are checked in the order of that list, the RSV bits first.

Streams that break RFC 6455 in other ways are followed with these rules, so the counts
and the size limit stay well defined:

* Opcodes 0-7 are data frames, 8-15 control frames (the opcode's top bit, as in RFC 6455
  section 5.2): the reserved opcodes 3-7 are data frames, 11-15 control frames.
* Every data frame belongs to a message.  Opcodes 1-7 start a new message, also while a
  fragmented one is in progress: that one is abandoned (never counted, and the size
  count restarts with the new frame).  A continuation frame (opcode 0) continues the
  message in progress or, when there is none, starts one.  A data frame with FIN=1
  completes its message: ``messages`` counts the data frames with FIN=1.
* A control frame is never part of a message, whatever its FIN: it does not count
  toward ``messages`` or any message size, and does not interrupt the message in
  progress.  Its payload is skipped, never kept, whatever its length (PING, PONG and
  opcodes 11-15 may exceed 125 bytes), except a CLOSE payload.
* A CLOSE frame is recognised by its opcode alone (FIN and RSV bits are not looked at)
  and its payload parsed leniently (:func:`parse_close_payload`): ``close`` is set even
  when the code or the reason is malformed.
* RSV bits and masking are not looked at.

Implementations
===============

This module is the executable specification.  ``ext/_speedups.pyx`` builds
``edgeproxy._speedups`` with compiled twins of :func:`apply_mask`,
:func:`parse_header`, :func:`encode_header` and :class:`FrameScanner` that have the
same signatures, results, exceptions and error messages (``tests/core/
test_equivalence.py`` checks that with hypothesis).  Production code imports from
:mod:`edgeproxy.core._accel`, the only place that picks one of the two.

Buffers: every function that reads bytes accepts any C-contiguous bytes-like object
(``bytes``, ``bytearray``, ``memoryview``, ...), read as raw bytes.
"""

from __future__ import annotations

import operator
from struct import Struct
from typing import Callable

from edgeproxy.errors import FrameError

__all__ = [
    "OP_CONT",
    "OP_TEXT",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "MAX_PAYLOAD_LENGTH",
    "MAX_CONTROL_PAYLOAD",
    "apply_mask",
    "parse_header",
    "encode_header",
    "encode_frame",
    "make_encode_frame",
    "encode_close_payload",
    "parse_close_payload",
    "FrameScanner",
    "RULE_MASKED",
    "RULE_UNMASKED",
    "RULE_CONTROL",
    "RULE_OPCODES",
    "RULE_FRAGMENTS",
    "RULES_STRICT",
]

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10

#: Largest payload length a frame header can carry (the 64-bit length's top bit is 0).
MAX_PAYLOAD_LENGTH = 0x7FFF_FFFF_FFFF_FFFF
#: Largest payload of a control frame (RFC 6455 section 5.5).
MAX_CONTROL_PAYLOAD = 125

#: FrameScanner rules (see "Optional rules" in the module docstring)
RULE_MASKED = 1
RULE_UNMASKED = 2
RULE_CONTROL = 4
RULE_OPCODES = 8
RULE_FRAGMENTS = 16
#: every rule but the masking ones, which depend on the direction
RULES_STRICT = RULE_CONTROL | RULE_OPCODES | RULE_FRAGMENTS
#: reserved opcodes as a bit set: 3-7 and 11-15
_RESERVED_OPCODES = 0b1111100011111000

_U16 = Struct("!H")
_U64 = Struct("!Q")


def _view(obj) -> memoryview:
    """memoryview(obj), failing exactly like the buffer protocol (PyBUF_SIMPLE) does."""
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"a bytes-like object is required, not '{type(obj).__name__}'") from None
    if not view.c_contiguous:
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    return view


def _raw(data):
    """`data` as something whose len() is its byte count and whose items are ints."""
    if type(data) is bytes or type(data) is bytearray:
        return data
    return _view(data).cast("B")


# ---------------------------------------------------------------------------
# masking


def apply_mask(data, key, offset: int = 0) -> bytes:
    """XOR `data` with the 4-byte masking `key`, starting at key index ``offset % 4``.

    Masking is its own inverse, so this both masks and unmasks.  `offset` lets a payload
    that arrives in pieces be unmasked piecewise: pass the number of payload bytes that
    came before this piece.  Always returns a new ``bytes``.
    """
    shift = offset & 3
    kb = _view(key)
    if kb.nbytes != 4:
        raise ValueError("mask key must be exactly 4 bytes")
    data = _raw(data)
    n = len(data)
    if not n:
        return b""
    kb = kb.tobytes()
    if shift:
        kb = kb[shift:] + kb[:shift]
    mask = (kb * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(mask, "little")).to_bytes(n, "little")


# ---------------------------------------------------------------------------
# headers


def parse_header(buf, pos: int = 0):
    """Parse the frame header that starts at ``buf[pos]``.

    Returns ``(fin, rsv, opcode, mask_key, payload_length, header_length)`` - fin is
    0/1, rsv the three RSV bits as an int 0..7, mask_key 4 ``bytes`` or None - or None
    when ``buf[pos:]`` does not yet hold the whole header.  Raises
    ``FrameError(close_code=1002)`` as soon as a 64-bit length with its top bit set is
    visible (even if the rest of the header is still missing).  Nothing else is
    validated: this reports what the bytes say.
    """
    pos = operator.index(pos)
    if pos < 0:
        raise ValueError("pos must be >= 0")
    buf = _raw(buf)
    avail = len(buf) - pos
    if avail < 2:
        return None
    b0 = buf[pos]
    b1 = buf[pos + 1]
    length = b1 & 127
    hl = 2
    if length == 126:
        if avail < 4:
            return None
        length = _U16.unpack_from(buf, pos + 2)[0]
        hl = 4
    elif length == 127:
        if avail < 3:
            return None
        if buf[pos + 2] & 0x80:
            raise FrameError("64-bit payload length has the most significant bit set", close_code=1002)
        if avail < 10:
            return None
        length = _U64.unpack_from(buf, pos + 2)[0]
        hl = 10
    if b1 & 0x80:
        if avail < hl + 4:
            return None
        key = bytes(buf[pos + hl : pos + hl + 4])
        hl += 4
    else:
        key = None
    return (b0 >> 7, (b0 >> 4) & 7, b0 & 15, key, length, hl)


def encode_header(opcode: int, length: int, fin: bool = True, rsv: int = 0, mask_key=None) -> bytes:
    """Encode a frame header, using the shortest length form.

    Only representability is checked (ValueError): opcode 0..15, rsv 0..7, length
    0..2**63-1, mask_key None or 4 bytes.  Protocol rules (control frames <= 125 bytes
    and unfragmented) are deliberately NOT enforced here, so tests can build bad frames.
    """
    opcode = operator.index(opcode)
    length = operator.index(length)
    rsv = operator.index(rsv)
    if opcode < 0 or opcode > 15:
        raise ValueError(f"opcode must be in 0..15, got {opcode}")
    if rsv < 0 or rsv > 7:
        raise ValueError(f"rsv must be in 0..7, got {rsv}")
    if length < 0 or length > MAX_PAYLOAD_LENGTH:
        raise ValueError(f"payload length must be in 0..2**63-1, got {length}")
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    if mask_key is None:
        mbit = 0
    else:
        kb = _view(mask_key)
        if kb.nbytes != 4:
            raise ValueError("mask key must be exactly 4 bytes")
        mbit = 0x80
    if length <= 125:
        head = bytes((b0, mbit | length))
    elif length <= 0xFFFF:
        head = bytes((b0, mbit | 126)) + _U16.pack(length)
    else:
        head = bytes((b0, mbit | 127)) + _U64.pack(length)
    if mbit:
        return head + kb.tobytes()
    return head


def make_encode_frame(encode_header: Callable, apply_mask: Callable) -> Callable:
    """Build :func:`encode_frame` on top of a given `encode_header` / `apply_mask` pair.

    ``edgeproxy.core._accel`` uses this to get an ``encode_frame`` on the picked
    (compiled or pure) primitives while keeping one definition of it.
    """

    def encode_frame(opcode: int, payload, fin: bool = True, rsv: int = 0, mask_key=None) -> bytes:
        """Encode a whole frame; the payload is masked with `mask_key` when one is given."""
        payload = _raw(payload)
        header = encode_header(opcode, len(payload), fin, rsv, mask_key)
        if mask_key is None:
            return header + payload
        return header + apply_mask(payload, mask_key)

    return encode_frame


encode_frame = make_encode_frame(encode_header, apply_mask)


# ---------------------------------------------------------------------------
# close payloads


def encode_close_payload(code: int | None, reason: str = "") -> bytes:
    """The payload of a CLOSE frame: b"" for no code, else the code and UTF-8 reason.

    The reason is truncated on a UTF-8 character boundary so the payload fits the 125
    bytes of a control frame.  The code is only checked to fit 16 bits; choosing a code
    that may be sent (not 1005/1006/1015) is the caller's business.
    """
    if code is None:
        if reason:
            raise ValueError("a close reason needs a close code")
        return b""
    code = operator.index(code)
    if code < 0 or code > 0xFFFF:
        raise ValueError(f"close code must fit 16 bits, got {code}")
    raw = reason.encode("utf-8", "replace")
    if len(raw) > MAX_CONTROL_PAYLOAD - 2:
        # Cutting may split a character; "ignore" drops only that partial tail.
        raw = raw[: MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore").encode("utf-8")
    return _U16.pack(code) + raw


def parse_close_payload(payload) -> tuple[int | None, str]:
    """Lenient CLOSE payload parser (for logging): never raises on content.

    b"" and a (malformed) 1-byte payload give ``(None, "")``; otherwise the code and the
    reason decoded as UTF-8 with ``errors="replace"``.
    """
    payload = _raw(payload)
    if len(payload) < 2:
        return (None, "")
    return (_U16.unpack_from(payload, 0)[0], str(payload[2:], "utf-8", "replace"))


# ---------------------------------------------------------------------------
# the scanner


class FrameScanner:
    """Follows frame boundaries in ONE direction of a relayed stream without copying payloads.

    Feed it every chunk read from the sender with :meth:`scan`; forward the number of
    leading bytes it returns.  See the module docstring for the full contract.

    Readable attributes: ``messages`` (completed data messages: data frames, opcodes
    0-7, with FIN=1), ``frames`` (completed frames of any opcode), ``pongs``
    (completed PONG frames: heartbeat answers, counted so liveness needs no
    slow path), ``last_pong`` (the unmasked payload of the latest PONG of at
    most 125 bytes, or None: the proxy matches it against its own ping),
    ``close``
    (``(code, reason)`` once a complete CLOSE frame was scanned), ``close_size``
    (the CLOSE frame's length in bytes, header and payload, from its header on;
    0 before: with ``close`` set, it began ``close_size`` bytes before the
    offset ``scan`` returned),
    ``error`` (the :class:`FrameError` that stopped the stream), ``max_message_size``
    and the ``mid_frame`` property.
    """

    __slots__ = (
        "max_message_size",
        "messages",
        "frames",
        "pongs",
        "last_pong",
        "close",
        "close_size",
        "error",
        "_remaining",
        "_opcode",
        "_fin",
        "_msg_size",
        "_frag",
        "max_frame_size",
        "rules",
        "allowed_rsv",
        "_hbuf",
        "_cbuf",
        "_ckey",
    )

    def __init__(self, max_message_size: int = 0, max_frame_size: int = 0, rules: int = 0, allowed_rsv: int = 7):
        max_message_size = operator.index(max_message_size)
        if max_message_size < 0 or max_message_size > MAX_PAYLOAD_LENGTH:
            raise ValueError(f"max_message_size must be in 0..2**63-1 (0 = unlimited), got {max_message_size}")
        max_frame_size = operator.index(max_frame_size)
        if max_frame_size < 0 or max_frame_size > MAX_PAYLOAD_LENGTH:
            raise ValueError(f"max_frame_size must be in 0..2**63-1 (0 = unlimited), got {max_frame_size}")
        rules = operator.index(rules)
        allowed_rsv = operator.index(allowed_rsv)
        if rules < 0 or rules > 31 or allowed_rsv < 0 or allowed_rsv > 7:
            raise ValueError(f"rules must be in 0..31 and allowed_rsv in 0..7, got {rules} and {allowed_rsv}")
        self.max_message_size = max_message_size
        self.max_frame_size = max_frame_size
        self.rules = rules
        self.allowed_rsv = allowed_rsv
        self._frag = 0  # a fragmented message is in progress
        self.messages = 0
        self.frames = 0
        self.pongs = 0
        self.last_pong = None
        self.close = None
        self.close_size = 0
        self.error = None
        self._remaining = 0  # payload bytes of the current frame still to come
        self._opcode = 0  # opcode of the current frame
        self._fin = 0  # FIN of the current frame
        self._msg_size = 0  # payload bytes of the message in progress (0 if none; tracked when limited)
        self._hbuf = b""  # copy of a partial header (< 14 bytes)
        self._cbuf = None  # bytearray collecting a CLOSE payload, else None
        self._ckey = None  # mask key of the CLOSE frame being collected

    @property
    def mid_frame(self) -> bool:
        """True while the forwarded stream ends inside a frame (header or payload)."""
        return bool(self._hbuf) or self._remaining > 0

    def _header(self, buf, pos: int, avail: int) -> int:
        """Check and accept the header at buf[pos:pos+avail] (avail >= 1).

        Returns its length, or 0 when more bytes are needed.  Raises FrameError as soon
        as the available bytes prove the header bad.  State changes only on acceptance.
        """
        b0 = buf[pos]
        opcode = b0 & 15
        if avail < 2:
            return 0
        b1 = buf[pos + 1]
        length = b1 & 127
        if self.rules or self.allowed_rsv != 7:
            self._check_rules(b0, b1, opcode)
        if length <= 125:
            hl = 2
        elif opcode == 8:
            # The CLOSE payload is read (see _finish) and never more than 125 bytes
            # are kept: refused at the second byte, before any of the frame is relayed.
            raise FrameError("close frame (opcode 0x8) payload longer than 125 bytes", close_code=1002)
        elif length == 126:
            if avail < 4:
                return 0
            length = _U16.unpack_from(buf, pos + 2)[0]
            hl = 4
        else:
            if avail < 3:
                return 0
            if buf[pos + 2] & 0x80:
                raise FrameError("64-bit payload length has the most significant bit set", close_code=1002)
            if avail < 10:
                return 0
            length = _U64.unpack_from(buf, pos + 2)[0]
            hl = 10
        if self.max_frame_size and opcode < 8 and length > self.max_frame_size:
            raise FrameError(f"frame too big: {length} bytes > max_frame_size {self.max_frame_size}", close_code=1009)
        limit = self.max_message_size
        size = 0
        if limit and opcode < 8:
            # _msg_size is 0 unless a message is in progress, so a continuation frame
            # without one counts from zero; opcodes 1-7 always start a new message.
            size = length + self._msg_size if opcode == 0 else length
            if size > limit:
                raise FrameError(f"message too big: {size} bytes > max_message_size {limit}", close_code=1009)
        if b1 & 0x80:
            hl += 4
        if avail < hl:
            return 0
        # accepted
        fin = b0 >> 7
        self._opcode = opcode
        self._fin = fin
        self._remaining = length
        if opcode < 8:
            self._msg_size = 0 if fin else size
            self._frag = 1 - fin
        elif opcode == 8 or (opcode == 10 and length <= 125):
            # CLOSE and PONG payloads are read: the close code, the heartbeat answer.
            self._cbuf = bytearray()
            self._ckey = bytes(buf[pos + hl - 4 : pos + hl]) if b1 & 0x80 else None
            if opcode == 8:
                self.close_size = hl + length
        return hl

    def _check_rules(self, b0: int, b1: int, opcode: int) -> None:
        """Raise FrameError(1002) when the header's first two bytes break a rule that is on."""
        rules = self.rules
        rsv = (b0 >> 4) & 7
        if rsv & ~self.allowed_rsv:
            raise FrameError(f"RSV bits 0x{rsv:x} set without an extension that defines them", close_code=1002)
        if rules & RULE_OPCODES and (_RESERVED_OPCODES >> opcode) & 1:
            raise FrameError(f"reserved opcode 0x{opcode:x}", close_code=1002)
        if rules & RULE_MASKED and not b1 & 0x80:
            raise FrameError("client frame is not masked", close_code=1002)
        if rules & RULE_UNMASKED and b1 & 0x80:
            raise FrameError("server frame is masked", close_code=1002)
        if opcode >= 8:
            if rules & RULE_CONTROL:
                if not b0 & 0x80:
                    raise FrameError(f"fragmented control frame (opcode 0x{opcode:x})", close_code=1002)
                if b1 & 127 > 125:
                    raise FrameError(f"control frame (opcode 0x{opcode:x}) payload longer than 125 bytes", close_code=1002)
        elif rules & RULE_FRAGMENTS:
            if opcode == 0:
                if not self._frag:
                    raise FrameError("continuation frame without a message in progress", close_code=1002)
            elif self._frag:
                raise FrameError(f"data frame (opcode 0x{opcode:x}) inside a fragmented message", close_code=1002)

    def _finish(self) -> bool:
        """The current frame is complete; True when it was the CLOSE frame."""
        self.frames += 1
        opcode = self._opcode
        if opcode < 8:
            if self._fin:
                self.messages += 1
            return False
        if opcode == 10:
            self.pongs += 1
            payload = self._cbuf
            if payload is not None:
                self.last_pong = bytes(apply_mask(payload, self._ckey) if self._ckey is not None else payload)
                self._cbuf = self._ckey = None
            return False
        if opcode == 8:
            payload = self._cbuf
            if self._ckey is not None:
                payload = apply_mask(payload, self._ckey)
            self.close = parse_close_payload(payload)
            self._cbuf = self._ckey = None
            return True
        return False

    def scan(self, data) -> int:
        """Consume one chunk; return how many leading bytes of it may be forwarded."""
        if self.close is not None or self.error is not None:
            return 0
        data = _raw(data)
        end = len(data)
        pos = 0
        while pos < end:
            rem = self._remaining
            if rem:
                take = end - pos
                if take > rem:
                    take = rem
                if self._cbuf is not None:
                    self._cbuf += data[pos : pos + take]
                pos += take
                rem -= take
                self._remaining = rem
                if rem:
                    break
                if self._finish():
                    return pos
                continue
            hbuf = self._hbuf
            if hbuf:
                # A partial header is pending; pos is 0 here.
                old = len(hbuf)
                hbuf += data[: 14 - old]
                try:
                    hl = self._header(hbuf, 0, len(hbuf))
                except FrameError as exc:
                    # Its first bytes were forwarded already: nothing more may go.
                    self.error = exc
                    return 0
                if not hl:
                    self._hbuf = hbuf  # 14 bytes always suffice, so all of data is in it
                    return end
                self._hbuf = b""
                pos = hl - old
            else:
                try:
                    hl = self._header(data, pos, end - pos)
                except FrameError as exc:
                    self.error = exc
                    return pos
                if not hl:
                    self._hbuf = bytes(data[pos:])
                    return end
                pos += hl
            if not self._remaining and self._finish():
                return pos
        return end
