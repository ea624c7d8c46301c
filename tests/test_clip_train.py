"""The clip model: temporal blocks (T = 1 is the image model; they mix only across frames), the clip objective,
`wt-model train --clips`, `sample --video`, `eval --clips` end to end, exact resumption, bad input, and the
proof that the 4D tiny model learns on the built-in sequences."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.clip_shards import clip_files, write_clip_shards
from tests.learning import mean_pointmap_view_scores
from tests.model_shards import write_sphere_shards
from wt_model.cli import main
from wt_model.clip_metrics import evaluate_clips, format_clip_report
from wt_model.clips import ClipConfig, clip_eval_loader, heldout_windows
from wt_model.data import asset_of, expand_shards, is_heldout
from wt_model.flow import FlowConfig, flow_loss
from wt_model.metrics import mean_scores, median_scores
from wt_model.models import WTBlock, WTDiT, WTDiTConfig, rope_2d
from wt_model.sampler import scale_between

MICRO = WTDiTConfig(image_size=16, patch_size=4, num_layers=3, dim=32, depth=6, heads=2, preset="micro")
FAST = ["--preset", "tiny", "--batch", "1", "--workers", "1", "--log-every", "1", "--no-progress", "--clips",
        "--clip-length", "2"]


def randomise(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=std)
    return module


# ----------------------------------------------------------------------------- the model


def test_temporal_blocks_follow_every_global_block_and_t1_is_the_image_model():
    clip_model = randomise(WTDiT(replace(MICRO, temporal=True)), std=0.1)
    assert sorted(clip_model.temporal) == ["2", "5"]  # after blocks 2 and 5, the global ones
    assert [clip_model.blocks[int(i)].kind for i in clip_model.temporal] == ["global", "global"]
    image_model = WTDiT(MICRO)
    image_model.load_denoiser_state_dict({k: v for k, v in clip_model.denoiser_state_dict().items()
                                          if not k.startswith("temporal.")})
    x, t, rgb = torch.randn(8, 3, 3, 16, 16), torch.rand(8, 3), torch.randn(8, 3, 16, 16)
    for a, b in zip(clip_model(x, t, rgb), image_model(x, t, rgb)):  # T = 1: the same outputs, bit for bit
        assert torch.equal(a, b)
    for a, b in zip(clip_model(x, t, rgb, frames=4), image_model(x, t, rgb)):  # clips of 4: the blocks act
        assert not torch.allclose(a, b, atol=1e-4)
    fresh = WTDiT(replace(MICRO, temporal=True))  # a new clip model starts as its image model, at any T
    fresh_image = WTDiT(MICRO)
    fresh_image.load_denoiser_state_dict({k: v for k, v in fresh.denoiser_state_dict().items()
                                          if not k.startswith("temporal.")})
    randomise(fresh_image, std=0.1)
    fresh.load_denoiser_state_dict({**fresh.denoiser_state_dict(), **fresh_image.denoiser_state_dict()})
    for a, b in zip(fresh(x, t, rgb, frames=4), fresh_image(x, t, rgb)):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="batch 8 is not a whole number of clips of 3 frames"):
        clip_model(x, t, rgb, frames=3)


def test_temporal_attention_mixes_each_token_across_its_clips_frames_only():
    """Two clips of 3 frames; perturb clip 0, frame 1, layer 1, patch 2: only that clip's (layer 1, patch 2)
    tokens change, in every frame (the MLP is per token, so only attention can spread the change)."""
    blk = randomise(WTBlock(16, 2, 2.0, "temporal", num_layers=3))
    x, c = torch.randn(6, 3, 5, 16), torch.randn(6, 3, 16)  # (B*T,K,P,D), (B*T,K,D)
    rope = {"temporal": rope_2d(3, 1, 8, 100.0)}
    x2 = x.clone()
    x2[1, 1, 2] += torch.randn(16)
    changed = (blk(x2, c, rope, 3) - blk(x, c, rope, 3)).abs().amax(dim=3) > 1e-7  # (B*T,K,P)
    expect = torch.zeros(6, 3, 5, dtype=torch.bool)
    expect[0:3, 1, 2] = True
    assert torch.equal(changed, expect)


def test_a_clip_batch_of_one_frame_is_a_batch_of_views():
    model = randomise(WTDiT(replace(MICRO, temporal=True)), std=0.1)
    g = torch.Generator()
    views = {"points": torch.randn(4, 3, 3, 16, 16), "valid": torch.rand(4, 3, 16, 16) > 0.3,
             "rgb": torch.randn(4, 3, 16, 16)}
    clips = {k: v[:, None] for k, v in views.items()}  # (B,1,...)
    a = flow_loss(model, views, FlowConfig(), g.manual_seed(3))[0]
    b = flow_loss(model, clips, FlowConfig(), g.manual_seed(3))[0]
    assert torch.equal(a, b)
    four = {k: v.reshape(1, 4, *v.shape[1:]) for k, v in views.items()}  # one clip of 4: one time for all
    assert not torch.equal(flow_loss(model, four, FlowConfig(), g.manual_seed(3))[0], a)


def test_a_single_frame_step_renormalises_each_frame_to_its_own_scale(tmp_path):
    """What a frame-by-frame step trains on: the window's points, renormalised with frame_ratio, equal the
    frame decoded on its own (on valid entries; fills differ)."""
    from wt_model.clips import decode_window, window_samples
    from wt_model.data import decode_sample
    from wt_model.flow import rescale_normalised

    rng = np.random.default_rng(0)
    paths = write_clip_shards(tmp_path, [clip_files(rng, "s_c000", [0, 1, 2], size=16)])
    import webdataset as wds

    (win,) = list(window_samples(ClipConfig(length=3))(iter(wds.DataPipeline(wds.SimpleShardList(paths),
                                                                             wds.tarfile_to_samples()))))
    d = decode_window(win, 16, 3)
    assert not np.allclose(d["frame_ratio"], 1.0)
    own = rescale_normalised(torch.from_numpy(d["points"])[None], torch.from_numpy(d["frame_ratio"])[None])[0]
    for i, frame in enumerate(win["frames"]):
        alone = decode_sample(frame, 16, 3)
        v = np.broadcast_to(alone["valid"][:, None], alone["points"].shape)
        assert np.allclose(own[i].numpy()[v], alone["points"][v], atol=1e-5)


def test_scale_between_windows_by_hand():
    rng = np.random.default_rng(0)
    ref = rng.uniform(1, 2, (2, 4, 4, 3))
    valid = np.ones((2, 4, 4), bool)
    valid[0, 0, 0] = False
    bad = ref.copy()
    bad[0, 0, 0] = 100.0  # not valid in the prediction: left out
    assert np.isclose(scale_between(bad * 0.25, valid, ref, np.ones((2, 4, 4), bool)), 4.0)


def test_init_from_an_image_model_starts_the_clip_model_as_it(tmp_path):
    from wt_model.checkpoint import CheckpointError, save_checkpoint
    from wt_model.data import Normalisation
    from wt_model.train import init_from

    image_model = randomise(WTDiT(MICRO), std=0.1)
    state = image_model.denoiser_state_dict()
    save_checkpoint(tmp_path / "image.pt", {"model": state, "ema": state, "step": 7, "config": MICRO.to_dict(),
                                            "norm": Normalisation().to_dict()})
    said = []
    clip_model = WTDiT(replace(MICRO, temporal=True))
    init_from(clip_model, str(tmp_path / "image.pt"), Normalisation(), said.append)
    assert "temporal blocks start as the identity" in said[0]
    x, t, rgb = torch.randn(4, 3, 3, 16, 16), torch.rand(4, 3), torch.randn(4, 3, 16, 16)
    for a, b in zip(clip_model(x, t, rgb, frames=4), image_model(x, t, rgb)):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(CheckpointError, match="another architecture \\(dim differ\\)"):
        init_from(WTDiT(replace(MICRO, dim=64, temporal=True)), str(tmp_path / "image.pt"), Normalisation(), print)


def test_torchrun_two_processes_train_clips(builtin_clips, tmp_path):
    """DistributedDataParallel over gloo on clips, frame-by-frame steps included (the temporal blocks are then
    out of the graph on that rank)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "wt_model.train", "--shards", builtin_clips, "--steps", "3", "--out", str(out), "--single-frame", "0.5",
           *FAST]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [int(r["step"]) for r in read_log(out)] == [1, 2, 3]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["train"]["world_size"] == 2 and ckpt["config"]["temporal"]


