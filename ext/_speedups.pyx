# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, auto_pickle=False, embedsignature=True
"""Compiled twins of the hot paths in :mod:`edgeproxy.core.frames`, :mod:`edgeproxy.core.fanout`,
:mod:`edgeproxy.core.relay` and :mod:`edgeproxy.core.envelope`.

``apply_mask``, ``parse_header``, ``encode_header``, ``FrameScanner``, ``write_many``,
``RelayCore``/``RelayEndpoint`` and ``number_frames``/``unwrap_frames`` have the same
signatures, results, exceptions and error messages as the pure-Python references
(read their module docstrings for the theory of operation);
``tests/core/test_equivalence.py``, ``test_relay_twins.py`` and ``test_envelope.py``
check that.  Do not import this module directly:
use :mod:`edgeproxy.core._accel`, which picks this or the pure implementation.

Buffers are read through the buffer protocol (``PyBUF_SIMPLE``: any C-contiguous
bytes-like object, as raw bytes) without copying.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.number cimport PyNumber_Index
from cpython.object cimport Py_GT, PyObject_RichCompareBool, PyTypeObject
from cpython.ref cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint64_t
from libc.stdio cimport snprintf
from libc.string cimport memcpy

cimport cython

from edgeproxy.errors import FrameError

__all__ = ["apply_mask", "parse_header", "encode_header", "FrameScanner", "write_many", "RelayCore", "RelayEndpoint",
           "RelayEngine", "EngineSide", "number_frames", "unwrap_frames"]

cdef unsigned long long MAX_PAYLOAD_LENGTH = 0x7FFFFFFFFFFFFFFF

# FrameScanner rules: the same values as edgeproxy.core.frames.RULE_*
cdef enum:
    RULE_MASKED = 1
    RULE_UNMASKED = 2
    RULE_CONTROL = 4
    RULE_OPCODES = 8
    RULE_FRAGMENTS = 16
    RESERVED_OPCODES = 0b1111100011111000


# ---------------------------------------------------------------------------
# masking

cdef inline void _xor(const unsigned char *src, unsigned char *dst, Py_ssize_t n,
                      const unsigned char *k8) noexcept nogil:
    """dst[i] = src[i] ^ k8[i % 8]; 32 then 8 bytes at a time, then the tail."""
    cdef uint64_t k64, a, b, c, d
    cdef Py_ssize_t i = 0
    memcpy(&k64, k8, 8)
    while i + 32 <= n:
        memcpy(&a, src + i, 8)
        memcpy(&b, src + i + 8, 8)
        memcpy(&c, src + i + 16, 8)
        memcpy(&d, src + i + 24, 8)
        a ^= k64
        b ^= k64
        c ^= k64
        d ^= k64
        memcpy(dst + i, &a, 8)
        memcpy(dst + i + 8, &b, 8)
        memcpy(dst + i + 16, &c, 8)
        memcpy(dst + i + 24, &d, 8)
        i += 32
    while i + 8 <= n:
        memcpy(&a, src + i, 8)
        a ^= k64
        memcpy(dst + i, &a, 8)
        i += 8
    while i < n:
        dst[i] = src[i] ^ k8[i & 7]
        i += 1


def apply_mask(data, key, offset=0):
    """XOR `data` with the 4-byte masking `key`, starting at key index ``offset % 4``.

    Masking is its own inverse, so this both masks and unmasks.  Returns new ``bytes``.
    """
    cdef int shift = offset & 3
    cdef Py_buffer kb
    cdef Py_buffer db
    cdef unsigned char k8[8]
    cdef const unsigned char *kp
    cdef int i
    PyObject_GetBuffer(key, &kb, PyBUF_SIMPLE)
    try:
        if kb.len != 4:
            raise ValueError("mask key must be exactly 4 bytes")
        kp = <const unsigned char *>kb.buf
        for i in range(8):
            k8[i] = kp[(i + shift) & 3]
    finally:
        PyBuffer_Release(&kb)
    PyObject_GetBuffer(data, &db, PyBUF_SIMPLE)
    try:
        out = PyBytes_FromStringAndSize(NULL, db.len)
        _xor(<const unsigned char *>db.buf, <unsigned char *>PyBytes_AS_STRING(out), db.len, k8)
    finally:
        PyBuffer_Release(&db)
    return out


# ---------------------------------------------------------------------------
# headers

cdef object _top_bit_error():
    return FrameError("64-bit payload length has the most significant bit set", close_code=1002)


cdef inline unsigned long long _be64(const unsigned char *p) noexcept nogil:
    return ((<unsigned long long>p[0] << 56) | (<unsigned long long>p[1] << 48)
            | (<unsigned long long>p[2] << 40) | (<unsigned long long>p[3] << 32)
            | (<unsigned long long>p[4] << 24) | (<unsigned long long>p[5] << 16)
            | (<unsigned long long>p[6] << 8) | <unsigned long long>p[7])


def parse_header(buf, Py_ssize_t pos=0):
    """Parse the frame header that starts at ``buf[pos]``.

    Returns ``(fin, rsv, opcode, mask_key, payload_length, header_length)`` or None when
    ``buf[pos:]`` does not yet hold the whole header; raises
    ``FrameError(close_code=1002)`` as soon as a 64-bit length with its top bit set is
    visible.
    """
    if pos < 0:
        raise ValueError("pos must be >= 0")
    cdef Py_buffer b
    cdef const unsigned char *p
    cdef Py_ssize_t avail, hl
    cdef unsigned long long length
    cdef unsigned char b0, b1
    PyObject_GetBuffer(buf, &b, PyBUF_SIMPLE)
    try:
        avail = b.len - pos
        if avail < 2:
            return None
        p = <const unsigned char *>b.buf + pos
        b0 = p[0]
        b1 = p[1]
        length = b1 & 127
        hl = 2
        if length == 126:
            if avail < 4:
                return None
            length = (<unsigned long long>p[2] << 8) | p[3]
            hl = 4
        elif length == 127:
            if avail < 3:
                return None
            if p[2] & 0x80:
                raise _top_bit_error()
            if avail < 10:
                return None
            length = _be64(p + 2)
            hl = 10
        if b1 & 0x80:
            if avail < hl + 4:
                return None
            key = PyBytes_FromStringAndSize(<const char *>p + hl, 4)
            hl += 4
        else:
            key = None
        return (b0 >> 7, (b0 >> 4) & 7, b0 & 15, key, length, hl)
    finally:
        PyBuffer_Release(&b)


cdef inline Py_ssize_t _header_size(unsigned long long n, bint masked) noexcept nogil:
    return (2 if n <= 125 else 4 if n <= 0xFFFF else 10) + (4 if masked else 0)


cdef inline Py_ssize_t _put_header(unsigned char *out, int first_byte, unsigned long long n,
                                   const unsigned char *key) noexcept nogil:
    """Write a frame header (FIN/RSV/opcode byte given; masked when key is not NULL); return its length."""
    cdef Py_ssize_t hl
    cdef int i
    cdef unsigned char mbit = 0x80 if key != NULL else 0
    out[0] = first_byte
    if n <= 125:
        out[1] = mbit | <unsigned char>n
        hl = 2
    elif n <= 0xFFFF:
        out[1] = mbit | 126
        out[2] = (n >> 8) & 0xFF
        out[3] = n & 0xFF
        hl = 4
    else:
        out[1] = mbit | 127
        for i in range(8):
            out[2 + i] = (n >> (56 - 8 * i)) & 0xFF
        hl = 10
    if key != NULL:
        memcpy(out + hl, key, 4)
        hl += 4
    return hl


def encode_header(opcode, length, fin=True, rsv=0, mask_key=None):
    """Encode a frame header, using the shortest length form.

    Only representability is checked (ValueError); protocol rules are not enforced.
    """
    opcode = PyNumber_Index(opcode)
    length = PyNumber_Index(length)
    rsv = PyNumber_Index(rsv)
    if opcode < 0 or opcode > 15:
        raise ValueError(f"opcode must be in 0..15, got {opcode}")
    if rsv < 0 or rsv > 7:
        raise ValueError(f"rsv must be in 0..7, got {rsv}")
    if length < 0 or length > 0x7FFFFFFFFFFFFFFF:
        raise ValueError(f"payload length must be in 0..2**63-1, got {length}")
    cdef unsigned char out[14]
    cdef unsigned char k[4]
    cdef unsigned long long n = length
    cdef int hl
    cdef int mbit = 0
    cdef Py_buffer kb
    cdef int i
    if mask_key is not None:
        PyObject_GetBuffer(mask_key, &kb, PyBUF_SIMPLE)
        try:
            if kb.len != 4:
                raise ValueError("mask key must be exactly 4 bytes")
            memcpy(k, kb.buf, 4)
            mbit = 0x80
        finally:
            PyBuffer_Release(&kb)
    cdef const unsigned char *kp = NULL
    if mbit:
        kp = k
    hl = _put_header(out, (0x80 if fin else 0) | ((<int>rsv) << 4) | <int>opcode, n, kp)
    return PyBytes_FromStringAndSize(<const char *>out, hl)


# ---------------------------------------------------------------------------
# the scanner

cdef class FrameScanner:
    """Follows frame boundaries in ONE direction of a relayed stream without copying payloads.

    See :class:`edgeproxy.core.frames.FrameScanner` for the contract.
    """

    cdef readonly unsigned long long max_message_size
    cdef readonly unsigned long long max_frame_size
    cdef readonly int rules
    cdef readonly int allowed_rsv
    cdef int _frag
    # a cheap pre-filter of the rules (see _header): any rule on, RSV bits refused (as in
    # byte 0), the mask bit wanted (0x80, 0, or -1 = either), the fragment rule on
    cdef bint _checks
    cdef int _bad_rsv
    cdef int _want_mask
    cdef bint _frag_rule
    cdef readonly long long messages
    cdef readonly long long frames
    cdef readonly long long pongs
    cdef readonly object last_pong
    cdef readonly object close
    cdef readonly int close_size
    cdef readonly object error
    cdef unsigned long long _remaining
    cdef unsigned long long _msg_size
    cdef int _opcode
    cdef int _fin
    cdef int _hlen
    cdef int _clen
    cdef int _cmasked
    cdef int _collect  # 1 while a CLOSE or PONG payload goes into _cbuf
    cdef unsigned char _hbuf[16]
    cdef unsigned char _cbuf[128]
    cdef unsigned char _ckey[4]

    def __init__(self, max_message_size=0, max_frame_size=0, rules=0, allowed_rsv=7):
        max_message_size = PyNumber_Index(max_message_size)
        if max_message_size < 0 or max_message_size > 0x7FFFFFFFFFFFFFFF:
            raise ValueError(
                f"max_message_size must be in 0..2**63-1 (0 = unlimited), got {max_message_size}"
            )
        max_frame_size = PyNumber_Index(max_frame_size)
        if max_frame_size < 0 or max_frame_size > 0x7FFFFFFFFFFFFFFF:
            raise ValueError(
                f"max_frame_size must be in 0..2**63-1 (0 = unlimited), got {max_frame_size}"
            )
        rules = PyNumber_Index(rules)
        allowed_rsv = PyNumber_Index(allowed_rsv)
        if rules < 0 or rules > 31 or allowed_rsv < 0 or allowed_rsv > 7:
            raise ValueError(f"rules must be in 0..31 and allowed_rsv in 0..7, got {rules} and {allowed_rsv}")
        self.max_message_size = max_message_size
        self.max_frame_size = max_frame_size
        self.rules = rules
        self.allowed_rsv = allowed_rsv
        self._frag = 0
        self._checks = rules != 0 or allowed_rsv != 7
        self._bad_rsv = ((~allowed_rsv) & 7) << 4
        self._want_mask = 0x80 if rules & RULE_MASKED else (0 if rules & RULE_UNMASKED else -1)
        if rules & RULE_MASKED and rules & RULE_UNMASKED:
            self._want_mask = -2  # both: every frame fails one of them
        self._frag_rule = (rules & RULE_FRAGMENTS) != 0
        self.messages = 0
        self.frames = 0
        self.pongs = 0
        self.last_pong = None
        self.close = None
        self.close_size = 0
        self.error = None
        self._remaining = 0
        self._msg_size = 0
        self._opcode = 0
        self._fin = 0
        self._hlen = 0
        self._clen = 0
        self._cmasked = 0
        self._collect = 0

    @property
    def mid_frame(self):
        """True while the forwarded stream ends inside a frame (header or payload)."""
        return self._hlen > 0 or self._remaining > 0

    cdef int _fail(self, msg, int code) except -1:
        self.error = FrameError(msg, close_code=code)
        return 0

    cdef inline int _check_rules(self, int b0, int b1, int opcode) except -1:
        """1 with ``error`` set when the header's first two bytes break a rule that is on, else 0."""
        cdef int rules = self.rules
        cdef int rsv = (b0 >> 4) & 7
        if rsv & ~self.allowed_rsv:
            return self._fail(f"RSV bits 0x{rsv:x} set without an extension that defines them", 1002) + 1
        if rules & RULE_OPCODES and (RESERVED_OPCODES >> opcode) & 1:
            return self._fail(f"reserved opcode 0x{opcode:x}", 1002) + 1
        if rules & RULE_MASKED and not b1 & 0x80:
            return self._fail("client frame is not masked", 1002) + 1
        if rules & RULE_UNMASKED and b1 & 0x80:
            return self._fail("server frame is masked", 1002) + 1
        if opcode >= 8:
            if rules & RULE_CONTROL:
                if not b0 & 0x80:
                    return self._fail(f"fragmented control frame (opcode 0x{opcode:x})", 1002) + 1
                if b1 & 127 > 125:
                    return self._fail(
                        f"control frame (opcode 0x{opcode:x}) payload longer than 125 bytes", 1002) + 1
        elif rules & RULE_FRAGMENTS:
            if opcode == 0:
                if not self._frag:
                    return self._fail("continuation frame without a message in progress", 1002) + 1
            elif self._frag:
                return self._fail(f"data frame (opcode 0x{opcode:x}) inside a fragmented message", 1002) + 1
        return 0

    cdef Py_ssize_t _header(self, const unsigned char *p, Py_ssize_t avail) except -2:
        """Check and accept the header at p[:avail] (avail >= 1).

        Returns its length, 0 when more bytes are needed, or -1 with ``error`` set.
        """
        cdef int b0 = p[0]
        cdef int opcode = b0 & 15
        cdef int b1
        cdef Py_ssize_t hl
        cdef unsigned long long length, size = 0, limit
        if avail < 2:
            return 0
        b1 = p[1]
        length = b1 & 127
        # Only a header the pre-filter cannot clear (a refused RSV bit, the wrong mask bit, a
        # control or reserved opcode, a continuation out of place) goes through every rule.
        if self._checks and (
            (b0 & self._bad_rsv) or opcode > 2
            or (self._want_mask != -1 and (b1 & 0x80) != self._want_mask)
            or (self._frag_rule and (opcode == 0) != self._frag)
        ) and self._check_rules(b0, b1, opcode):
            return -1
        if length <= 125:
            hl = 2
        elif opcode == 8:
            # _cbuf holds at most 125 bytes of CLOSE payload
            self._fail("close frame (opcode 0x8) payload longer than 125 bytes", 1002)
            return -1
        elif length == 126:
            if avail < 4:
                return 0
            length = (<unsigned long long>p[2] << 8) | p[3]
            hl = 4
        else:
            if avail < 3:
                return 0
            if p[2] & 0x80:
                self.error = _top_bit_error()
                return -1
            if avail < 10:
                return 0
            length = _be64(p + 2)
            hl = 10
        if self.max_frame_size and opcode < 8 and length > self.max_frame_size:
            self._fail(f"frame too big: {length} bytes > max_frame_size {self.max_frame_size}", 1009)
            return -1
        limit = self.max_message_size
        if limit and opcode < 8:
            # _msg_size is 0 unless a message is in progress (see the pure twin)
            size = length + self._msg_size if opcode == 0 else length
            if size > limit:
                self._fail(f"message too big: {size} bytes > max_message_size {limit}", 1009)
                return -1
        if b1 & 0x80:
            hl += 4
        if avail < hl:
            return 0
        # accepted
        self._opcode = opcode
        self._fin = b0 >> 7
        self._remaining = length
        if opcode < 8:
            self._msg_size = 0 if self._fin else size
            self._frag = 1 - self._fin
        elif opcode == 8 or (opcode == 10 and length <= 125):
            # CLOSE and PONG payloads are read: the close code, the heartbeat answer.
            self._collect = 1
            self._clen = 0
            self._cmasked = b1 & 0x80
            if self._cmasked:
                memcpy(self._ckey, p + hl - 4, 4)
            if opcode == 8:
                self.close_size = <int>(hl + length)
        return hl

    cdef int _finish(self) except -1:
        """The current frame is complete; 1 when it was the CLOSE frame."""
        cdef int i
        self.frames += 1
        if self._opcode < 8:
            if self._fin:
                self.messages += 1
            return 0
        if self._opcode != 8:
            if self._opcode == 10:
                self.pongs += 1
                if self._collect:
                    self._collect = 0
                    if self._cmasked:
                        for i in range(self._clen):
                            self._cbuf[i] ^= self._ckey[i & 3]
                    self.last_pong = PyBytes_FromStringAndSize(<const char *>self._cbuf, self._clen)
            return 0
        self._collect = 0
        if self._cmasked:
            for i in range(self._clen):
                self._cbuf[i] ^= self._ckey[i & 3]
        if self._clen < 2:
            self.close = (None, "")
        else:
            self.close = (
                (self._cbuf[0] << 8) | self._cbuf[1],
                PyUnicode_DecodeUTF8(<const char *>self._cbuf + 2, self._clen - 2, "replace"),
            )
        return 1

    cdef Py_ssize_t _scan(self, const unsigned char *p, Py_ssize_t end) except -1:
        cdef Py_ssize_t pos = 0, take, hl, old
        while pos < end:
            if self._remaining:
                take = end - pos
                if <unsigned long long>take > self._remaining:
                    take = <Py_ssize_t>self._remaining
                if self._collect:
                    memcpy(self._cbuf + self._clen, p + pos, take)
                    self._clen += <int>take
                pos += take
                self._remaining -= <unsigned long long>take
                if self._remaining:
                    break
                if self._finish():
                    return pos
                continue
            if self._hlen:
                # A partial header is pending; pos is 0 here.
                old = self._hlen
                take = 14 - old
                if take > end:
                    take = end
                memcpy(self._hbuf + old, p, take)
                hl = self._header(self._hbuf, old + take)
                if hl < 0:
                    return 0  # its first bytes were forwarded already
                if hl == 0:
                    self._hlen = <int>(old + take)
                    return end
                self._hlen = 0
                pos = hl - old
            else:
                hl = self._header(p + pos, end - pos)
                if hl < 0:
                    return pos
                if hl == 0:
                    memcpy(self._hbuf, p + pos, end - pos)
                    self._hlen = <int>(end - pos)
                    return end
                pos += hl
            if not self._remaining and self._finish():
                return pos
        return end

    def scan(self, data):
        """Consume one chunk; return how many leading bytes of it may be forwarded."""
        if self.close is not None or self.error is not None:
            return 0
        cdef Py_buffer b
        PyObject_GetBuffer(data, &b, PyBUF_SIMPLE)
        try:
            return self._scan(<const unsigned char *>b.buf, b.len)
        finally:
            PyBuffer_Release(&b)


