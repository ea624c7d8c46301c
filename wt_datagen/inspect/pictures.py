"""Contact sheets: one labelled PNG per sample (a view's layers, a clip's tracks over its first frame)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..reader import Sample, decode, iter_raw
from .rules import clip_cameras

MAX_DRAWN_TRACKS = 2000


def _panel_grid(n: int, ncols: int = 4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows = -(-n // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.2 * ncols, 3.0 * nrows), squeeze=False, layout="constrained"
    )
    for ax in axes.ravel():
        ax.set_axis_off()
    return plt, fig, list(axes.ravel())


def _show(ax, img, title: str, **kw):
    im = ax.imshow(img, interpolation="nearest", **kw)
    ax.set_title(title, fontsize=9)
    return im


def drawn_tracks(n: int, limit: int = MAX_DRAWN_TRACKS) -> np.ndarray:
    """(m,) int64 indices of at most ``limit`` of ``n`` tracks, spread evenly (all of them if ``n <= limit``)."""
    return np.linspace(0, n - 1, min(n, limit)).astype(np.int64) if n else np.zeros(0, np.int64)


def layer_colours(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, one per layer index (tab10 cycled)."""
    import matplotlib

    return (np.asarray(matplotlib.colormaps["tab10"](np.arange(n) % 10))[:, :3] * 255).astype(np.uint8)


def contact_sheet(sample: Sample, out_png, background: np.ndarray | None = None) -> Path:
    """Write one labelled contact sheet PNG for a decoded sample and return its path.

    A view shows the RGB image, each layer's depth in one shared colour scale, layer-0 normals, the entering
    and exiting crossings per pixel and the per-pixel layer count (and, for a clip's frame, its dynamic
    crossings). A clip track sample shows its 2D tracks over ``background`` (the clip's first frame,
    (H, W, 3) uint8, if known) coloured by layer index; the share of tracks on each layer over time; the
    tracks coloured static or dynamic, with the tracks seeded after the reference frame marked where they
    were seeded; and the coverage of each layer per frame.
    """
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    title = f"{sample.key}  ({Path(sample.shard).name})"
    if sample.is_clip:
        _clip_sheet(sample, out_png, background, title)
        return out_png
    L = sample.layers
    have = {"depth", "valid"} <= L.keys() and L["depth"].ndim == 3 and L["valid"].shape == L["depth"].shape
    K = L["depth"].shape[0] if have else 0
    dyn = L.get("dynamic") if have else None
    dyn = dyn if dyn is not None and dyn.shape == L["depth"].shape else None
    albedo = L.get("albedo") if have and "albedo" in L and L["albedo"].shape == L["depth"].shape + (3,) else None
    lighting = _lighting(sample.meta)
    extra = (lighting is not None) + (0 if albedo is None else min(K, 2))
    plt, fig, axes = _panel_grid(1 + K + 4 + (dyn is not None) + extra)
    if sample.rgb is not None:
        rgb = sample.rgb
        if rgb.ndim == 3 and rgb.shape[-1] == 4:  # transparent background: over a checkerboard
            yy, xx = np.indices(rgb.shape[:2]) // 8
            board = np.where(((yy + xx) % 2 == 0)[..., None], 200, 150).astype(np.float32)
            a = rgb[..., 3:] / 255.0
            rgb = (rgb[..., :3] * a + board * (1 - a)).astype(np.uint8)
        _show(axes[0], rgb, "rgb.png" + (" (alpha over a checkerboard)" if sample.rgb.shape[-1] == 4 else ""))
    else:
        axes[0].set_title("rgb.png: unreadable", fontsize=9)
    n = 1 + K + 4 + (dyn is not None)  # after the layer panels (and the dynamic one)
    if albedo is not None:
        for k in range(min(K, 2)):
            _show(axes[n + k], np.where(L["valid"][k][..., None], albedo[k], 255), f"albedo layer {k}")
        n += min(K, 2)
    if lighting is not None:
        _lighting_panel(axes[n], lighting)
    if not have:
        axes[1].set_title("layers.npz: unreadable", fontsize=9)
    else:
        depth, valid = L["depth"], L["valid"]
        vals = depth[valid & np.isfinite(depth)]
        lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
        for k in range(K):
            im = _show(
                axes[1 + k],
                np.where(valid[k], depth[k], np.nan),
                f"depth layer {k} (camera z)",
                cmap="turbo",
                vmin=lo,
                vmax=hi,
            )
        fig.colorbar(im, ax=axes[K], shrink=0.8, label="depth, all layers")  # one shared scale
        i = 1 + K
        if "normal" in L and L["normal"].shape == depth.shape + (3,):
            n0 = L["normal"][0].astype(np.float32)
            _show(
                axes[i],
                np.where(valid[0][..., None], (n0 + 1) / 2, 1).clip(0, 1),
                "normal layer 0 (xyz->rgb)",
            )
        if "front_facing" in L and L["front_facing"].shape == depth.shape:
            ff = L["front_facing"]
            cmax = max(int(valid.sum(0).max()), 1)
            im = _show(
                axes[i + 1],
                (valid & ff).sum(0),
                "entering crossings per pixel",
                cmap="viridis",
                vmin=0,
                vmax=cmax,
            )
            _show(
                axes[i + 2],
                (valid & ~ff).sum(0),
                "exiting crossings per pixel",
                cmap="viridis",
                vmin=0,
                vmax=cmax,
            )
            fig.colorbar(im, ax=axes[i + 2], shrink=0.8, label="crossings")  # shared by both panels
        im = _show(axes[i + 3], valid.sum(0), f"valid layers per pixel (K={K})", cmap="magma", vmin=0, vmax=K)
        fig.colorbar(im, ax=axes[i + 3], shrink=0.6)
        if dyn is not None:
            im = _show(axes[i + 4], dyn.sum(0), "dynamic crossings per pixel", cmap="viridis", vmin=0, vmax=cmax)
    fig.suptitle(title)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png


