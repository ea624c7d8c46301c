"""One pass over shards: the summary figures, the problems, and the samples asked for."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..reader import Problem, Sample, expand_shards, read_samples
from .clips import ClipLedger
from .rules import check, shape_ok


@dataclass
class _Stats:
    """Running totals over decoded samples; arrays grow to the largest K seen."""

    views: int = 0
    clips: int = 0
    payload_bytes: int = 0
    malformed: int = 0
    tracks: int = 0
    per_asset: Counter = field(default_factory=Counter)
    res_k: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)
    layer_hist: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))  # pixels with exactly k
    dmin: np.ndarray = field(default_factory=lambda: np.zeros(0))
    dmax: np.ndarray = field(default_factory=lambda: np.zeros(0))
    truncated: int = 0
    dynamic_tracks: int = 0
    labelled_tracks: int = 0  # tracks of clips that store the dynamic flag
    cov_min: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per layer, over clip frames
    cov_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    cov_frames: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cov_worst: str = ""  # where layer 0's minimum is

    def add(self, s: Sample, ok: bool) -> None:
        self.payload_bytes += s.nbytes
        meta = s.meta if isinstance(s.meta, dict) else {}
        self.per_asset[str(meta.get("asset_id", meta.get("sequence_id", "?")))] += 1
        self.versions[str(meta.get("schema_version", "?"))] += 1
        if s.is_clip:
            self.clips += 1
            wx = s.tracks.get("world_xyz")
            self.tracks += int(wx.shape[1]) if wx is not None and wx.ndim == 3 else 0
            dyn = s.tracks.get("dynamic")
            if dyn is not None and dyn.dtype == bool:
                self.dynamic_tracks += int(np.count_nonzero(dyn))
                self.labelled_tracks += dyn.size
            self._add_coverage(s)
            return
        self.views += 1
        if not ok:
            self.malformed += 1
            return
        depth, valid = s.layers["depth"], s.layers["valid"]
        K, H, W = depth.shape
        self.res_k[f"{W}x{H} K={K}"] += 1
        self._grow(K)
        self.layer_hist[: K + 1] += np.bincount(valid.sum(0).ravel(), minlength=K + 1)
        with np.errstate(invalid="ignore"):
            self.dmin[:K] = np.fmin(self.dmin[:K], np.where(valid, depth, np.inf).min(axis=(1, 2)))
            self.dmax[:K] = np.fmax(self.dmax[:K], np.where(valid, depth, -np.inf).max(axis=(1, 2)))
        self.truncated += int(np.count_nonzero(s.layers["num_hits"] > K))

    def _add_coverage(self, s: Sample) -> None:
        c = s.tracks.get("coverage")
        if c is None or c.ndim != 2 or not c.size:
            return
        K = c.shape[1]
        if len(self.cov_min) < K:
            grow = K - len(self.cov_min)
            self.cov_min = np.concatenate([self.cov_min, np.full(grow, np.inf)])
            self.cov_sum = np.concatenate([self.cov_sum, np.zeros(grow)])
            self.cov_frames = np.concatenate([self.cov_frames, np.zeros(grow, np.int64)])
        c = c.astype(np.float64)
        has = ~np.isnan(c)
        low = np.where(has, c, np.inf).min(0)
        if has[:, 0].any() and low[0] < self.cov_min[0]:
            self.cov_worst = f"{s.key} frame {int(np.nanargmin(c[:, 0]))}"
        self.cov_min[:K] = np.minimum(self.cov_min[:K], low)
        self.cov_sum[:K] += np.where(has, c, 0).sum(0)
        self.cov_frames[:K] += has.sum(0)

    def _grow(self, K: int) -> None:
        n = len(self.dmin)
        if K > n:
            self.layer_hist = np.concatenate([self.layer_hist, np.zeros(K - n, np.int64)])
            self.dmin = np.concatenate([self.dmin, np.full(K - n, np.inf)])
            self.dmax = np.concatenate([self.dmax, np.full(K - n, -np.inf)])

    def report(self, paths: list[Path], problems: list[Problem]) -> dict:
        pixels = int(self.layer_hist.sum())
        at_least = np.cumsum(self.layer_hist[::-1])[::-1][1:] / max(pixels, 1)  # index k-1: >= k layers
        counts = sorted(self.per_asset.values())
        return {
            "shards": len(paths),
            "shard_bytes": int(sum(p.stat().st_size for p in paths)),
            "samples": self.views + self.clips,
            "views": self.views,
            "clips": self.clips,
            "tracks": self.tracks,
            "payload_bytes": self.payload_bytes,
            "assets": len(self.per_asset),
            "samples_per_asset": dict(sorted(self.per_asset.items())),
            "samples_per_asset_min_median_max": [counts[0], counts[len(counts) // 2], counts[-1]]
            if counts
            else [],
            "resolution_and_K": dict(self.res_k),
            "pixels": pixels,
            "fraction_at_least_k_layers": {str(k + 1): float(f) for k, f in enumerate(at_least)},
            "depth_range_per_layer": [
                [float(a), float(b)] if a <= b else None for a, b in zip(self.dmin, self.dmax)
            ],
            "truncated_ray_fraction": self.truncated / max(pixels, 1),
            "dynamic_tracks": self.dynamic_tracks,
            "labelled_tracks": self.labelled_tracks,
            "track_coverage": {  # per layer over every clip frame: share of valid pixels within a stride of a track
                str(k): {"min": float(m), "mean": float(t / n), "frames": int(n)}
                for k, (m, t, n) in enumerate(zip(self.cov_min, self.cov_sum, self.cov_frames)) if n
            },
            "track_coverage_worst": self.cov_worst,
            "schema_versions": dict(self.versions),
            "unreadable_views": self.malformed,
            "problems": [str(p) for p in problems],
        }


def scan(
    paths: list[Path], validate: bool = False, keep=None, progress=None
) -> tuple[dict, list[Problem], list[Sample]]:
    """One pass over ``paths``: summary dict, problems (decoding ones always, schema ones if ``validate``)
    and the samples for which ``keep(index, sample)`` is true. Duplicate keys are problems.

    ``progress``: a :class:`wt_datagen.console.Progress` (or anything with ``update(n)``) over
    ``len(paths)`` shards; it is advanced as each shard is finished."""
    stats, problems, kept, seen = _Stats(), [], [], {}
    ledger = ClipLedger() if validate else None
    index = 0
    order = {str(p): i for i, p in enumerate(paths)}
    done = 0  # shards finished: every shard before the one being read

    def advance(to: int) -> None:
        nonlocal done
        if progress is not None and to > done:
            progress.update(to - done)
        done = max(done, to)

    for item in read_samples(paths):
        advance(order.get(item.shard, done))
        if isinstance(item, Problem):
            problems.append(item)
            continue
        if item.key in seen:
            item.problem("-", f"duplicate sample key (first in {seen[item.key]})")
        seen.setdefault(item.key, item.shard)
        try:
            ok = item.is_clip or shape_ok(item)
            if validate:
                check(item, ok)
                if item.is_clip:
                    ledger.check_tracks(item)
                elif ok:
                    ledger.add_frame(item)
            stats.add(item, ok)
        except Exception as e:  # data malformed in a way no rule foresaw: still one line, and go on
            item.problem("-", f"could not be checked ({type(e).__name__}: {e})")
        problems += item.problems
        if keep is not None and keep(index, item):
            kept.append(item)
        index += 1
    advance(len(paths))
    return stats.report(paths, problems), problems, kept


def summarise(paths) -> dict:
    """Summary of the shards in ``paths`` (specs as on the command line); see :func:`format_summary`."""
    return scan(expand_shards(paths))[0]


def validate(paths) -> list[Problem]:
    """Every problem in the shards in ``paths``: unreadable parts and broken schema rules."""
    return scan(expand_shards(paths), validate=True)[1]


def format_summary(d: dict) -> str:
    """The summary dict as a small text table."""
    mb = d["shard_bytes"] / 1e6
    per = d["payload_bytes"] / max(d["samples"], 1) / 1e6
    lines = [
        f"shards            {d['shards']} ({mb:.1f} MB)",
        f"samples           {d['samples']} ({d['views']} views, {d['clips']} clips with "
        f"{d['tracks']} tracks; {per:.2f} MB per sample)",
        f"assets            {d['assets']} (samples per asset min/median/max: "
        f"{'/'.join(map(str, d['samples_per_asset_min_median_max']))})",
    ]
    if d["assets"] <= 10:
        width = max(map(len, d["samples_per_asset"]), default=0) + 2
        lines += [f"  {a:<{width}}{n}" for a, n in d["samples_per_asset"].items()]
    lines += [
        f"resolution, K     {', '.join(f'{k}: {n}' for k, n in d['resolution_and_K'].items()) or '-'}",
        f"schema versions   {', '.join(f'{k}: {n}' for k, n in d['schema_versions'].items()) or '-'}",
        f"truncated rays    {100 * d['truncated_ray_fraction']:.3f}% (num_hits > K)",
        "layer  pixels with >= layer+1 valid layers  depth min   depth max",
    ]
    for i, (k, f) in enumerate(d["fraction_at_least_k_layers"].items()):
        rng = d["depth_range_per_layer"][int(k) - 1]
        lo, hi = (f"{rng[0]:10.4g}", f"{rng[1]:10.4g}") if rng else ("         -", "         -")
        lines.append(f"{i:>5}  {100 * f:34.2f}%  {lo}  {hi}")
    if d["track_coverage"]:
        cov = "; ".join(f"layer {k} min {100 * c['min']:.1f}% mean {100 * c['mean']:.1f}%"
                        for k, c in d["track_coverage"].items())
        lines.append(f"track coverage    {cov} (pixels within a stride of a track; worst layer 0: "
                     f"{d['track_coverage_worst']})")
    if d["labelled_tracks"]:
        lines.append(f"dynamic tracks    {d['dynamic_tracks']} of {d['labelled_tracks']} "
                     f"({100 * d['dynamic_tracks'] / d['labelled_tracks']:.1f}%)")
    lines.append(
        f"problems          {len(d['problems'])}"
        + (f" ({d['unreadable_views']} views unreadable)" if d["unreadable_views"] else "")
    )
    return "\n".join(lines)
