"""WT-DiT pieces in isolation: model shapes and attention structure, normalisation, data stream, flow
objective, sampler, metrics and checkpoints."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import trimesh
import webdataset as wds

from tests.model_shards import write_sphere_shards
from wt_datagen.camera import Camera
from wt_model.checkpoint import CheckpointError, load_model, save_checkpoint
from wt_model.data import (
    DataError,
    LoaderConfig,
    Normalisation,
    asset_of,
    collect_heldout,
    decode_sample,
    denormalise,
    expand_shards,
    fill_missing,
    is_heldout,
    normalise,
    probe_shards,
    read_stats,
    train_loader,
)
from wt_model.flow import FlowConfig, flow_loss, layer_times, noisy_input
from wt_model.metrics import (
    CAP,
    Report,
    chamfer_fscore,
    format_report,
    mean_scores,
    median_scores,
    scale_align,
    score_view,
)
from wt_model.models import PRESETS, WTBlock, WTDiT, WTDiTConfig, apply_rope, build_model, configure, rope_2d
from wt_model.sampler import postprocess, sample, write_ply
from wt_model.stats import compute_stats

MICRO = WTDiTConfig(image_size=16, patch_size=4, num_layers=3, dim=32, depth=3, heads=2, preset="micro")


def randomise(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (leaves adaLN-Zero's identity, the zero head and the zero FiLM)."""
    torch.manual_seed(seed)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=std)
    return module


def raw_samples(paths):
    return [s for s in wds.DataPipeline(wds.SimpleShardList([str(p) for p in paths]), wds.tarfile_to_samples())]


# ----------------------------------------------------------------------------- model


def test_forward_shapes_and_zero_initialised_head_and_film():
    model = build_model(MICRO)
    x, t, rgb = torch.randn(2, 3, 3, 16, 16), torch.rand(2, 3), torch.randn(2, 3, 16, 16)
    points, logits = model(x, t, rgb)
    assert points.shape == (2, 3, 3, 16, 16) and logits.shape == (2, 3, 16, 16)
    assert torch.all(points == 0) and torch.all(logits == 0)  # adaLN-Zero and a zero head
    assert [b.kind for b in model.blocks] == ["frame", "ray", "global"]
    assert model.blocks[0].film.shape == (2, 3, 32) and torch.all(model.blocks[0].film == 0)
    assert model.blocks[1].film is None and model.blocks[2].film is None  # FiLM before frame-wise blocks only
    assert torch.all(model.final.film == 0)


def test_presets_build_and_divide():
    for name, cfg in PRESETS.items():
        assert cfg.preset == name and cfg.image_size % cfg.patch_size == 0 and cfg.dim % cfg.heads == 0
    release = PRESETS["release"]
    assert (release.num_layers, release.image_size, release.patch_size, release.depth % 3) == (6, 504, 14, 0)
    assert sum(p.numel() for p in build_model("tiny").parameters()) < 5e6
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("huge")


def test_an_encoder_snaps_the_preset_to_its_patch():
    cfg, note = configure("tiny", "dinov2_vits14")
    assert (cfg.image_size, cfg.patch_size, cfg.encoder) == (56, 14, "dinov2_vits14")
    assert "runs at 56x56 with patch 14" in note
    assert configure("small", "dinov2_vitb14")[0].image_size == 252
    assert configure("base", "dinov2_vitl14") == (PRESETS["base"].__class__(**{**PRESETS["base"].to_dict(),
                                                                             "encoder": "dinov2_vitl14"}), None)
    with pytest.raises(ValueError, match="needs patch 14"):
        WTDiTConfig(image_size=64, patch_size=8, encoder="dinov2_vits14")


def test_patchify_roundtrip():
    model = build_model(MICRO)
    x = torch.randn(5, 4, 16, 12)
    tokens = model.patchify(x)
    assert tokens.shape == (5, 12, 4 * 16)
    assert torch.equal(tokens[0, 1], x[0, :, 0:4, 4:8].reshape(-1))  # row-major patch order
    assert torch.equal(model.unpatchify(tokens, 4, 16, 12), x)


