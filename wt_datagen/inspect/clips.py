"""Checks across a clip's samples: what its frames hold against what its tracks sample claims.

A clip is written as its frame samples, then its tracks sample. While scanning, each frame leaves a small
digest here (its packed ``valid`` mask, and its motion fields on the query grid); when the tracks sample
arrives they are checked together and the digests dropped:

- ``coverage`` (T, K) is recomputed from each frame's ``valid`` and the tracks (``track_coverage``);
- on its query frame q, a track *is* the crossing (query layer, query pixel), so that crossing's
  ``next_world_xyz`` must be the track's ``world_xyz`` at q + 1, and its ``dynamic`` flag the track's step
  from q to q + 1 against ``dynamic_tolerance``.

Frames that come after their tracks sample are not cross-checked (the writer never does that).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..reader import Sample
from ..schema import track_coverage

FLOW_RTOL = 1e-6  # both sides are float32 roundings of the same float64 evaluation


@dataclass
class _FrameDigest:
    valid_bits: np.ndarray  # np.packbits of the (K, H, W) valid mask
    shape: tuple[int, int, int]
    stride: int | None
    grid: tuple[int, int]  # rows and columns of the query grid
    dynamic: np.ndarray | None  # (K, rows, cols) on the query grid
    next_world: np.ndarray | None  # (K, rows, cols, 3) on the query grid


def _clip_id(meta) -> tuple | None:
    if not isinstance(meta, dict) or meta.get("sequence_id") is None or meta.get("clip_index") is None:
        return None
    return meta["sequence_id"], meta["clip_index"]


class ClipLedger:
    """Digests of frames seen, by clip; :meth:`check_tracks` compares a tracks sample with them."""

    def __init__(self) -> None:
        self._frames: dict[tuple, dict[int, _FrameDigest]] = {}

    def add_frame(self, s: Sample) -> None:
        """Remember what a clip frame's tracks sample will be checked against (a well-formed view)."""
        cid, L = _clip_id(s.meta), s.layers
        view = s.meta.get("view_index") if cid else None
        if cid is None or not isinstance(view, int) or "valid" not in L:
            return
        stride = s.meta.get("query_stride")
        stride = stride if isinstance(stride, int) and stride >= 1 else None
        K, H, W = L["valid"].shape
        rows, cols = np.arange((stride or 1) // 2, H, stride or 1), np.arange((stride or 1) // 2, W, stride or 1)
        grid = np.ix_(np.arange(K), rows, cols)
        dyn = L["dynamic"][grid] if stride and "dynamic" in L else None
        nxt = L["next_world_xyz"][grid] if stride and "next_world_xyz" in L else None
        self._frames.setdefault(cid, {})[view] = _FrameDigest(np.packbits(L["valid"]), L["valid"].shape, stride,
                                                              (len(rows), len(cols)), dyn, nxt)

    def check_tracks(self, s: Sample) -> None:
        """Cross-check a tracks sample with its clip's frames seen so far (problems go to ``s``)."""
        frames = self._frames.pop(_clip_id(s.meta), None)
        t = s.tracks
        need = ("uv", "layer_index", "world_xyz", "query_frame", "query_layer", "query_pixel")
        if not frames or any(k not in t for k in need) or t["uv"].ndim != 3:
            return
        T, N = t["layer_index"].shape
        stride = s.meta.get("query_stride")
        if "coverage" in t and isinstance(stride, int) and t["coverage"].shape[0] == T:
            self._coverage(s, frames, stride)
        tol = s.meta.get("dynamic_tolerance")
        qf = np.broadcast_to(t["query_frame"], (N,)).astype(np.int64)
        scale = max(float(np.abs(t["world_xyz"]).max(initial=0)), 1e-6)
        flow_bad, dyn_bad = np.zeros(N, bool), np.zeros(N, bool)
        for q, d in frames.items():
            if not 0 <= q < T - 1 or d.stride != stride or d.stride is None:
                continue
            n = np.flatnonzero(qf == q)
            (u, v), k = t["query_pixel"][n].T, t["query_layer"][n]
            (i, di), (j, dj) = np.divmod(v - d.stride // 2, d.stride), np.divmod(u - d.stride // 2, d.stride)
            ok = ((k >= 0) & (k < d.shape[0]) & (di == 0) & (dj == 0) & (i >= 0) & (j >= 0) & (i < d.grid[0])
                  & (j < d.grid[1]))
            n, k, i, j = n[ok], k[ok], i[ok], j[ok]
            after = t["world_xyz"][q + 1, n].astype(np.float64)
            if d.next_world is not None:
                flow_bad[n] = ~(np.abs(d.next_world[k, i, j] - after).max(-1) <= FLOW_RTOL * scale)
            if d.dynamic is not None and isinstance(tol, (int, float)):
                step = np.sqrt(((after - t["world_xyz"][q, n]) ** 2).sum(-1))
                dyn_bad[n] = (d.dynamic[k, i, j] != (step > tol)) & (np.abs(step - tol) > 1e-5 * scale)
        if flow_bad.any():
            s.problem("tracks.npz:world_xyz", f"at the next frame != the query crossing's next_world_xyz at "
                      f"{int(flow_bad.sum())} entries (first: track {int(np.argmax(flow_bad))})")
        if dyn_bad.any():
            s.problem("tracks.npz:world_xyz", f"step to the next frame disagrees with the query crossing's "
                      f"dynamic flag at {int(dyn_bad.sum())} entries (first: track {int(np.argmax(dyn_bad))})")

    def _coverage(self, s: Sample, frames: dict[int, _FrameDigest], stride: int) -> None:
        t = s.tracks
        claim = t["coverage"]
        wrong = []
        for f, d in sorted(frames.items()):
            if not 0 <= f < claim.shape[0] or d.shape[0] != claim.shape[1]:
                continue
            valid = np.unpackbits(d.valid_bits, count=int(np.prod(d.shape))).reshape(d.shape).view(bool)
            got = track_coverage(valid, t["uv"][f], t["layer_index"][f], stride)
            same = (np.abs(got - claim[f]) <= 1e-6) | (np.isnan(got) & np.isnan(claim[f]))
            wrong += [(f, k) for k in np.flatnonzero(~same)]
        if wrong:
            f, k = wrong[0]
            s.problem("tracks.npz:coverage", f"disagrees with the frames' valid masks and the tracks at "
                      f"{len(wrong)} entries (first: frame {f} layer {k})")

    def clear(self) -> None:
        self._frames.clear()