def _lighting(meta) -> dict | None:
    """The ``image`` record of ``meta.json`` if it holds a lighting (views rendered since issue 14)."""
    rec = meta.get("image") if isinstance(meta, dict) else None
    return rec if isinstance(rec, dict) and isinstance(rec.get("lighting"), dict) else None


def _lighting_panel(ax, record: dict) -> None:
    """The drawn lighting: the environment's latitude-longitude thumbnail stored in ``meta.json`` (azimuth
    across, zenith at the top), every light and the sun as a dot of its colour, the background named."""
    lighting = record["lighting"]
    env = lighting.get("environment", {})
    thumb = record.get("environment_thumbnail")
    try:
        h, w = int(thumb["height"]), int(thumb["width"])
        img = np.frombuffer(bytes.fromhex(thumb["rgb"]), np.uint8).reshape(h, w, 3)
    except (TypeError, KeyError, ValueError):
        h, w, img = 16, 32, np.full((16, 32, 3), 128, np.uint8)
    ax.set_axis_on()
    ax.imshow(img, extent=(0, w, h, 0), interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    lights = [(x.get("kind", "?"), x.get("direction"), x.get("colour")) for x in lighting.get("lights", [])]
    if env.get("kind") == "sunsky":
        lights.append(("sun", env.get("sun_direction"), (1.0, 0.9, 0.5)))
    for kind, d, colour in lights:
        try:
            d, colour = np.asarray(d, dtype=np.float64), np.asarray(colour, dtype=np.float64)
            u = (np.arctan2(d[0], -d[2]) / (2 * np.pi)) % 1.0  # the thumbnail's (Mitsuba's) convention
            v = np.arccos(np.clip(d[1], -1, 1)) / np.pi
        except (TypeError, ValueError, IndexError):
            continue
        ax.scatter([u * w], [v * h], s=40, color=np.clip(colour / max(colour.max(), 1e-9), 0, 1),
                   edgecolors="black", linewidths=0.8)
        ax.annotate(str(kind)[:3], (u * w, v * h), fontsize=6, xytext=(3, 3), textcoords="offset points")
    what = env.get("kind", "?") + (f" {env.get('file')}" if env.get("kind") == "image" else "")
    bg = lighting.get("background", {}).get("mode", "?")
    ax.set_title(f"lighting: {what}, {len(lighting.get('lights', []))} lights; background {bg}", fontsize=8)


def _clip_sheet(sample: Sample, out_png: Path, background, title: str) -> None:
    from matplotlib.collections import LineCollection

    t = sample.tracks
    plt, fig, axes = _panel_grid(4, ncols=4)
    uv, li = t.get("uv"), t.get("layer_index")
    cams = clip_cameras(sample)
    cams = cams if isinstance(cams, list) and cams and isinstance(cams[0], dict) else [{}]
    W, H = int(cams[0].get("width", 1)), int(cams[0].get("height", 1))
    ax = axes[0]
    if background is not None:
        ax.imshow(background, alpha=0.5)  # dimmed so the tracks stand out
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_axis_on()
    ax.set_title("2D tracks on frame 0 (colour: layer index)", fontsize=9)
    if uv is None or li is None or uv.ndim != 3 or li.shape != uv.shape[:2]:
        ax.set_title("tracks.npz: unreadable", fontsize=9)
    else:
        T, N = li.shape
        pick = drawn_tracks(N)
        seg = np.stack([uv[:-1, pick], uv[1:, pick]], axis=2).reshape(-1, 2, 2)  # (T-1)*n segments
        lay = li[:-1, pick].ravel()
        shown = (lay >= 0) & np.isfinite(seg).all(axis=(1, 2))
        nl = int(li.max()) + 1 if li.size else 1
        colours = layer_colours(max(nl, 1)) / 255.0
        ax.add_collection(LineCollection(seg[shown], colors=colours[lay[shown]], linewidths=0.6))
        for k in range(nl):
            ax.plot([], [], color=colours[k], label=f"layer {k}")
        if nl:
            ax.legend(fontsize=7, loc="upper right")
        share = np.stack([(li == k).mean(1) for k in range(-1, nl)], 1) if N else np.zeros((T, nl + 1))
        ax2 = axes[1]
        ax2.set_axis_on()
        ax2.stackplot(
            np.arange(T),
            share.T,
            labels=["outside"] + [f"layer {k}" for k in range(nl)],
            colors=[(0.7, 0.7, 0.7)] + list(colours[:nl]),
        )
        ax2.set_xlabel("frame")
        ax2.set_ylabel("share of tracks")
        ax2.set_title("layer index over time", fontsize=9)
        ax2.legend(fontsize=7, loc="lower right")
        ref = sample.meta.get("query_frame") if isinstance(sample.meta, dict) else None
        _motion_panel(axes[2], t, pick, seg, lay, background, W, H, ref)
        _coverage_panel(axes[3], t.get("coverage"))
    fig.suptitle(title)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)


