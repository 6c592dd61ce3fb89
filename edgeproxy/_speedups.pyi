"""Typed contract of the compiled twins in edgeproxy._speedups (built from ext/_speedups.pyx).

Same signatures and behaviour as edgeproxy.core.frames and edgeproxy.core.fanout; import
them via edgeproxy.core._accel.
"""

from collections.abc import Iterable

from typing_extensions import Buffer

from edgeproxy.core.fanout import FanoutTransport
from edgeproxy.errors import FrameError

__all__ = ["apply_mask", "parse_header", "encode_header", "FrameScanner", "write_many"]

def apply_mask(data: Buffer, key: Buffer, offset: int = 0) -> bytes: ...
def parse_header(buf: Buffer, pos: int = 0) -> tuple[int, int, int, bytes | None, int, int] | None: ...
def encode_header(
    opcode: int, length: int, fin: bool = True, rsv: int = 0, mask_key: Buffer | None = None
) -> bytes: ...

class FrameScanner:
    """Follows frame boundaries in ONE direction of a relayed stream without copying payloads."""

    def __init__(self, max_message_size: int = 0) -> None: ...
    @property
    def max_message_size(self) -> int: ...
    @property
    def messages(self) -> int: ...
    @property
    def frames(self) -> int: ...
    @property
    def close(self) -> tuple[int | None, str] | None: ...
    @property
    def error(self) -> FrameError | None: ...
    @property
    def mid_frame(self) -> bool: ...
    def scan(self, data: Buffer) -> int: ...

def write_many(transports: Iterable[FanoutTransport], data: bytes, limit: int = 0) -> list[int]: ...
