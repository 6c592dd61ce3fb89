"""The sans-IO core of edgeproxy: pure protocol logic, no sockets, no event loop, no clock."""