# ---------------------------------------------------------------------------
# fan-out

cdef extern from *:
    """
    /* The type attribute `name` resolves to when it is a plain method: a descriptor of a
       type that promises (Py_TPFLAGS_METHOD_DESCRIPTOR, PEP 590) that descr(obj, *args)
       == descr.__get__(obj, type(obj))(*args) - Python functions, C method descriptors,
       Cython functions.  Borrowed; NULL when absent or anything else. */
    static PyObject *edgeproxy_plain_method(PyTypeObject *tp, PyObject *name) {
        PyObject *d = _PyType_Lookup(tp, name);
        if (d == NULL || !PyType_HasFeature(Py_TYPE(d), Py_TPFLAGS_METHOD_DESCRIPTOR))
            return NULL;
        return d;
    }
    /* True when `obj.name` is nothing but a lookup in type(obj)'s MRO: the generic
       getattr (no __getattribute__/__getattr__ override) and no per-instance __dict__
       that could shadow a method. */
    static int edgeproxy_type_lookup_only(PyTypeObject *tp) {
        if (tp->tp_getattro != PyObject_GenericGetAttr || tp->tp_dictoffset != 0)
            return 0;
    #ifdef Py_TPFLAGS_MANAGED_DICT
        if (PyType_HasFeature(tp, Py_TPFLAGS_MANAGED_DICT))
            return 0;
    #endif
        return 1;
    }
    /* The type's current version tag, 0 when it has none.  CPython gives a type a new tag
       whenever it or a base is modified (PyType_Modified) and never reuses one. */
    static unsigned int edgeproxy_type_tag(PyTypeObject *tp) {
        return PyType_HasFeature(tp, Py_TPFLAGS_VALID_VERSION_TAG) ? tp->tp_version_tag : 0;
    }
    """
    PyObject *edgeproxy_plain_method(PyTypeObject *tp, object name)
    bint edgeproxy_type_lookup_only(PyTypeObject *tp)
    unsigned int edgeproxy_type_tag(PyTypeObject *tp)
    PyTypeObject *Py_TYPE(object o)
    object PyObject_Vectorcall(object callable, PyObject **args, size_t nargsf, PyObject *kwnames)
    object PyObject_CallMethodNoArgs(object o, object name)
    object PyObject_CallMethodOneArg(object o, object name, object arg)
    long long LLONG_MAX


