"""The key custody service, `strongroom serve`, and its client (docs/server.md)."""
