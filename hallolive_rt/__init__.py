"""hallolive-rt: compiled, low-latency streaming inference for Hallo-Live."""