# ----------------------------------------------------------------------------- commands


def read_log(run: Path) -> list[dict]:
    with open(run / "log.csv") as f:
        return list(csv.DictReader(f))


def test_train_clips_sample_video_eval_clips(builtin_clips, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--shards", builtin_clips, "--steps", "2", "--out", str(run), *FAST]) == 0
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["config"]["temporal"] and ckpt["train"]["clips"] and ckpt["train"]["clip_length"] == 2
    assert any(k.startswith("temporal.") for k in ckpt["model"])
    assert [int(r["step"]) for r in read_log(run)] == [1, 2]

    # frames of a rendered clip, as a folder of images and as a video file
    (batch,) = list(clip_eval_loader(expand_shards(builtin_clips), 1, 64, 4, ClipConfig(length=5), limit=1))
    imgs = ((batch["rgb"][0].numpy().transpose(0, 2, 3, 1) + 1) * 127.5).round().astype(np.uint8)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, img in enumerate(imgs):
        Image.fromarray(img).resize((48, 48)).save(folder / f"frame{i}.png")
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(run / "last.pt"), "--video", str(folder), "--out",
                 str(tmp_path / "pred"), "--steps", "2", "--no-filter"]) == 0
    out = capsys.readouterr().out
    assert "5 frames in windows of 2" in out and "resizing" in out
    for i in range(5):
        with np.load(tmp_path / "pred" / f"frame{i}.npz", allow_pickle=False) as z:
            assert z["points"].shape == (4, 64, 64, 3) and np.isfinite(z["points"]).all()
        assert (tmp_path / "pred" / f"frame{i}.ply").exists()
    gif = tmp_path / "clip.gif"
    Image.fromarray(imgs[0]).save(gif, save_all=True, append_images=[Image.fromarray(im) for im in imgs[1:3]])
    assert main(["sample", "--checkpoint", str(run / "last.pt"), "--video", str(gif), "--out",
                 str(tmp_path / "gif"), "--steps", "2", "--clip-length", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "gif").glob("*.npz")) == [f"clip_f{i:04d}.npz" for i in range(3)]

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--shards", builtin_clips, "--clips", "--limit",
                 "2", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "views: 4" in out and "temporal consistency: 2 windows" in out and "ratio clip / per frame" in out


