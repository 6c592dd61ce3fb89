"""The I/O layer: the only part of edgeproxy that touches sockets and the event loop."""
