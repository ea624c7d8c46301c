"""Shard inspection: read (``wt_datagen.reader``), check (``rules``, across a clip's samples ``clips``),
summarise (``summary``), picture (``pictures``), export (``export``: PLY; ``export_tracks``: TAPVid-3D and
PointOdyssey); ``cli`` is `wt-datagen inspect`, ``export_tracks`` also `wt-datagen export-tracks`. Reads
shards and the schema only."""

from ..reader import Problem, Sample, ShardError, decode, expand_shards, iter_raw, read_samples
from .export import export_ply, layered_points
from .export_tracks import export_tracks
from .pictures import contact_sheet
from .rules import check
from .summary import format_summary, scan, summarise, validate

__all__ = ["Problem", "Sample", "ShardError", "check", "decode", "contact_sheet", "expand_shards", "export_ply",
           "export_tracks", "format_summary", "iter_raw", "layered_points", "read_samples", "scan", "summarise",
           "validate"]
