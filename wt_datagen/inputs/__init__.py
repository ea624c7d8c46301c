"""Inputs: mesh assets and dynamic sequences as users have them, validated; the built-in assets.

Knows nothing of cameras, casting, shards or runs."""
