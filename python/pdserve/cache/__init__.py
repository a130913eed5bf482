"""Typed Python wrappers of the C++ cache core (block pools, radix tree, evictor) and GPU copy kernels."""