@cython.final
cdef class _Methods:
    """Per-type cache of the three transport methods ``write_many`` calls.

    ``t.write(data)`` (``PyObject_VectorcallMethod``, which Cython also emits) looks the
    name up on the type and the instance before every call.  The transports of one
    fan-out are nearly always of one type, so the methods are resolved once per type and
    called as ``descr(t, ...)`` (measured on 10,000 Cython-class transports: the whole
    fan-out ~30% faster; with a limit, three calls per transport, more).

    Used only where that is exactly ``t.write(data)``: plain methods (see
    ``edgeproxy_plain_method``) of a type with the generic attribute lookup whose
    instances have no ``__dict__`` to shadow them.  uvloop's transports (Cython classes)
    and ``__slots__`` classes qualify.  The type's version tag is re-checked before EVERY
    call, since the previous call may have modified the class or reassigned
    ``t.__class__``.  Anything else takes the generic ``obj.name(...)`` call.
    """

    cdef object tp  # the last type seen, or None; a strong ref so its address is not reused
    cdef unsigned int tag  # its version tag when loaded
    cdef bint fast  # the descriptors below are usable for instances of tp
    cdef object is_closing, get_write_buffer_size, write  # descriptor, or None: generic call

    cdef inline bint _ready(self, t) except -1:
        cdef PyTypeObject *tp = Py_TYPE(t)
        if <PyObject *>tp == <PyObject *>self.tp and edgeproxy_type_tag(tp) == self.tag:
            return self.fast
        self.tp = <object>tp
        self.fast = False
        self.is_closing = self.get_write_buffer_size = self.write = None
        if edgeproxy_type_lookup_only(tp):
            self.is_closing = _borrowed(edgeproxy_plain_method(tp, "is_closing"))
            self.get_write_buffer_size = _borrowed(edgeproxy_plain_method(tp, "get_write_buffer_size"))
            self.write = _borrowed(edgeproxy_plain_method(tp, "write"))
        # Read after the lookups, which assign a tag to a type that had none.  Without a
        # tag a change to the type could not be noticed: no caching then.
        self.tag = edgeproxy_type_tag(tp)
        self.fast = self.tag != 0 and edgeproxy_type_lookup_only(tp)
        return self.fast

    cdef inline object closing(self, t):
        """``t.is_closing()``."""
        cdef PyObject *args[1]
        if not self._ready(t) or self.is_closing is None:
            return PyObject_CallMethodNoArgs(t, "is_closing")
        args[0] = <PyObject *>t
        return PyObject_Vectorcall(self.is_closing, args, 1, NULL)

    cdef inline object buffered(self, t):
        """``t.get_write_buffer_size()``."""
        cdef PyObject *args[1]
        if not self._ready(t) or self.get_write_buffer_size is None:
            return PyObject_CallMethodNoArgs(t, "get_write_buffer_size")
        args[0] = <PyObject *>t
        return PyObject_Vectorcall(self.get_write_buffer_size, args, 1, NULL)

    cdef inline object write_to(self, t, data):
        """``t.write(data)``."""
        cdef PyObject *args[2]
        if not self._ready(t) or self.write is None:
            return PyObject_CallMethodOneArg(t, "write", data)
        args[0] = <PyObject *>t
        args[1] = <PyObject *>data
        return PyObject_Vectorcall(self.write, args, 2, NULL)