def test_rope_scores_depend_on_relative_position_only():
    """q.k after 2D RoPE: the same for the same offset anywhere on the grid, different for another offset;
    rotations keep norms."""
    torch.manual_seed(0)
    cos, sin = rope_2d(6, 7, 16, 100.0)  # (42, 16)
    q, k = torch.randn(16), torch.randn(16)

    def score(a, b):  # q at grid cell a, k at grid cell b
        ia, ib = a[0] * 7 + a[1], b[0] * 7 + b[1]
        return (apply_rope(q[None], cos[ia:ia + 1], sin[ia:ia + 1]) @ apply_rope(k[None], cos[ib:ib + 1],
                                                                              sin[ib:ib + 1]).T).item()

    assert score((1, 2), (3, 1)) == pytest.approx(score((3, 4), (5, 3)), abs=1e-5)
    assert score((0, 0), (2, 5)) == pytest.approx(score((3, 1), (5, 6)), abs=1e-5)
    assert abs(score((1, 2), (3, 1)) - score((1, 2), (1, 3))) > 1e-3  # rows and columns are told apart
    rotated = apply_rope(q.expand(42, 16), cos, sin)
    assert torch.allclose(rotated.norm(dim=-1), q.norm().expand(42), atol=1e-5)
    assert torch.allclose(rotated[0], q)  # cell (0, 0) is not rotated


def test_same_weights_run_at_two_resolutions():
    """Nothing is tied to one grid (RoPE angles and pixel-plane coordinates are computed per input): 16x16
    and 24x32 run with the same (random, non-zero) weights."""
    model = randomise(build_model(MICRO), std=0.1)
    for H, W in ((16, 16), (24, 32)):
        x, t, rgb = torch.randn(1, 3, 3, H, W), torch.rand(1, 3), torch.rand(1, 3, H, W) * 2 - 1
        points, logits = model(x, t, rgb)
        assert points.shape == (1, 3, 3, H, W) and logits.shape == (1, 3, H, W)
        assert torch.isfinite(points).all() and points.abs().max() > 0
    with pytest.raises(ValueError, match="not a multiple of the patch"):
        model(torch.randn(1, 3, 3, 18, 16), torch.rand(1, 3), torch.randn(1, 3, 18, 16))


def test_film_acts_on_its_layer_only():
    """Frame-wise blocks and the head apply a per-layer FiLM: changing layer 1's parameters changes layer 1
    only (frame attention, the MLP and the head never mix layers)."""
    blk = randomise(WTBlock(16, 2, 2.0, "frame", num_layers=3))
    x, c = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 16)
    cos, sin = rope_2d(1, 5, 8, 100.0)
    before = blk(x, c, {"frame": (cos, sin)})
    with torch.no_grad():
        blk.film[:, 1] += 0.5
    changed = (blk(x, c, {"frame": (cos, sin)}) - before).abs().amax(dim=(0, 2, 3)) > 1e-6  # (K,)
    assert changed.tolist() == [False, True, False]
    model = randomise(build_model(MICRO), std=0.1)
    x, t, rgb = torch.randn(1, 3, 3, 16, 16), torch.rand(1, 3), torch.randn(1, 3, 16, 16)
    before = model(x, t, rgb)[0]
    with torch.no_grad():
        model.final.film[:, 2] += 0.5
    changed = (model(x, t, rgb)[0] - before).abs().amax(dim=(0, 2, 3, 4)) > 1e-6
    assert changed.tolist() == [False, False, True]


@pytest.mark.parametrize("kind", ["frame", "ray", "global"])
def test_attention_kinds_mix_only_their_tokens(kind):
    """Perturb one token (layer 1, patch 2): frame-wise reaches only layer 1, ray-wise only patch 2,
    global everything (the MLP is per token, so only attention can spread the change)."""
    blk = randomise(WTBlock(16, 2, 2.0, kind, num_layers=3))  # leave adaLN-Zero's identity and zero FiLM
    x, c = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 16)  # (B,K,P,D), (B,K,D)
    cos, sin = rope_2d(1, 5, 8, 100.0)
    rope = {"frame": (cos, sin), "global": (cos.repeat(3, 1), sin.repeat(3, 1))}
    x2 = x.clone()
    x2[:, 1, 2] += torch.randn(16)  # not a constant: LayerNorm would remove it
    changed = (blk(x2, c, rope) - blk(x, c, rope)).abs().amax(dim=(0, 3)) > 1e-7  # (K,P)
    expect = torch.zeros(3, 5, dtype=torch.bool)
    if kind == "frame":
        expect[1] = True
    elif kind == "ray":
        expect[:, 2] = True
    else:
        expect[:] = True
    assert torch.equal(changed, expect)


