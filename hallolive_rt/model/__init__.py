"""Model definitions: one sub-model per file."""
