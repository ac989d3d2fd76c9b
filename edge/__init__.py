"""The edge agent: spool, batcher/sender, heartbeats, local inputs (API, syslog, JSON lines)."""