# ----------------------------------------------------------------------------- normalisation and data


def test_normalise_is_exactly_inverted():
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal(0, 3, (1000, 2)), rng.uniform(0.01, 50, (1000, 1))], axis=1)
    n = normalise(pts, 2.5)
    assert np.allclose(denormalise(n, 2.5), pts, rtol=1e-12, atol=1e-12)
    assert np.allclose(n[:, 2], np.log(pts[:, 2] / 2.5))
    assert np.allclose(np.abs(n[:, 0]), np.log1p(np.abs(pts[:, 0]) / 2.5))


def test_zscore_is_exactly_inverted_and_stats_match_a_plain_reading(tmp_path):
    rng = np.random.default_rng(1)
    pts = rng.normal(0, 3, (500, 3))
    z = Normalisation("zscore", (0.1, -0.2, 1.9), (0.28, 0.32, 0.71))
    assert np.allclose(z.inverse(z.forward(pts, 7.0)), pts, rtol=1e-12, atol=1e-12)
    assert np.allclose(z.forward(pts, 7.0)[:, 2], (pts[:, 2] - 1.9) / 0.71)
    assert Normalisation.from_dict(z.to_dict()) == z
    paths = write_sphere_shards(tmp_path, views=5, shards=2, size=24)
    stats = compute_stats(str(tmp_path / "*.tar"), progress=False)
    everything = []  # the oracle: plain webdataset + np.load, every valid point of every layer at once
    for raw in raw_samples(paths):
        if "layers.npz" in raw:
            with np.load(io.BytesIO(raw["layers.npz"])) as f:
                depth, valid = f["depth"].astype(np.float64), f["valid"]
            K = np.array(json.loads(raw["camera.json"])["K"])
            everything.append((depth[..., None] * Camera(K, np.eye(4), 24, 24).pixel_rays())[valid])
    everything = np.concatenate(everything)
    assert stats["views"] == 5 and stats["points"] == len(everything)
    assert np.allclose(stats["mean"], everything.mean(0), rtol=1e-10)
    assert np.allclose(stats["std"], everything.std(0), rtol=1e-10)
    (tmp_path / "s.json").write_text(json.dumps(stats))
    assert read_stats(tmp_path / "s.json") == Normalisation("zscore", tuple(stats["mean"]), tuple(stats["std"]))
    (tmp_path / "bad.json").write_text('{"mean": [0, 0]}')
    with pytest.raises(DataError, match="not a wt-model stats file"):
        read_stats(tmp_path / "bad.json")


def test_fill_missing_repeats_last_valid_and_puts_background_on_the_ray():
    K = np.array([[10.0, 0, 2], [0, 10, 2], [0, 0, 1]])
    rays = Camera(K, np.eye(4), 3, 1).pixel_rays()  # (1,3,3)
    xyz = np.arange(3 * 3 * 3, dtype=float).reshape(3, 1, 3, 3) + 1
    valid = np.array([[[True, True, False]], [[True, False, False]], [[False, False, False]]])
    out = fill_missing(xyz, valid, rays, scale=4.0)
    assert np.array_equal(out[valid], xyz[valid])
    assert np.array_equal(out[2, 0, 0], xyz[1, 0, 0]) and np.array_equal(out[1, 0, 1], xyz[0, 0, 1])
    assert np.allclose(out[:, 0, 2], rays[0, 2] * 4.0)  # background: every layer at the median depth


