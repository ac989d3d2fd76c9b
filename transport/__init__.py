"""Squall transport: the wire format, session state machines, QUIC and TLS plumbing."""
