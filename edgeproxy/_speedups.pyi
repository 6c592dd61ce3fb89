"""Typed contract of the compiled twins in edgeproxy._speedups (built from ext/_speedups.pyx).

Same signatures and behaviour as edgeproxy.core.frames, edgeproxy.core.fanout,
edgeproxy.core.relay and edgeproxy.core.envelope; import them via edgeproxy.core._accel.
tests/test_speedups_stub.py checks that every name, parameter and default here matches
the built module.
"""

from collections.abc import Callable, Iterable

from typing_extensions import Buffer

from edgeproxy.core.fanout import FanoutTransport
from edgeproxy.errors import FrameError

__all__ = [
    "apply_mask",
    "parse_header",
    "encode_header",
    "FrameScanner",
    "write_many",
    "RelayCore",
    "RelayEndpoint",
    "number_frames",
    "unwrap_frames",
]

def apply_mask(data: Buffer, key: Buffer, offset: int = 0) -> bytes: ...
def parse_header(buf: Buffer, pos: int = 0) -> tuple[int, int, int, bytes | None, int, int] | None: ...
def encode_header(
    opcode: int, length: int, fin: bool = True, rsv: int = 0, mask_key: Buffer | None = None
) -> bytes: ...

class FrameScanner:
    """Follows frame boundaries in ONE direction of a relayed stream without copying payloads."""

    def __init__(
        self, max_message_size: int = 0, max_frame_size: int = 0, rules: int = 0, allowed_rsv: int = 7
    ) -> None: ...
    @property
    def max_message_size(self) -> int: ...
    @property
    def max_frame_size(self) -> int: ...
    @property
    def rules(self) -> int: ...
    @property
    def allowed_rsv(self) -> int: ...
    @property
    def messages(self) -> int: ...
    @property
    def frames(self) -> int: ...
    @property
    def pongs(self) -> int: ...
    @property
    def last_pong(self) -> bytes | None: ...
    @property
    def close(self) -> tuple[int | None, str] | None: ...
    @property
    def error(self) -> FrameError | None: ...
    @property
    def mid_frame(self) -> bool: ...
    def scan(self, data: Buffer) -> int: ...

def write_many(transports: Iterable[FanoutTransport], data: bytes, limit: int = 0) -> list[int]: ...

class RelayCore:
    """Hot-path state of one relayed WebSocket (twin of edgeproxy.core.relay.RelayCore).

    Subclasses provide ``_after_stop(scanner, data, n, client)``, the slow path.
    """

    client_frames: FrameScanner
    upstream_frames: FrameScanner
    passing: bool
    active: bool
    bytes_from_client: int
    bytes_from_upstream: int
    def __init__(
        self,
        max_message_size: int = 0,
        max_frame_size: int = 0,
        client_rules: int = 0,
        upstream_rules: int = 0,
        allowed_rsv: int = 7,
    ) -> None: ...
    def from_client(self, data: bytes) -> bytes | None: ...
    def from_upstream(self, data: bytes) -> bytes | None: ...

class RelayEndpoint:
    """The protocol of one side of a relayed WebSocket (twin of edgeproxy.core.relay.RelayEndpoint)."""

    @property
    def relay(self) -> RelayCore: ...
    @property
    def from_client(self) -> bool: ...
    @property
    def peer(self) -> object: ...
    @property
    def owner(self) -> object: ...
    @property
    def run_actions(self) -> Callable[[], None]: ...
    def __init__(
        self, relay: RelayCore, from_client: bool, peer: object, owner: object, run_actions: Callable[[], None]
    ) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> bool | None: ...
    def connection_lost(self, exc: BaseException | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...

def number_frames(buf: Buffer, pos: int, seq: int, max_size: int) -> tuple[int, int, bytes, bytes]: ...
def unwrap_frames(
    buf: Buffer, pos: int, in_seq: int, max_size: int, mask_key_source: Callable[[], Buffer], out_seq: int
) -> tuple[int, int, list[bytes], int, int]: ...