cdef inline object _borrowed(PyObject *p):
    return None if p == NULL else <object>p


cdef inline bint _above(size, limit, long long climit) except -1:
    """``size > limit`` (limit > 0; climit is limit capped to LLONG_MAX)."""
    cdef int overflow
    cdef long long n
    if PyLong_CheckExact(size):
        n = PyLong_AsLongLongAndOverflow(size, &overflow)
        if overflow == 0:
            return n > climit
        if overflow < 0:
            return False
    return PyObject_RichCompareBool(size, limit, Py_GT)


def write_many(transports, data, limit=0):
    """Write the complete frame `data` to every transport; return the skipped indexes.

    A transport is skipped when ``is_closing()`` is true or, with ``limit > 0``, when
    ``get_write_buffer_size() > limit``.  See :func:`edgeproxy.core.fanout.write_many`.
    """
    limit = PyNumber_Index(limit)
    cdef list skipped = []
    cdef Py_ssize_t i = 0
    cdef long long climit
    cdef _Methods m = _Methods.__new__(_Methods)
    if limit > 0:
        climit = LLONG_MAX if limit > LLONG_MAX else limit
        for t in transports:
            if m.closing(t) or _above(m.buffered(t), limit, climit):
                skipped.append(i)
            else:
                m.write_to(t, data)
            i += 1
    else:
        for t in transports:
            if m.closing(t):
                skipped.append(i)
            else:
                m.write_to(t, data)
            i += 1
    return skipped


# ---------------------------------------------------------------------------
# the relay hot path (twins of edgeproxy.core.relay)

cdef enum:
    SCAN_DROP = 0
    SCAN_FORWARD = 1
    SCAN_SLOW = 2

cdef class RelayCore:
    """Hot-path state of one relayed session; see :class:`edgeproxy.core.relay.RelayCore`.

    A Python subclass (``WebSocketRelay``) provides ``_after_stop``, the slow path.
    """

    cdef public FrameScanner client_frames
    cdef public FrameScanner upstream_frames
    cdef public bint passing
    cdef public bint active
    cdef public long long bytes_from_client
    cdef public long long bytes_from_upstream

    def __init__(self, max_message_size=0, max_frame_size=0, client_rules=0, upstream_rules=0, allowed_rsv=7):
        self.client_frames = FrameScanner(max_message_size, max_frame_size, client_rules, allowed_rsv)
        self.upstream_frames = FrameScanner(max_message_size, max_frame_size, upstream_rules, allowed_rsv)
        self.passing = True
        self.active = False
        self.bytes_from_client = 0
        self.bytes_from_upstream = 0

    cdef int _scan_read(self, bint client, const unsigned char *p, Py_ssize_t length,
                        Py_ssize_t *scanned) except -1:
        """Scan one read; SCAN_FORWARD: pass all of it on unchanged, SCAN_DROP: nothing, SCAN_SLOW: `_after_stop`.

        Shared by ``_relay`` (a read the loop handed over as bytes) and `RelayEngine`
        (a read in the engine's own buffer, which becomes bytes only on the slow path).
        """
        cdef FrameScanner scanner = self.client_frames if client else self.upstream_frames
        cdef long long pongs = scanner.pongs
        cdef Py_ssize_t n
        self.active = True
        if scanner.close is not None or scanner.error is not None:
            return SCAN_DROP  # nothing may follow a close frame or a broken frame
        n = scanner._scan(p, length)
        scanned[0] = n
        if client:
            self.bytes_from_client += n
        else:
            self.bytes_from_upstream += n
        if n == length and scanner.close is None and scanner.error is None and self.passing and scanner.pongs == pongs:
            return SCAN_FORWARD
        return SCAN_SLOW

    cdef object _relay(self, FrameScanner scanner, object data, bint client):
        cdef Py_buffer b
        cdef Py_ssize_t n = 0
        cdef int verdict
        PyObject_GetBuffer(data, &b, PyBUF_SIMPLE)
        try:
            verdict = self._scan_read(client, <const unsigned char *>b.buf, b.len, &n)
        finally:
            PyBuffer_Release(&b)
        if verdict == SCAN_FORWARD:
            return data
        if verdict == SCAN_DROP:
            return None
        return (<object>self)._after_stop(scanner, data, n, client)

    def from_client(self, data):
        """Bytes from the client; returns what to forward to the upstream."""
        return self._relay(self.client_frames, data, True)

    def from_upstream(self, data):
        """Bytes from the upstream; returns what to forward to the client."""
        return self._relay(self.upstream_frames, data, False)