def test_decode_recovers_the_analytic_points(tmp_path):
    paths = write_sphere_shards(tmp_path, views=2, shards=1, size=32)
    raw = [s for s in raw_samples(paths) if "layers.npz" in s][0]
    d = decode_sample(raw, 32, 4)
    assert d["rgb"].shape == (3, 32, 32) and d["points"].shape == (4, 3, 32, 32) and d["valid"].shape == (4, 32, 32)
    with np.load(io.BytesIO(raw["layers.npz"])) as z:
        depth, valid = z["depth"], z["valid"]
    K = np.array(json.loads(raw["camera.json"])["K"])
    xyz = depth[..., None] * Camera(K, np.eye(4), 32, 32).pixel_rays()
    back = denormalise(d["points"].transpose(0, 2, 3, 1), d["scale"])
    assert np.array_equal(d["valid"], valid) and valid[1].any()
    assert np.allclose(back[valid], xyz[valid], rtol=1e-5)
    assert np.isclose(d["scale"], np.median(depth[0][valid[0]]))
    assert np.isfinite(d["points"]).all()  # missing layers are filled, not NaN/-inf


def test_decode_resizes_and_truncates(tmp_path):
    paths = write_sphere_shards(tmp_path, views=1, shards=1, size=32, num_layers=5)
    raw = [s for s in raw_samples(paths) if "layers.npz" in s][0]
    d = decode_sample(raw, 16, 2)
    assert d["points"].shape == (2, 3, 16, 16) and d["rgb"].shape == (3, 16, 16)
    full = decode_sample(raw, 32, 2)
    assert np.array_equal(d["valid"], full["valid"][:, 1::2, 1::2])  # nearest: centre-aligned pixels
    assert probe_shards([str(p) for p in paths], 16).resized


def test_bad_shards_give_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        expand_shards(str(tmp_path / "none-*.tar"))
    with pytest.raises(DataError, match="do not exist"):
        expand_shards(str(tmp_path / "shard-{000000..000003}.tar"))
    old = write_sphere_shards(tmp_path / "v2", views=2, shards=1, schema_version=2)
    with pytest.raises(DataError, match="schema_version 2, expected 1") as e:
        probe_shards([str(p) for p in old], 32)
    assert "\n" not in str(e.value)
    raw = [s for s in raw_samples(write_sphere_shards(tmp_path / "ok", views=1, shards=1)) if "layers.npz" in s][0]
    with pytest.raises(DataError, match="spheres0000: unreadable"):
        decode_sample({**raw, "layers.npz": b"truncated"}, 32, 4)
    only_tracks = write_sphere_shards(tmp_path / "tracks", views=0, shards=1)
    with pytest.raises(DataError, match="no sample holds layers.npz"):
        probe_shards([str(p) for p in only_tracks], 32)


def keys_of(loader, n):
    out = []
    for b in loader:
        out += b["__key__"]
        if len(out) >= n:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_is_deterministic_and_resumes_mid_epoch(tmp_path, workers):
    urls = [str(p) for p in write_sphere_shards(tmp_path, views=10, shards=3, size=16)]
    cfg = LoaderConfig(batch_size=2, image_size=16, num_layers=2, num_workers=workers, shuffle_buffer=4,
                       epoch_samples=12, seed=3)
    assert cfg.batches_per_epoch == 6
    full = keys_of(train_loader(urls, cfg, epoch=1), 99)
    assert len(full) == 2 * cfg.batches_per_epoch and all(k.startswith("spheres") for k in full)
    assert full == keys_of(train_loader(urls, cfg, epoch=1), 99)
    assert full != keys_of(train_loader(urls, cfg, epoch=2), 99)
    for skip in (1, 3):  # resume: the rest of the epoch is the same batches in the same order
        rest = keys_of(train_loader(urls, cfg, epoch=1, skip_batches=skip), 99)
        assert rest[: len(full) - 2 * skip] == full[2 * skip:]
    batch = next(iter(train_loader(urls, cfg, epoch=0)))
    assert batch["points"].shape == (2, 2, 3, 16, 16) and batch["scale"].shape == (2,)


