"""Channel hubs: the sans-IO core of edgeproxy's publish/subscribe fan-out.

=================  ============================================================
module             what
=================  ============================================================
``protocol``       the JSON protocol (parse client messages, encode the hub's),
                   close codes, `HubError`
``token``          JWT HS256 verification (and signing), channel patterns
``history``        per-channel stream: seq, epoch, history ring (size, TTL)
``channels``       the node's registry: members, encode-once queue, resume merge
``backplane``      the `Backplane` interface and the in-memory default
=================  ============================================================

The transport side is ``edgeproxy.transport.hub``; the client is ``edgeproxy.client``.
"""
