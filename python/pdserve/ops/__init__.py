"""GPU operators for the engine's fast path (Triton): paged decode attention and friends.

Importing this package does not import Triton; each operator loads it on first use, so CPU-only
installs (no Triton) still import the engine.
"""