def test_heldout_split_is_by_asset(tmp_path):
    """Three views per asset: the training stream and the held-out views never share an asset, and every view
    of a held-out asset is held out."""
    urls = [str(p) for p in write_sphere_shards(tmp_path, views=30, shards=3, size=16, assets=10)]
    fraction = 0.35
    held = {a for a in (f"spheres{i}" for i in range(10)) if is_heldout(a, fraction)}
    assert 0 < len(held) < 10  # this fraction splits these ten assets
    heldout, bad = collect_heldout(urls, fraction, limit=100)
    assert bad == 0
    assert {asset_of(s) for s in heldout} == held and len(heldout) == 3 * len(held)
    cfg = LoaderConfig(batch_size=2, image_size=16, num_layers=2, num_workers=0, shuffle_buffer=4,
                       epoch_samples=40, val_fraction=fraction)
    trained = {int(k[7:]) % 10 for k in keys_of(train_loader(urls, cfg, epoch=0), 99)}
    assert trained and not trained & {int(a[7:]) for a in held}
    assert is_heldout("anything", 1.0) and not is_heldout("anything", 0.0)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_counted_and_resumed_past(tmp_path, workers):
    urls = [str(p) for p in write_sphere_shards(tmp_path, views=12, shards=2, size=16, corrupt=(0, 1, 3, 8))]
    cfg = LoaderConfig(batch_size=2, image_size=16, num_layers=2, num_workers=workers, shuffle_buffer=4,
                       epoch_samples=20, seed=1)
    batches = list(train_loader(urls, cfg, epoch=0))
    keys = [k for b in batches for k in b["__key__"]]
    assert not {"spheres0000", "spheres0001", "spheres0003", "spheres0008"} & set(keys)
    assert sum(int(b["bad"].sum()) for b in batches) >= 4  # each pass over the shards meets all
    for skip in (1, 2, 3, 4):  # resume: the undecodable samples met per worker role are skipped too
        bad = [0] * cfg.workers
        for i, b in enumerate(batches[:skip]):
            bad[i % cfg.workers] += int(b["bad"].sum())
        rest = [k for b in train_loader(urls, cfg, epoch=0, skip_batches=skip, skip_bad=tuple(bad))
                for k in b["__key__"]]
        assert rest[: len(keys) - 2 * skip] == keys[2 * skip:]  # extra batches, if any, come last


# ----------------------------------------------------------------------------- objective and sampler


class Oracle(torch.nn.Module):
    """Predicts the true clean layers (or the exact straight-path velocity towards them)."""

    def __init__(self, x0, velocity=False):
        super().__init__()
        self.x0, self.velocity = x0, velocity
        self.cfg = WTDiTConfig(image_size=x0.shape[-1], patch_size=4, num_layers=x0.shape[1], dim=32, depth=1,
                               heads=2)

    def encode(self, rgb):
        return None

    def forward(self, x_t, t, rgb, image_tokens=None):
        t5 = t[..., None, None, None].double()
        out = ((x_t - self.x0) / t5).float() if self.velocity else self.x0.expand_as(x_t)
        return out, torch.full(x_t.shape[:2] + x_t.shape[3:], 5.0)


def test_layer0_runs_ahead_but_all_layers_start_noisy_and_end_clean():
    cfg = FlowConfig(clock="layered")
    t = layer_times(torch.tensor([1.0, 0.5, 0.0]), 4, cfg)
    assert torch.allclose(t[0], torch.ones(4)) and torch.allclose(t[2], torch.zeros(4))
    assert t[1, 0] < t[1, 1] and torch.allclose(t[1, 1:], torch.full((3,), 0.5))
    shared = layer_times(torch.tensor([0.3]), 4, FlowConfig())  # the default: one t per sample
    assert torch.allclose(shared, torch.full((1, 4), 0.3))


@pytest.mark.parametrize("clock", ["layered", "shared"])
@pytest.mark.parametrize("prediction", ["x0", "velocity"])
@pytest.mark.parametrize("steps", [7, 20])
def test_euler_sampler_lands_on_the_oracle_for_every_layer(prediction, clock, steps):
    """A perfect denoiser's sample is the clean sample, every layer to 1e-6, layer 0 included (its clock runs
    below the loss's t clamp at the end)."""
    x0 = torch.randn(2, 3, 3, 8, 8)
    pts, prob = sample(Oracle(x0, prediction == "velocity"), torch.zeros(2, 3, 8, 8),
                       FlowConfig(prediction=prediction, clock=clock), steps=steps,
                       generator=torch.Generator().manual_seed(0))
    assert (pts - x0).abs().amax(dim=(0, 2, 3, 4)).max() < 1e-6 and torch.all(prob > 0.99)


