"""Backends of the streaming session: eager, cudagraph, aoti, tensorrt."""