@cython.final
cdef class RelayEndpoint:
    """The protocol of one side of a relayed WebSocket; see :class:`edgeproxy.core.relay.RelayEndpoint`."""

    cdef readonly RelayCore relay
    cdef readonly bint from_client
    cdef readonly object peer
    cdef readonly object owner
    cdef readonly object run_actions
    cdef object _peer_write

    def __init__(self, RelayCore relay not None, from_client, peer, owner, run_actions):
        self.relay = relay
        self.from_client = bool(from_client)
        self.peer = peer
        self.owner = owner
        self.run_actions = run_actions
        self._peer_write = peer.write

    def data_received(self, data):
        cdef RelayCore relay = self.relay
        if self.from_client:
            out = relay._relay(relay.client_frames, data, True)
        else:
            out = relay._relay(relay.upstream_frames, data, False)
        if out:
            self._peer_write(out)
        if (<object>relay).actions:
            self.run_actions()

    def eof_received(self):
        return self.owner.eof_received()

    def connection_lost(self, exc):
        self.owner.connection_lost(exc)

    def pause_writing(self):
        if not self.peer.is_closing():
            self.peer.pause_reading()

    def resume_writing(self):
        if not self.peer.is_closing():
            self.peer.resume_reading()


# ---------------------------------------------------------------------------
# the relay engine (twin of edgeproxy.core.relay.RelayEngine)
#
# Theory of operation
# -------------------
# After the 101 a relayed WebSocket needs nothing from Python for its ordinary
# traffic: read, scan the frame headers, write the same bytes to the other socket.
# On the loop's transports each read still costs a Python callback and a bytes
# object.  The engine takes both sockets off the loop (a dup of each descriptor; the
# loop's transport is then aborted, which only drops the loop's own descriptor) and
# waits on them in an epoll set of its own, whose descriptor is the one thing the
# loop watches: `run` is called when any relayed socket is ready.
#
# Per ready socket, in C: one read into the engine's buffer, `RelayCore._scan_read`
# on it, and on the fast path one send of those bytes to the peer (or an append to
# the peer's pending output when the kernel would not take them all; EPOLLOUT then
# finishes it).  So each socket gets at most one send per turn from the relay, and
# no Python object exists for the read.  Only the slow path (a close frame, a broken
# frame or a limit, a pong, a session the proxy is ending) makes a bytes object and
# calls the relay's Python policy, `_after_stop`, then `run_actions`, exactly as
# `RelayEndpoint.data_received` does.
#
# Each socket is wrapped in an `EngineSide`, which the connection objects use as
# their transport: write, close, abort, write_eof, pause_reading and the rest keep
# the asyncio semantics (close flushes first; connection_lost is called later, from
# the loop; pause_writing past the high-water mark pauses the peer's reading, as
# `RelayEndpoint.pause_writing` does).  A pair the engine cannot take (TLS, whose
# bytes only the loop's SSL layer can read, or a transport with bytes still in its
# write buffer) stays on the loop with `RelayEndpoint` protocols: the twin's path.

cdef extern from "<sys/epoll.h>" nogil:
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC
    ctypedef union epoll_data_t:
        void *ptr
        int fd
    struct epoll_event:
        unsigned int events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int sockfd, const void *buf, size_t n, int flags)
    int shutdown(int sockfd, int how)
    int getsockopt(int sockfd, int level, int optname, void *optval, unsigned int *optlen)
    enum:
        MSG_NOSIGNAL
        SHUT_WR
        SOL_SOCKET
        SO_ERROR

cdef extern from "<fcntl.h>" nogil:
    int fcntl(int fd, int cmd, int arg)
    enum:
        F_DUPFD_CLOEXEC

from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdlib cimport free, malloc, realloc
from posix.unistd cimport close as c_close
from posix.unistd cimport read as c_read

import logging as _logging
import os as _os

_engine_log = _logging.getLogger("edgeproxy")

cdef enum:
    ENGINE_READ_SIZE = 262144   # one read; what the loop's transports read at most, too
    ENGINE_MAX_EVENTS = 512     # ready sockets handled per `run`; the rest wait for the next turn


cdef inline object _os_error(int err):
    # OSError(errno, text) gives the errno's subclass (ConnectionResetError, BrokenPipeError...)
    return OSError(err, _os.strerror(err))


cdef inline bint _would_block(int err) noexcept nogil:
    return err == EAGAIN or err == EINTR  # EWOULDBLOCK == EAGAIN on Linux


@cython.final
cdef class _Detached:
    """The protocol a loop transport gets once the engine holds a dup of its socket: it hears nothing."""

    def data_received(self, data):
        pass  # the loop stopped reading this socket when it was aborted

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        pass  # the socket lives on in the engine; its owner hears of the end from there

    def pause_writing(self):
        pass  # nothing is written through the aborted transport

    def resume_writing(self):
        pass


cdef _Detached _DETACHED = _Detached()


