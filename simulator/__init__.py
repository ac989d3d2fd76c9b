"""Link simulator: impair the edge-hub path (loss, delay, outages, NAT rebinding, bandwidth)."""
