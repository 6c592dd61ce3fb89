"""Channel placement on backplane shards: jump consistent hash over the tenant of a channel.

Theory of operation
===================

With ``[backplane] urls = [a, b, c]`` (Redis), every channel lives on exactly one
shard: its sequence counter, its history and its pub/sub traffic.  The shard is
``jump_hash(hash(tenant), len(urls))`` (Lamping and Veach, "A Fast, Minimal Memory,
Consistent Hash Algorithm", 2014): adding a shard at the END of the list moves only
about ``1/n`` of the tenants, and every instance computes the same answer with no
coordination.

The *tenant* of a channel is the part before its first ``:`` (``acme:orders`` ->
``acme``), or the whole name when it has none.  So all channels of one tenant sit on
one shard: a noisy tenant loads one Redis, and a tenant's channels can be moved
(or given their own deployment, see README "Scale-out") as a unit.

Changing the list (other than appending) moves channels: their history stays on the
old shard and the next publication starts a new epoch on the new one, so clients
resume with ``recovered: false`` once.  Nothing here touches the network.
"""

from __future__ import annotations

import hashlib

__all__ = ["jump_hash", "shard_of", "tenant_of"]


def tenant_of(channel: str) -> str:
    """``acme:orders`` -> ``acme``; a channel without ``:`` is its own tenant."""
    return channel.split(":", 1)[0]


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash of the 64-bit ``key`` onto ``range(buckets)``."""
    if buckets < 1:
        raise ValueError("buckets must be >= 1")
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


def shard_of(channel: str, shards: int) -> int:
    """The shard (index into ``urls``) that holds ``channel``."""
    if shards == 1:
        return 0
    digest = hashlib.blake2b(tenant_of(channel).encode(), digest_size=8).digest()
    return jump_hash(int.from_bytes(digest, "big"), shards)