@cython.final
cdef class EngineSide:
    """One socket of a relayed pair, read and written by a `RelayEngine`; an asyncio transport by duck typing.

    Made by `RelayEngine.relay_pair`, never directly.
    """

    cdef RelayEngine engine
    cdef readonly int fd
    cdef readonly bint from_client
    cdef EngineSide peer
    cdef RelayCore relay
    cdef object owner
    cdef object run_actions
    cdef dict extra
    cdef bint reading        # not paused by pause_reading()
    cdef bint eof            # the peer ended its side: nothing more to read
    cdef bint closing        # close() or abort() called
    cdef readonly bint closed  # the descriptor is closed
    cdef bint eof_wanted     # write_eof() called: shut down writing once the output is sent
    cdef bint write_shut
    cdef bint writing_paused  # past high water: the peer's reading was paused
    cdef bint registered
    cdef bint parked         # hung up while not read: out of the epoll set until resume_reading
    cdef unsigned int mask
    cdef char *out
    cdef Py_ssize_t out_start, out_end, out_cap
    cdef Py_ssize_t high_water, low_water

    def __cinit__(self):
        self.fd = -1

    def __dealloc__(self):
        if self.out != NULL:
            free(self.out)
        if not self.closed and self.fd >= 0:
            c_close(self.fd)

    # -- the engine's side of it ------------------------------------------------

    cdef int _update(self) except -1:
        """Tell epoll what this socket waits for now: reading unless paused or ended, writing while output waits."""
        cdef epoll_event ev
        cdef unsigned int want = 0
        cdef int op
        if self.closed or self.parked:
            return 0
        if self.reading and not self.eof and not self.closing:
            want |= EPOLLIN
        if self.out_end > self.out_start:
            want |= EPOLLOUT
        if self.registered and want == self.mask:
            return 0
        ev.events = want
        ev.data.ptr = <void *>self
        op = EPOLL_CTL_MOD if self.registered else EPOLL_CTL_ADD
        if epoll_ctl(self.engine.epfd, op, self.fd, &ev) < 0:
            raise _os_error(errno)
        self.registered = True
        self.mask = want
        return 0

    cdef int _park(self) except -1:
        """Hung up while nobody reads it: leave the epoll set (it would report HUP on every turn)."""
        cdef epoll_event ev
        if self.registered:
            epoll_ctl(self.engine.epfd, EPOLL_CTL_DEL, self.fd, &ev)
            self.registered = False
        self.parked = True
        return 0

    cdef int _read(self) except -1:
        cdef RelayEngine engine = self.engine
        cdef ssize_t n = c_read(self.fd, engine.buf, ENGINE_READ_SIZE)
        if n > 0:
            engine.reads += 1
            engine.bytes_read += n
            self._relay(engine.buf, n)
        elif n == 0:
            self._eof_received()
        elif not _would_block(errno):
            self._finish(_os_error(errno))
        return 0

    cdef int _relay(self, const unsigned char *p, Py_ssize_t n) except -1:
        """`RelayEndpoint.data_received` for bytes in a C buffer."""
        cdef RelayCore relay = self.relay
        cdef Py_ssize_t scanned = 0
        cdef int verdict = relay._scan_read(self.from_client, p, n, &scanned)
        if verdict == SCAN_FORWARD:
            # The fast path runs no Python, so it cannot have added relay actions:
            # every Python caller of the relay runs them at once.
            self.peer._send(<const char *>p, n)
            return 0
        if verdict == SCAN_SLOW:
            scanner = relay.client_frames if self.from_client else relay.upstream_frames
            out = (<object>relay)._after_stop(scanner, PyBytes_FromStringAndSize(<const char *>p, n),
                                              scanned, self.from_client)
            if out:
                self.peer.write(out)
        if (<object>relay).actions:
            self.run_actions()
        return 0

    cdef int _send(self, const char *p, Py_ssize_t n) except -1:
        """Write n bytes: straight to the kernel when nothing waits, else after what waits."""
        cdef ssize_t k = 0
        cdef Py_ssize_t size, need, cap
        cdef char *grown
        if n <= 0 or self.closed or self.eof_wanted:
            return 0
        if self.out_end == self.out_start:
            k = send(self.fd, p, n, MSG_NOSIGNAL)
            self.engine.writes += 1
            if k == n:
                self.engine.bytes_written += n
                return 0
            if k < 0:
                if not _would_block(errno):
                    self._finish(_os_error(errno))
                    return 0
                k = 0
            self.engine.bytes_written += k
        # keep the rest: compact, grow, append
        size = self.out_end - self.out_start
        need = size + n - k
        if self.out_start and self.out_end + n - k > self.out_cap:
            memcpy(self.out, self.out + self.out_start, size)
            self.out_start = 0
            self.out_end = size
        if need > self.out_cap:
            cap = self.out_cap * 2 if self.out_cap else 4096
            while cap < need:
                cap *= 2
            grown = <char *>realloc(self.out, cap)
            if grown == NULL:
                raise MemoryError()
            self.out = grown
            self.out_cap = cap
        memcpy(self.out + self.out_end, p + k, n - k)
        self.out_end += n - k
        self._update()
        if not self.writing_paused and self.out_end - self.out_start > self.high_water:
            self.writing_paused = True
            # RelayEndpoint.pause_writing: this side cannot take more, stop reading its feeder
            if not self.peer.closing:
                self.peer.pause_reading()
        return 0

    cdef int _flush(self) except -1:
        """EPOLLOUT: send what waits; then finish a close or a write_eof that waited for it."""
        cdef ssize_t k
        if self.out_end == self.out_start:
            return 0
        k = send(self.fd, self.out + self.out_start, self.out_end - self.out_start, MSG_NOSIGNAL)
        self.engine.writes += 1
        if k < 0:
            if not _would_block(errno):
                self._finish(_os_error(errno))
            return 0
        self.engine.bytes_written += k
        self.out_start += k
        if self.out_start == self.out_end:
            # Nothing waits: give the memory back (an idle session should cost as little as it can).
            free(self.out)
            self.out = NULL
            self.out_start = self.out_end = self.out_cap = 0
        if self.writing_paused and self.out_end - self.out_start <= self.low_water:
            self.writing_paused = False
            if not self.peer.closing:
                self.peer.resume_reading()
        if self.out_end == self.out_start:
            if self.closing:
                self._finish(None)
                return 0
            if self.eof_wanted and not self.write_shut:
                self.write_shut = True
                shutdown(self.fd, SHUT_WR)
        self._update()
        return 0

    cdef int _eof_received(self) except -1:
        self.eof = True
        self._update()
        if not self.owner.eof_received():
            self.close()
        return 0

    cdef int _finish(self, exc) except -1:
        """Close the descriptor now (pending output is dropped) and tell the owner from the loop."""
        cdef epoll_event ev
        if self.closed:
            return 0
        self.closed = self.closing = True
        if self.registered:
            epoll_ctl(self.engine.epfd, EPOLL_CTL_DEL, self.fd, &ev)
            self.registered = False
        c_close(self.fd)
        if self.out != NULL:
            free(self.out)
            self.out = NULL
        self.out_start = self.out_end = self.out_cap = 0
        self.engine._lost(self, exc)
        return 0

    # -- the asyncio transport interface the connection objects use ------------------

    def write(self, data):
        cdef Py_buffer b
        PyObject_GetBuffer(data, &b, PyBUF_SIMPLE)
        try:
            self._send(<const char *>b.buf, b.len)
        finally:
            PyBuffer_Release(&b)

    def writelines(self, list_of_data):
        # one send for all of them
        self.write(b"".join(list_of_data))

    def write_eof(self):
        if self.closing or self.eof_wanted:
            return
        self.eof_wanted = True
        if self.out_end == self.out_start:
            self.write_shut = True
            shutdown(self.fd, SHUT_WR)

    def can_write_eof(self):
        return True

    def close(self):
        if self.closing:
            return
        self.closing = True
        if self.out_end == self.out_start:
            self._finish(None)
        else:
            self._update()  # stop reading; EPOLLOUT sends the rest, then closes

    def abort(self):
        self._finish(None)

    def is_closing(self):
        return self.closing

    def pause_reading(self):
        if self.closing or not self.reading:
            return
        self.reading = False
        self._update()

    def resume_reading(self):
        if self.closing or self.reading:
            return
        self.reading = True
        self.parked = False
        self._update()

    def is_reading(self):
        return self.reading and not self.closing

    def get_write_buffer_size(self):
        return self.out_end - self.out_start

    def get_write_buffer_limits(self):
        return (self.low_water, self.high_water)

    def set_write_buffer_limits(self, high=None, low=None):
        # asyncio's rule: low defaults to high // 4, high to 4 * low or 64 KiB
        if high is None:
            high = 65536 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self.high_water = high
        self.low_water = low

    def get_extra_info(self, name, default=None):
        return self.extra.get(name, default)


