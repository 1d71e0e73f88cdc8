"""Plugins used by the tests (copied into a --plugins-dir)."""