def test_noise_fill_replaces_missing_entries_only():
    x0, eps = torch.randn(2, 3, 3, 8, 8), torch.randn(2, 3, 3, 8, 8)
    valid, t = torch.rand(2, 3, 8, 8) > 0.4, torch.rand(2, 3)
    t5 = t[..., None, None, None]
    path = (1 - t5) * x0 + t5 * eps
    repeat = noisy_input(x0, valid, t, eps, FlowConfig(), torch.Generator().manual_seed(0))
    assert torch.equal(repeat, path)
    noise = noisy_input(x0, valid, t, eps, FlowConfig(fill="noise"), torch.Generator().manual_seed(0))
    other = noisy_input(x0 + 3, valid, t, eps, FlowConfig(fill="noise"), torch.Generator().manual_seed(0))
    v3 = valid[:, :, None].expand_as(x0)
    assert torch.equal(noise[v3], path[v3])
    assert torch.equal(noise[~v3], other[~v3])  # missing entries know nothing of x0
    assert 0.8 < noise[~v3].std() < 1.2


def test_flow_loss_ignores_missing_layers_and_vanishes_for_the_oracle():
    x0 = torch.randn(2, 3, 3, 8, 8)
    valid = torch.rand(2, 3, 8, 8) > 0.3
    batch = {"points": x0, "valid": valid, "rgb": torch.zeros(2, 3, 8, 8)}
    cfg = FlowConfig(valid_weight=0.0)
    loss, _ = flow_loss(Oracle(x0), batch, cfg, torch.Generator().manual_seed(1))
    assert loss.item() < 1e-10
    wrong = x0 + 5 * (~valid[:, :, None]).float()  # the oracle is wrong only where layers are missing
    loss, _ = flow_loss(Oracle(wrong), batch, cfg, torch.Generator().manual_seed(1))
    assert loss.item() < 1e-10
    loss, _ = flow_loss(Oracle(x0 + 0.1), batch, cfg, torch.Generator().manual_seed(1))
    assert loss.item() > 1e-3


def test_postprocess_masks_are_monotone_and_ply_has_the_valid_points(tmp_path):
    prob = np.array([0.9, 0.2, 0.8])[:, None, None] * np.ones((3, 4, 4))
    pts, valid = postprocess(np.zeros((3, 3, 4, 4), np.float32), prob)
    assert valid[0].all() and not valid[1:].any()  # layer 2 cannot exist behind a missing layer 1
    assert np.allclose(pts[..., 2], 1.0)  # normalised 0 is the median depth
    nan = np.zeros((3, 3, 4, 4), np.float32)
    nan[0, :, 1, 1] = np.nan
    assert not postprocess(nan, np.ones((3, 4, 4)))[1][:, 1, 1].any()  # a non-finite point is never valid
    write_ply(tmp_path / "p.ply", pts, valid, np.zeros((4, 4, 3), np.uint8))
    assert len(trimesh.load(tmp_path / "p.ply").vertices) == 16


# ----------------------------------------------------------------------------- metrics


def test_chamfer_and_fscore_by_hand():
    ch, f = chamfer_fscore(np.zeros((1, 3)), np.array([[0, 0, 1.0], [0, 0, 3.0]]), tau=1.5)
    assert np.isclose(ch, 0.5 * (1 + 2))  # not squared, the two directions averaged
    assert np.isclose(f, 2 * 1 * 0.5 / 1.5)
    assert chamfer_fscore(np.zeros((0, 3)), np.ones((2, 3)), 1.0) == (float("inf"), 0.0)


def test_scores_are_scale_invariant_and_perfect_for_the_truth():
    rng = np.random.default_rng(0)
    gt = np.concatenate([rng.normal(0, 1, (3, 8, 8, 2)), rng.uniform(2, 4, (3, 8, 8, 1))], axis=-1)
    valid = np.logical_and.accumulate(rng.random((3, 8, 8)) > 0.2, axis=0)
    assert np.isclose(scale_align(0.5 * gt[0], gt[0], valid[0]), 2.0)
    s = score_view(0.5 * gt, valid, gt, valid)
    assert s.abs_rel < 1e-9 and s.delta1 == 1 and s.chamfer_all < 1e-9 and s.fscore_all == 1 and s.iou == 1
    bad = score_view(0.5 * gt * np.array([1, 1, 1.5]), valid & (rng.random((3, 8, 8)) > 0.5), gt, valid)
    assert bad.abs_rel > 0.02 and bad.chamfer_all > 0.01 and bad.iou < 0.8