@cython.final
cdef class RelayEngine:
    """Relays WebSocket pairs below the event loop; see the theory of operation above.

    Args:
        call_soon: ``loop.call_soon``; the owners' ``connection_lost`` runs through it,
            never inside the call that closed the socket (as with asyncio's transports).

    The loop watches `fileno` and calls `run` when it is readable.
    """

    cdef readonly int epfd
    cdef object call_soon
    cdef unsigned char *buf
    cdef set sides       # every open side: the epoll set points at them
    cdef list dead       # closed during this turn: kept alive until the turn ends
    cdef list lost       # (side, exc) whose owner has not been told yet
    cdef bint lost_scheduled
    cdef readonly long long turns, reads, writes, bytes_read, bytes_written, pairs, fallbacks

    def __cinit__(self):
        self.epfd = -1

    def __init__(self, call_soon):
        self.call_soon = call_soon
        self.sides = set()
        self.dead = []
        self.lost = []
        self.buf = <unsigned char *>malloc(ENGINE_READ_SIZE)
        if self.buf == NULL:
            raise MemoryError()
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise _os_error(errno)

    def __dealloc__(self):
        if self.epfd >= 0:
            c_close(self.epfd)
        if self.buf != NULL:
            free(self.buf)

    def fileno(self):
        """The descriptor the loop watches (readable when a relayed socket is ready)."""
        return self.epfd

    def relay_pair(self, relay, client_transport, upstream_transport, client_owner, upstream_owner, run_actions):
        """Relay `relay`'s session from now on; returns the (client, upstream) transports to use.

        Each owner hears ``eof_received`` and ``connection_lost`` of its socket.  Bytes
        already read past the handshake go in with `feed`, once the owners use the
        returned transports.  A pair the engine cannot take stays on the loop (see
        the theory of operation), as does a relay not built on the compiled `RelayCore`.
        """
        self.pairs += 1
        if (self.epfd < 0 or not isinstance(relay, RelayCore)
                or not (_adoptable(client_transport) and _adoptable(upstream_transport))):
            self.fallbacks += 1
            return _relay_on_loop(relay, client_transport, upstream_transport, client_owner, upstream_owner,
                                  run_actions)
        cdef EngineSide client = self._adopt(client_transport, True, relay, client_owner, run_actions)
        cdef EngineSide upstream = self._adopt(upstream_transport, False, relay, upstream_owner, run_actions)
        client.peer = upstream
        upstream.peer = client
        client._update()
        upstream._update()
        return client, upstream

    def feed(self, side, data):
        """Relay `data` as if `side` (a transport `relay_pair` returned) had just read it."""
        cdef Py_buffer b
        if not data or side.is_closing():
            return
        if type(side) is not EngineSide:
            side.get_protocol().data_received(data)
            return
        PyObject_GetBuffer(data, &b, PyBUF_SIMPLE)
        try:
            (<EngineSide>side)._relay(<const unsigned char *>b.buf, b.len)
        finally:
            PyBuffer_Release(&b)

    cdef EngineSide _adopt(self, transport, bint from_client, RelayCore relay, owner, run_actions):
        cdef EngineSide side = EngineSide.__new__(EngineSide)
        fd = fcntl(transport.get_extra_info("socket").fileno(), F_DUPFD_CLOEXEC, 0)
        if fd < 0:
            raise _os_error(errno)
        side.engine = self
        side.fd = fd
        side.from_client = from_client
        side.relay = relay
        side.owner = owner
        side.run_actions = run_actions
        side.extra = {"peername": transport.get_extra_info("peername"),
                      "sockname": transport.get_extra_info("sockname")}
        side.reading = transport.is_reading()
        low, high = transport.get_write_buffer_limits()
        side.low_water = low
        side.high_water = high
        # The loop lets go of its descriptor; the socket lives on in the dup.
        transport.set_protocol(_DETACHED)
        transport.abort()
        self.sides.add(side)
        return side

    cdef int _lost(self, EngineSide side, exc) except -1:
        self.sides.discard(side)
        self.dead.append(side)
        self.lost.append((side, exc))
        if not self.lost_scheduled:
            self.lost_scheduled = True
            self.call_soon(self._tell_owners)
        return 0

    def _tell_owners(self):
        """Each closed socket's owner hears connection_lost, from the loop (asyncio's order)."""
        cdef EngineSide side
        self.lost_scheduled = False
        batch = self.lost
        self.lost = []
        for item in batch:
            side = <EngineSide>item[0]
            owner = side.owner
            # The session is over for this side: let go of what it pointed at.
            side.owner = side.run_actions = side.relay = side.peer = None
            try:
                owner.connection_lost(item[1])
            except Exception:
                _engine_log.exception("relay engine: connection_lost failed")

    def run(self):
        """One turn: handle every relayed socket that is ready now (the loop calls this)."""
        cdef epoll_event events[ENGINE_MAX_EVENTS]
        cdef int n, i
        cdef unsigned int ev
        cdef EngineSide side
        n = epoll_wait(self.epfd, events, ENGINE_MAX_EVENTS, 0)
        if n < 0:
            if errno == EINTR:
                return
            raise _os_error(errno)
        self.turns += 1
        try:
            for i in range(n):
                side = <EngineSide>events[i].data.ptr
                if side.closed:
                    continue  # closed earlier in this turn
                ev = events[i].events
                try:
                    if ev & (EPOLLOUT | EPOLLERR | EPOLLHUP):
                        side._flush()  # on a hang-up, pending output meets its error here
                        if side.closed:
                            continue
                    if ev & (EPOLLIN | EPOLLHUP | EPOLLERR):
                        if side.mask & EPOLLIN:
                            side._read()  # data, EOF or the error
                        elif ev & EPOLLERR:
                            side._finish(_socket_error(side.fd))
                        elif not side.mask & EPOLLOUT:
                            side._park()
                except Exception as exc:
                    # as asyncio does when a protocol callback fails: log it, close that socket
                    _engine_log.exception("relay engine: a relayed socket's callback failed; closing it")
                    side._finish(exc)
        finally:
            self.dead.clear()

    def close(self):
        """Abort every socket still relayed and release the epoll set (the server is stopping)."""
        cdef EngineSide side
        for side in list(self.sides):
            side._finish(None)
        if self.epfd >= 0:
            c_close(self.epfd)
            self.epfd = -1

    def stats(self):
        """Counters since the engine started (for the metrics and the benchmarks)."""
        return {"sockets": len(self.sides), "pairs": self.pairs, "fallbacks": self.fallbacks,
                "turns": self.turns, "reads": self.reads, "writes": self.writes,
                "bytes_read": self.bytes_read, "bytes_written": self.bytes_written}


cdef object _socket_error(int fd):
    cdef int err = 0
    cdef unsigned int size = sizeof(err)
    if getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &size) < 0 or err == 0:
        err = errno if errno else 104  # ECONNRESET: the error epoll reported is gone
    return _os_error(err)


cdef bint _adoptable(transport) except -1:
    """A plain socket whose transport has nothing left to write (its bytes would be lost)."""
    if transport.get_extra_info("sslcontext") is not None or transport.is_closing():
        return False
    if transport.get_extra_info("socket") is None:
        return False
    return transport.get_write_buffer_size() == 0


cdef object _relay_on_loop(relay, client_transport, upstream_transport, client_owner, upstream_owner, run_actions):
    """The twin's path: both sockets stay on their loop transports, with `RelayEndpoint` protocols."""
    client_transport.set_protocol(RelayEndpoint(relay, True, upstream_transport, client_owner, run_actions))
    upstream_transport.set_protocol(RelayEndpoint(relay, False, client_transport, upstream_owner, run_actions))
    return client_transport, upstream_transport


# ---------------------------------------------------------------------------
# the resume envelope (twins of edgeproxy.core.envelope)

cdef enum:
    MAX_SEQ_DIGITS = 18


cdef struct _Frame:
    int fin_data      # 1 for a final, unfragmented, rsv-0 text or binary frame
    int opcode
    int masked
    unsigned char key[4]
    unsigned long long length
    Py_ssize_t hl


cdef int _plain_data_frame(const unsigned char *p, Py_ssize_t avail, int masked, unsigned long long cmax,
                           _Frame *f) except -1:
    """1 when the frame at p is one the fast path takes (see envelope._plain_data_frame), else 0.

    A 64-bit length with its top bit set raises FrameError, as parse_header does.
    """
    cdef unsigned char b0, b1
    cdef unsigned long long length
    cdef Py_ssize_t hl = 2
    if avail < 2:
        return 0
    b0 = p[0]
    b1 = p[1]
    length = b1 & 127
    if length == 126:
        if avail < 4:
            return 0
        length = (<unsigned long long>p[2] << 8) | p[3]
        hl = 4
    elif length == 127:
        if avail < 3:
            return 0
        if p[2] & 0x80:
            raise _top_bit_error()
        if avail < 10:
            return 0
        length = _be64(p + 2)
        hl = 10
    f.masked = (b1 & 0x80) != 0
    if f.masked:
        if avail < hl + 4:
            return 0
        memcpy(f.key, p + hl, 4)
        hl += 4
    f.opcode = b0 & 15
    f.fin_data = (b0 & 0xF0) == 0x80 and (f.opcode == 1 or f.opcode == 2)
    f.length = length
    f.hl = hl
    if not f.fin_data or f.masked != masked:
        return 0
    if (cmax and length > cmax) or <unsigned long long>(avail - hl) < length:
        return 0
    return 1