STATIC_COLOUR, DYNAMIC_COLOUR, SEED_COLOUR = (0.2, 0.45, 0.9), (0.95, 0.45, 0.05), (0.85, 0.0, 0.6)


def _motion_panel(ax, t: dict, pick: np.ndarray, seg: np.ndarray, lay: np.ndarray, background, W: int,
                  H: int, ref: int | None = None) -> None:
    """Tracks in two colours, static and dynamic; those seeded on another frame than the reference frame
    (``ref``, meta.json ``query_frame``; else the earliest query frame) marked (x) at their query pixel."""
    from matplotlib.collections import LineCollection

    if background is not None:
        ax.imshow(background, alpha=0.5)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_axis_on()
    dyn, qf = t.get("dynamic"), t.get("query_frame")
    N = len(t["layer_index"][0]) if t["layer_index"].ndim == 2 else 0
    if dyn is None or dyn.shape != (N,):
        ax.set_title("dynamic: not stored", fontsize=9)
        return
    moving = np.tile(dyn[pick], len(t["layer_index"]) - 1)  # segments are frame-major, like seg
    shown = (lay >= 0) & np.isfinite(seg).all(axis=(1, 2))
    colours = np.where(moving[shown, None], DYNAMIC_COLOUR, STATIC_COLOUR)
    ax.add_collection(LineCollection(seg[shown], colors=colours, linewidths=0.6))
    ax.plot([], [], color=STATIC_COLOUR, label=f"static ({int((~dyn).sum())})")
    ax.plot([], [], color=DYNAMIC_COLOUR, label=f"dynamic ({int(dyn.sum())})")
    if qf is not None and "query_pixel" in t and np.ndim(qf) == 1 and len(qf) == N:
        ref = ref if isinstance(ref, int) else int(qf.min(initial=0))
        late = np.flatnonzero(qf != ref)
        p = t["query_pixel"][late[np.isin(late, pick)]] + 0.5
        ax.scatter(p[:, 0], p[:, 1], marker="x", s=10, linewidths=0.7, color=SEED_COLOUR,
                   label=f"seeded later ({len(late)})")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("static / dynamic; x: seeded later", fontsize=9)


def _coverage_panel(ax, coverage) -> None:
    """Per frame and layer, the share of valid pixels within a stride of a track."""
    ax.set_axis_on()
    if coverage is None or coverage.ndim != 2:
        ax.set_title("coverage: not stored", fontsize=9)
        return
    colours = layer_colours(coverage.shape[1]) / 255.0
    for k in range(coverage.shape[1]):
        if not np.isnan(coverage[:, k]).all():
            ax.plot(100 * coverage[:, k], color=colours[k], label=f"layer {k}")
    ax.axhline(95, color="0.5", linewidth=0.6, linestyle="--")
    ax.set_ylim(0, 101)
    ax.set_xlabel("frame")
    ax.set_ylabel("% valid pixels near a track")
    ax.set_title("coverage (a track within a stride)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")


def first_frame_rgb(paths: list[Path], clip: Sample) -> np.ndarray | None:
    """The RGB image of the first frame of ``clip`` (its sequence and clip index; ``view_index`` 0 is the clip's
    first frame, which need not be the sequence's frame 0), if a shard holds it."""
    m = clip.meta if isinstance(clip.meta, dict) else {}
    want = (m.get("sequence_id"), m.get("clip_index"))
    if want[0] is None:
        return None
    for item in iter_raw(paths):
        if not isinstance(item, Sample) or "meta.json" not in item.files or item.is_clip:
            continue
        try:
            fm = json.loads(item.files["meta.json"])
        except ValueError:
            continue
        if (
            isinstance(fm, dict)
            and (fm.get("sequence_id"), fm.get("clip_index")) == want
            and fm.get("view_index") == 0
        ):
            return decode(item).rgb
    return None
