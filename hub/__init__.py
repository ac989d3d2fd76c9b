"""The hub: QUIC server, ingest, durable log, presence, kernel, consumers and HTTP API."""