def layered_truth(seed=0):
    rng = np.random.default_rng(seed)
    gt = np.concatenate([rng.normal(0, 1, (3, 8, 8, 2)), rng.uniform(2, 4, (3, 8, 8, 1))], axis=-1)
    gt[1:, ..., 2] += gt[:1, ..., 2]  # hidden layers behind
    valid = np.ones((3, 8, 8), bool)
    valid[2, :4] = False
    return gt, valid


def test_per_layer_figures_by_hand():
    gt, valid = layered_truth()
    scene = np.median(gt[0, ..., 2])
    pred = gt.copy()
    pred[1, ..., 0] += 0.01 * scene  # layer 1 moved sideways by 1 % of the scene depth; far below neighbours
    s = score_view(pred, valid, gt, valid)
    assert s.layer_chamfer[0] == pytest.approx(0) and s.layer_chamfer[2] == pytest.approx(0)
    assert s.layer_chamfer[1] == pytest.approx(0.01, rel=0.05) and s.layer_iou == (1.0, 1.0, 1.0)
    missing = valid.copy()
    missing[2] = False  # the prediction has no layer 2
    s = score_view(gt, missing, gt, valid)
    assert s.layer_chamfer[2] == CAP and s.layer_fscore[2] == 0 and s.layer_iou[2] == 0
    none = np.zeros_like(valid)
    none[0] = True
    s = score_view(gt, none, gt, none)  # no hidden layers anywhere: they are not scored
    assert np.isnan(s.layer_chamfer[1]) and s.layer_chamfer[0] == pytest.approx(0)


def test_scale_and_zshift_alignment_recovers_a_shifted_prediction():
    gt, valid = layered_truth(1)
    pred = (gt - np.array([0, 0, 0.7])) / 1.6
    assert score_view(pred, valid, gt, valid, align="scale-zshift").chamfer_all < 1e-9
    assert score_view(pred, valid, gt, valid, align="scale").chamfer_all > 1e-3
    with pytest.raises(ValueError, match="alignment"):
        score_view(pred, valid, gt, valid, align="icp")


def test_empty_predictions_are_capped_counted_and_never_nan():
    gt, valid = layered_truth(2)
    empty = score_view(gt, np.zeros_like(valid), gt, valid)
    assert (empty.chamfer_all, empty.fscore_all, empty.abs_rel, empty.delta1) == (CAP, 0.0, CAP, 0.0)
    assert (empty.empty_visible, empty.empty_all, empty.no_overlap) == (1, 1, 1)
    nan_pred = gt.copy()
    nan_pred[:, :2] = np.nan  # a diverged sample: non-finite points are dropped, the rest scored
    partial = score_view(nan_pred, valid, gt, valid)
    good = score_view(gt, valid, gt, valid)
    views = [empty, partial, good]
    mean, median = mean_scores(views), median_scores(views)
    assert mean.views == 3 and mean.empty_all == 1 and median.chamfer_all == partial.chamfer_all
    assert mean.chamfer_all == pytest.approx((CAP + partial.chamfer_all + 0) / 3)
    text = "\n".join(format_report(Report(mean, median, 3)))
    assert "nan" not in text.lower() and "inf" not in text.lower() and "empty predictions: visible 1" in text
    lonely = mean_scores([score_view(gt, valid & False, gt, valid & False)])  # nothing anywhere
    text = "\n".join(format_report(Report(lonely, lonely, 1)))
    assert "nan" not in text.lower() and "inf" not in text.lower()


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_loads_safely(tmp_path):
    model = WTDiT(MICRO)
    state = {"model": model.denoiser_state_dict(), "ema": model.denoiser_state_dict(), "step": 3,
             "config": MICRO.to_dict(), "flow": FlowConfig().to_dict()}
    save_checkpoint(tmp_path / "c.pt", state)
    assert torch.load(tmp_path / "c.pt", weights_only=True)["step"] == 3
    loaded, flow, ckpt = load_model(tmp_path / "c.pt")
    assert loaded.cfg == MICRO and flow == FlowConfig()
    with pytest.raises(CheckpointError, match="trained without an image encoder"):
        load_model(tmp_path / "c.pt", encoder_weights=tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model(tmp_path / "junk.pt")
