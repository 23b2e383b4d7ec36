"""Embedded official-schema JSON configs (full size as released, tiny for tests and the default demo)."""
