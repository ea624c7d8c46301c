"""The RGB input image of a view, pixel-aligned with layer 0."""