def test_resume_on_clips_continues_exactly(builtin_clips, tmp_path):
    """4 steps straight == 3 steps, then --resume to 4 (2 workers, mid-epoch, an odd batch index)."""
    common = [*FAST, "--workers", "2", "--epoch-samples", "8", "--shuffle-buffer", "4", "--shards", builtin_clips]
    assert main(["train", "--steps", "4", "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["train", "--steps", "3", "--out", str(tmp_path / "b"), *common]) == 0
    assert main(["train", "--steps", "4", "--out", str(tmp_path / "b"), "--resume", *common]) == 0
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k} differs after resume"
    assert [r["loss"] for r in read_log(tmp_path / "a")] == [r["loss"] for r in read_log(tmp_path / "b")]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_clip_input_fails_with_one_line(tmp_path, capsys):
    views = tmp_path / "views"
    write_sphere_shards(views, views=2, shards=1, size=64)
    assert main(["train", "--shards", str(views / "*.tar"), "--steps", "1", "--out", str(tmp_path / "r"),
                 *FAST]) == 2
    assert "no clip" in error_line(capsys)
    rng = np.random.default_rng(0)
    split = write_clip_shards(tmp_path / "split", [clip_files(rng, "s_c000", [0, 1, 2], size=64)[:2],
                                                   clip_files(rng, "s_c000", [0, 1, 2], size=64)[2:]])
    assert main(["train", "--shards", split[0].rsplit("/", 1)[0] + "/*.tar", "--steps", "1", "--out",
                 str(tmp_path / "r2"), *FAST]) == 2
    assert "split or incomplete clip" in error_line(capsys)
    assert main(["sample", "--checkpoint", str(tmp_path / "none.pt"), "--video", str(tmp_path), "--out",
                 str(tmp_path / "p")]) == 2
    assert "no such file" in error_line(capsys)


# ----------------------------------------------------------------------------- the proof that it learns


def mean_pointmap_clip_scores(pattern: str, clips: ClipConfig, size: int = 64, num_layers: int = 4):
    """The trivial baseline on the clips' frames: every frame predicted as the mean normalised pointmap of all
    frames (valid where most are valid), scored like the model, frame by frame; (mean, median) over frames."""
    batches = list(clip_eval_loader(expand_shards(pattern), 8, size, num_layers, clips))
    pts = torch.cat([b["points"].flatten(0, 1) for b in batches]).numpy()  # (N,K,3,H,W)
    valid = torch.cat([b["valid"].flatten(0, 1) for b in batches]).numpy()
    scale = torch.cat([b["scale"].repeat_interleave(b["points"].shape[1]) for b in batches]).numpy()
    scores = mean_pointmap_view_scores(pts, valid, scale)
    return mean_scores(scores), median_scores(scores)


@pytest.mark.slow
def test_tiny_4d_learns_the_builtin_sequences(builtin_clips, tmp_path):
    """The built-in sequences at 64x64 (2 sequences x 2 clips x 8 frames), T = 4 windows every frame, the tiny
    clip model overfit for 150 steps of 4 windows (as many frames as the image proof's 400 steps of 6), then
    scored on its clips' windows side by side (8 windows, 32 frames): it beats the same model run frame by
    frame (T = 1, a trained path thanks to the frame-by-frame steps) on the temporal consistency figure, and the
    mean pointmap on Chamfer, F-score and mask IoU. Chamfer is compared by its median over frames: at this
    budget a frame or two may come out empty (no layer-0 pixel above p = 0.5) and score the cap 1.0, which moves
    the mean by 0.03 each (measured with both clocks and two seeds; the README gives means and medians).
    Figures in the README."""
    run = tmp_path / "run"
    assert main(["train", "--shards", builtin_clips, "--clips", "--clip-length", "4", "--window-stride", "1",
                 "--steps", "150", "--out", str(run), "--preset", "tiny", "--batch", "4", "--lr", "1e-3",
                 "--warmup", "20", "--workers", "1", "--log-every", "50", "--no-progress"]) == 0
    r = evaluate_clips(str(run / "last.pt"), builtin_clips, ClipConfig(length=4), batch=4)
    base, base_median = mean_pointmap_clip_scores(builtin_clips, ClipConfig(length=4))
    print("\n".join(format_clip_report(r)))
    print(f"frames {r.frames}: chamfer_all mean {r.mean.chamfer_all:.4f} median {r.median.chamfer_all:.4f} "
          f"(mean pointmap {base.chamfer_all:.4f}, {base_median.chamfer_all:.4f}), fscore_all {r.mean.fscore_all:.3f} "
          f"({base.fscore_all:.3f}), iou {r.mean.iou:.3f} ({base.iou:.3f}), empty frames {r.mean.empty_all}")
    assert r.frames == 32 and r.video.clip.pairs > 300
    assert r.ratio < 1.0  # the clip run moves more like the tracks than the same weights frame by frame
    assert r.median.chamfer_all < 0.7 * base_median.chamfer_all and r.mean.empty_all <= 4
    assert r.mean.fscore_all > base.fscore_all + 0.15 and r.mean.iou > base.iou + 0.1


def test_heldout_windows_are_whole_sequences_in_shard_order(builtin_clips):
    """The held-out split of clips: windows of held-out sequences only, by the same asset rule as views, first
    ``limit`` in shard order; none at fraction 0."""
    urls, clips = expand_shards(builtin_clips), ClipConfig(length=2)

    def keys(windows):
        return [tuple(f["__key__"] for f in w["frames"]) for w in windows]

    every, bad = heldout_windows(urls, clips, 1.0, 1000)
    assert bad == 0 and len(every) > 2
    first, bad = heldout_windows(urls, clips, 1.0, 2)
    assert keys(first) == keys(every)[:2] and bad == 0
    assert heldout_windows(urls, clips, 0.0, 1000) == ([], 0)
    sequences = {asset_of(w["frames"][0]) for w in every}
    assert len(sequences) >= 2
    some, _ = heldout_windows(urls, clips, 0.5, 1000)
    kept = {s for s in sequences if is_heldout(s, 0.5)}
    assert 0 < len(kept) < len(sequences), sequences  # a split with both sides
    assert keys(some) == keys(w for w in every if asset_of(w["frames"][0]) in kept)
