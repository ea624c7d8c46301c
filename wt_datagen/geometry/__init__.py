"""Geometry: the exact layered ray caster (engines propose, numba kernels decide) and the tracks of
material points through sequences. Knows nothing of files, shards or runs."""
