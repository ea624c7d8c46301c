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
from wt_model.checkpoint import CheckpointError, check_preset, load_model, save_checkpoint
from wt_model.data import (
    DataError,
    LoaderConfig,
    decode_sample,
    denormalise,
    expand_shards,
    fill_missing,
    normalise,
    probe_shards,
    train_loader,
)
from wt_model.flow import FlowConfig, flow_loss, layer_times
from wt_model.metrics import chamfer_fscore, scale_align, score_view
from wt_model.models import PRESETS, WTBlock, WTDiT, WTDiTConfig, build_model
from wt_model.sampler import postprocess, sample, write_ply

MICRO = WTDiTConfig(image_size=16, patch_size=4, num_layers=3, dim=32, depth=3, heads=2, preset="micro")


def raw_samples(paths):
    return [s for s in wds.DataPipeline(wds.SimpleShardList([str(p) for p in paths]), wds.tarfile_to_samples())]


# ----------------------------------------------------------------------------- model


def test_forward_shapes_and_zero_initialised_head():
    model = build_model(MICRO)
    x, t, rgb = torch.randn(2, 3, 3, 16, 16), torch.rand(2, 3), torch.randn(2, 3, 16, 16)
    points, logits = model(x, t, rgb)
    assert points.shape == (2, 3, 3, 16, 16) and logits.shape == (2, 3, 16, 16)
    assert torch.all(points == 0) and torch.all(logits == 0)  # adaLN-Zero and a zero head
    assert [b.kind for b in model.blocks] == ["frame", "ray", "global"]


def test_presets_build_and_divide():
    for name, cfg in PRESETS.items():
        assert cfg.preset == name and cfg.image_size % cfg.patch_size == 0 and cfg.dim % cfg.heads == 0
    assert sum(p.numel() for p in build_model("tiny").parameters()) < 5e6
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("huge")


def test_patchify_roundtrip():
    model = build_model(MICRO)
    x = torch.randn(5, 4, 16, 16)
    tokens = model.patchify(x)
    assert tokens.shape == (5, 16, 4 * 16)
    assert torch.equal(tokens[0, 1], x[0, :, 0:4, 4:8].reshape(-1))  # row-major patch order
    assert torch.equal(model.unpatchify(tokens, 4), x)


@pytest.mark.parametrize("kind", ["frame", "ray", "global"])
def test_attention_kinds_mix_only_their_tokens(kind):
    """Perturb one token (layer 1, patch 2): frame-wise reaches only layer 1, ray-wise only patch 2,
    global everything (the MLP is per token, so only attention can spread the change)."""
    torch.manual_seed(0)
    blk = WTBlock(16, 2, 2.0, kind)
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.3)  # leave adaLN-Zero's identity
    x, c = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 16)  # (B,K,P,D), (B,K,D)
    x2 = x.clone()
    x2[:, 1, 2] += torch.randn(16)  # not a constant: LayerNorm would remove it
    changed = (blk(x2, c) - blk(x, c)).abs().amax(dim=(0, 3)) > 1e-7  # (K,P)
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


# ----------------------------------------------------------------------------- objective and sampler


class Oracle(torch.nn.Module):
    """Predicts the true clean layers (or the exact straight-path velocity towards them)."""

    def __init__(self, x0, velocity=False):
        super().__init__()
        self.x0, self.velocity = x0, velocity
        self.cfg = WTDiTConfig(image_size=x0.shape[-1], patch_size=4, num_layers=x0.shape[1], dim=32, depth=1,
                               heads=2)

    def forward(self, x_t, t, rgb):
        t5 = t[..., None, None, None]
        out = (x_t - self.x0) / t5 if self.velocity else self.x0.expand_as(x_t)
        return out, torch.full(x_t.shape[:2] + x_t.shape[3:], 5.0)


def test_layer0_runs_ahead_but_all_layers_start_noisy_and_end_clean():
    cfg = FlowConfig()
    t = layer_times(torch.tensor([1.0, 0.5, 0.0]), 4, cfg)
    assert torch.allclose(t[0], torch.ones(4)) and torch.allclose(t[2], torch.zeros(4))
    assert t[1, 0] < t[1, 1] and torch.allclose(t[1, 1:], torch.full((3,), 0.5))


@pytest.mark.parametrize("prediction", ["x0", "velocity"])
def test_euler_sampler_lands_on_the_oracle(prediction):
    x0 = torch.randn(2, 3, 3, 8, 8)
    pts, prob = sample(Oracle(x0, prediction == "velocity"), torch.zeros(2, 3, 8, 8),
                       FlowConfig(prediction=prediction), steps=7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(pts, x0, atol=1e-5) and torch.all(prob > 0.99)


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


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_loads_safely_and_refuses_other_presets(tmp_path):
    model = WTDiT(MICRO)
    state = {"model": model.state_dict(), "ema": model.state_dict(), "step": 3, "config": MICRO.to_dict(),
             "flow": FlowConfig().to_dict()}
    save_checkpoint(tmp_path / "c.pt", state)
    assert torch.load(tmp_path / "c.pt", weights_only=True)["step"] == 3
    loaded, flow, ckpt = load_model(tmp_path / "c.pt")
    assert loaded.cfg == MICRO and flow == FlowConfig()
    with pytest.raises(CheckpointError, match="preset 'micro', but this run uses preset 'tiny'"):
        check_preset(ckpt, tmp_path / "c.pt", "tiny")
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model(tmp_path / "junk.pt")
