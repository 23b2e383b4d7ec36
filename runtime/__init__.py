"""Streaming runtime (sessions, backends, devices, media); installed as hallolive_rt.runtime."""
