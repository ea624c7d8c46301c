"""Shard inspection: read (``wt_datagen.reader``), check (``rules``), summarise (``summary``), picture
(``pictures``), export (``export``); ``cli`` is `wt-datagen inspect`. Reads shards and the schema only."""

from ..reader import Problem, Sample, ShardError, decode, expand_shards, iter_raw, read_samples
from .export import export_ply, layered_points
from .pictures import contact_sheet
from .rules import check
from .summary import format_summary, scan, summarise, validate

__all__ = ["Problem", "Sample", "ShardError", "check", "decode", "contact_sheet", "expand_shards", "export_ply",
           "format_summary", "iter_raw", "layered_points", "read_samples", "scan", "summarise", "validate"]
