"""edgeproxy: an HTTP/1.1 and WebSocket edge proxy on uvloop with a sans-IO core."""

__version__ = "0.1.0"
