"""A test plugin that prints a wrong handshake line."""

from __future__ import annotations

print("HELLO I AM A PLUGIN", flush=True)