cdef inline int _decimal_digits(unsigned long long n) noexcept nogil:
    cdef int d = 1
    while n >= 10:
        n //= 10
        d += 1
    return d


cdef int _check_start(Py_ssize_t pos, seq) except -1:
    if pos < 0:
        raise ValueError("pos must be >= 0")
    if not 0 <= seq < 2**63:
        raise ValueError("seq must be in 0..2**63-1")
    return 0


def number_frames(buf, Py_ssize_t pos, seq, max_size):
    """Re-frame complete unmasked data frames as ``D<seq>:`` messages; see :func:`edgeproxy.core.envelope.number_frames`.

    Two passes over the headers: the first finds the run and its encoded size,
    the second writes every frame into one bytes object.
    """
    _check_start(pos, seq)
    cdef unsigned long long cseq = seq
    cdef unsigned long long cmax = max_size
    cdef unsigned long long s
    cdef Py_buffer b
    cdef const unsigned char *p
    cdef _Frame f
    cdef char prefix[24]
    cdef int plen, i
    cdef Py_ssize_t start = pos, total = 0, count = 0, k, hl, at
    cdef unsigned long long end_at
    cdef unsigned char *o
    cdef unsigned char *e
    PyObject_GetBuffer(buf, &b, PyBUF_SIMPLE)
    try:
        p = <const unsigned char *>b.buf
        s = cseq
        while _plain_data_frame(p + pos, b.len - pos, 0, cmax, &f):
            s += 1
            plen = _decimal_digits(s) + 2
            total += _header_size(plen + f.length, False) + plen + <Py_ssize_t>f.length
            count += 1
            pos += f.hl + <Py_ssize_t>f.length
        run = PyBytes_FromStringAndSize(NULL, total)
        ends = PyBytes_FromStringAndSize(NULL, 8 * count)
        o = <unsigned char *>PyBytes_AS_STRING(run)
        e = <unsigned char *>PyBytes_AS_STRING(ends)
        pos = start
        at = 0
        for k in range(count):
            _plain_data_frame(p + pos, b.len - pos, 0, cmax, &f)
            cseq += 1
            plen = snprintf(prefix, sizeof(prefix), "D%llu:", cseq)
            hl = _put_header(o + at, 0x80 | f.opcode, plen + f.length, NULL)
            memcpy(o + at + hl, prefix, plen)
            memcpy(o + at + hl + plen, p + pos + f.hl, f.length)
            at += hl + plen + <Py_ssize_t>f.length
            end_at = at
            for i in range(8):  # little-endian, whatever the machine
                e[8 * k + i] = (end_at >> (8 * i)) & 0xFF
            pos += f.hl + <Py_ssize_t>f.length
    finally:
        PyBuffer_Release(&b)
    return pos, cseq, run, ends


cdef const char *ACK_PREFIX = b'C{"t":"ack","seq":'
cdef enum:
    ACK_PREFIX_LEN = 18


cdef long long _ack_seq(const unsigned char *payload, Py_ssize_t n, const unsigned char *key) noexcept:
    """N of a masked payload that is exactly ``C{"t":"ack","seq":N}`` (1-18 digits); else -1."""
    cdef Py_ssize_t i
    cdef unsigned char c
    cdef long long seq = 0
    if n < ACK_PREFIX_LEN + 2 or n > ACK_PREFIX_LEN + MAX_SEQ_DIGITS + 1:
        return -1
    for i in range(ACK_PREFIX_LEN):
        if (payload[i] ^ key[i & 3]) != <unsigned char>ACK_PREFIX[i]:
            return -1
    if (payload[n - 1] ^ key[(n - 1) & 3]) != 125:  # '}'
        return -1
    if n > ACK_PREFIX_LEN + 2 and (payload[ACK_PREFIX_LEN] ^ key[ACK_PREFIX_LEN & 3]) == 48:
        return -1  # a leading zero: not a JSON number, the slow path refuses it
    for i in range(ACK_PREFIX_LEN, n - 1):
        c = payload[i] ^ key[i & 3]
        if c < 48 or c > 57:
            return -1
        seq = seq * 10 + (c - 48)
    return seq


def unwrap_frames(buf, Py_ssize_t pos, in_seq, max_size, mask_key_source, out_seq):
    """Strip the ``D<seq>:`` envelope from complete client data frames; see :func:`edgeproxy.core.envelope.unwrap_frames`."""
    _check_start(pos, in_seq)
    cdef unsigned long long cin = in_seq
    cdef unsigned long long cmax = max_size
    cdef long long cout = out_seq
    cdef long long ack = -1
    cdef long long acked
    cdef unsigned long long dseq
    cdef Py_buffer b
    cdef Py_buffer kb
    cdef const unsigned char *p
    cdef const unsigned char *payload
    cdef _Frame f
    cdef Py_ssize_t i, n, skip, body, hl
    cdef int digits
    cdef unsigned char c
    cdef unsigned char k8[8]
    cdef unsigned char *o
    cdef list frames = []
    cdef Py_ssize_t duplicates = 0
    PyObject_GetBuffer(buf, &b, PyBUF_SIMPLE)
    try:
        p = <const unsigned char *>b.buf
        while True:
            if not _plain_data_frame(p + pos, b.len - pos, 1, cmax, &f):
                break
            payload = p + pos + f.hl
            n = <Py_ssize_t>f.length
            if n and f.opcode == 1 and (payload[0] ^ f.key[0]) == 67:  # 'C': only a plain ack is taken
                acked = _ack_seq(payload, n, f.key)
                if acked < 0 or acked > cout:
                    break
                if acked > ack:
                    ack = acked
                pos += f.hl + n
                continue
            # "D<digits>:" with at most MAX_SEQ_DIGITS digits, read through the mask
            if n < 3 or (payload[0] ^ f.key[0]) != 68:  # 'D'
                break
            dseq = 0
            digits = 0
            i = 1
            while i < n and i <= MAX_SEQ_DIGITS + 1:
                c = payload[i] ^ f.key[i & 3]
                if c == 58:  # ':'
                    break
                if c < 48 or c > 57:
                    digits = -1
                    break
                dseq = dseq * 10 + (c - 48)
                digits += 1
                i += 1
            if digits <= 0 or i >= n or i > MAX_SEQ_DIGITS + 1 or (payload[i] ^ f.key[i & 3]) != 58:
                break
            if dseq > cin + 1:
                break
            pos += f.hl + n
            if dseq <= cin:
                duplicates += 1
                continue
            cin = dseq
            skip = i + 1
            body = n - skip
            key = mask_key_source()
            PyObject_GetBuffer(key, &kb, PyBUF_SIMPLE)
            try:
                if kb.len != 4:
                    raise ValueError("mask key must be exactly 4 bytes")
                # unmask with the client's key (from offset skip) and mask with the new one, in one pass
                for i in range(8):
                    k8[i] = f.key[(i + skip) & 3] ^ (<const unsigned char *>kb.buf)[i & 3]
                out = PyBytes_FromStringAndSize(NULL, _header_size(body, True) + body)
                o = <unsigned char *>PyBytes_AS_STRING(out)
                hl = _put_header(o, 0x80 | f.opcode, body, <const unsigned char *>kb.buf)
            finally:
                PyBuffer_Release(&kb)
            _xor(payload + skip, o + hl, body, k8)
            frames.append(out)
    finally:
        PyBuffer_Release(&b)
    return pos, cin, frames, duplicates, ack
