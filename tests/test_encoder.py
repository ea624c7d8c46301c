"""The frozen DINOv2 image encoder: shapes, frozen weights, features reaching the output, weights files
(safetensors and torch state dicts, prefixes, wrong architectures, unsafe files) and the checkpoint's record
of the weights it was trained with."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from safetensors.torch import save_file

from wt_model.checkpoint import CheckpointError, load_model, save_checkpoint
from wt_model.encoder import ENCODERS, EncoderError, ImageEncoder, file_sha256, load_encoder
from wt_model.flow import FlowConfig, flow_loss
from wt_model.models import WTDiT, configure


@pytest.fixture(scope="module")
def small_encoder() -> ImageEncoder:
    torch.manual_seed(0)
    enc = ImageEncoder("dinov2_vits14")
    with torch.no_grad():  # random LayerScale large enough that every block matters
        for name, p in enc.named_parameters():
            if name.endswith("gamma"):
                p.normal_(0, 0.3)
    return enc


def weights_file(enc: ImageEncoder, path, prefix: str = "", extra: dict | None = None):
    state = {prefix + k: v.contiguous() for k, v in enc.backbone.state_dict().items()}
    save_file({**state, **(extra or {})}, str(path))
    return path


def test_shapes_at_two_sizes_and_the_encoder_is_frozen(small_encoder):
    assert small_encoder.feature_dim == 4 * 384
    for H, W in ((56, 56), (42, 70)):
        feats = small_encoder(torch.rand(2, 3, H, W) * 2 - 1)
        assert feats.shape == (2, (H // 14) * (W // 14), 4 * 384) and torch.isfinite(feats).all()
    assert not any(p.requires_grad for p in small_encoder.parameters())
    small_encoder.train()
    assert not small_encoder.training  # frozen: always in inference mode


def test_no_encoder_parameter_gets_a_gradient_and_the_features_change_the_output(small_encoder):
    cfg, _ = configure("tiny", "dinov2_vits14")
    torch.manual_seed(1)
    model = WTDiT(cfg, small_encoder)
    with torch.no_grad():  # a non-zero head so that the output can depend on anything
        model.final.linear.weight.normal_(0, 0.05)
        for blk in model.blocks:
            blk.adaLN_modulation[-1].weight.normal_(0, 0.05)
    model.train()
    assert not model.encoder.training
    batch = {"points": torch.randn(2, 4, 3, 56, 56), "valid": torch.rand(2, 4, 56, 56) > 0.3,
             "rgb": torch.rand(2, 3, 56, 56) * 2 - 1}
    loss, _ = flow_loss(model, batch, FlowConfig(), torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.img_proj.weight.grad is not None and model.img_proj.weight.grad.abs().sum() > 0
    assert not any(k.startswith("encoder.") for k in model.denoiser_state_dict())
    x, t = torch.randn(1, 4, 3, 56, 56), torch.rand(1, 4)
    rgb = batch["rgb"][:1]
    with torch.no_grad():
        out = model(x, t, rgb)[0]
        tokens = model.encode(rgb)
        assert torch.equal(model(x, t, rgb, tokens)[0], out)  # precomputed image tokens: the same output
        other = copy.deepcopy(small_encoder)  # other encoder weights, same denoiser
        other.backbone.blocks[-1].mlp.fc2.weight.normal_(0, 0.05)
        swapped = WTDiT(cfg, other)
        swapped.load_denoiser_state_dict(model.denoiser_state_dict())
        assert (swapped(x, t, rgb)[0] - out).abs().max() > 1e-4


def test_weights_load_from_safetensors_and_torch_files(small_encoder, tmp_path):
    x = torch.rand(1, 3, 28, 28) * 2 - 1
    ref = small_encoder(x)
    # MoGe-style prefix and Meta's mask_token are accepted
    st = weights_file(small_encoder, tmp_path / "w.safetensors", "backbone.", {"backbone.mask_token": torch.zeros(1,
                                                                                                           384)})
    enc = load_encoder("dinov2_vits14", st)
    assert torch.equal(enc(x), ref) and enc.weights == {"file": "w.safetensors", "sha256": file_sha256(st)}
    pt = tmp_path / "w.pth"
    torch.save({"model": small_encoder.backbone.state_dict()}, pt)
    assert torch.equal(load_encoder("dinov2_vits14", pt)(x), ref)
    with pytest.raises(EncoderError, match="not a dinov2_vitb14 backbone") as e:
        load_encoder("dinov2_vitb14", st)
    assert "\n" not in str(e.value)
    with pytest.raises(EncoderError, match="no such file"):
        load_encoder("dinov2_vits14", tmp_path / "missing.safetensors")
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"x": object()}))
    with pytest.raises(EncoderError, match="cannot be read safely"):
        load_encoder("dinov2_vits14", evil)
    with pytest.raises(EncoderError, match="unknown"):
        ImageEncoder("dinov2_vitg14")


def test_checkpoint_records_the_encoder_and_refuses_another(small_encoder, tmp_path):
    st = weights_file(small_encoder, tmp_path / "w.safetensors")
    cfg, _ = configure("tiny", "dinov2_vits14")
    model = WTDiT(cfg, load_encoder("dinov2_vits14", st))
    rec = {"name": "dinov2_vits14", **model.encoder.weights}
    save_checkpoint(tmp_path / "c.pt", {"model": model.denoiser_state_dict(), "ema": model.denoiser_state_dict(),
                                        "step": 1, "config": cfg.to_dict(), "encoder": rec})
    loaded, _, _ = load_model(tmp_path / "c.pt", encoder_weights=st)
    rgb = torch.rand(1, 3, 56, 56)
    assert torch.equal(loaded.encode(rgb), model.encode(rgb))
    with pytest.raises(CheckpointError, match="pass its weights with --encoder-weights"):
        load_model(tmp_path / "c.pt")
    other = weights_file(small_encoder, tmp_path / "other.safetensors", extra={"mask_token": torch.ones(1, 384)})
    with pytest.raises(CheckpointError, match="trained with encoder weights w.safetensors"):
        load_model(tmp_path / "c.pt", encoder_weights=other)


def timm_or_skip():
    try:
        import timm
    except Exception as e:  # timm needs a torchvision built for this torch (none exists for the CPU build here)
        pytest.skip(f"timm not importable ({type(e).__name__})")
    return timm


@pytest.mark.parametrize("name,timm_name", [("dinov2_vits14", "vit_small_patch14_dinov2")])
def test_features_equal_timms(small_encoder, name, timm_name, tmp_path):
    """A second engine: timm's DINOv2 with the same weights gives the same last-four-block features."""
    timm = timm_or_skip()
    ref = timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    ref.load_state_dict(small_encoder.backbone.state_dict(), strict=False)
    rgb = torch.rand(1, 3, 56, 70) * 2 - 1
    x = ((rgb + 1) / 2 - small_encoder.mean) / small_encoder.std
    with torch.no_grad():
        theirs = torch.cat(ref.forward_intermediates(x, indices=4, norm=True, output_fmt="NLC",
                                                     intermediates_only=True), dim=-1)
    assert torch.allclose(small_encoder(rgb), theirs, atol=1e-5)
    assert set(ref.state_dict()) == set(small_encoder.backbone.state_dict())
    assert ENCODERS[name].width == ref.embed_dim


def hf_state_dict(backbone) -> dict[str, torch.Tensor]:
    """Our (timm / Meta named) DINOv2 weights renamed for Hugging Face's ``Dinov2Model`` (q, k, v split)."""
    out = {"embeddings.cls_token": backbone.cls_token, "embeddings.position_embeddings": backbone.pos_embed,
           "embeddings.mask_token": torch.zeros(1, backbone.cls_token.shape[-1]),
           "embeddings.patch_embeddings.projection.weight": backbone.patch_embed.proj.weight,
           "embeddings.patch_embeddings.projection.bias": backbone.patch_embed.proj.bias,
           "layernorm.weight": backbone.norm.weight, "layernorm.bias": backbone.norm.bias}
    for i, blk in enumerate(backbone.blocks):
        hf = f"encoder.layer.{i}."
        for q, t in zip(("q_proj", "k_proj", "v_proj"), blk.attn.qkv.weight.chunk(3)):
            out[hf + f"attention.{q}.weight"] = t
        for q, t in zip(("q_proj", "k_proj", "v_proj"), blk.attn.qkv.bias.chunk(3)):
            out[hf + f"attention.{q}.bias"] = t
        ours = {"norm1": blk.norm1, "norm2": blk.norm2, "attention.o_proj": blk.attn.proj, "mlp.fc1": blk.mlp.fc1,
                "mlp.fc2": blk.mlp.fc2}
        for name, mod in ours.items():
            out[hf + name + ".weight"], out[hf + name + ".bias"] = mod.weight, mod.bias
        out[hf + "layer_scale1.lambda1"], out[hf + "layer_scale2.lambda1"] = blk.ls1.gamma, blk.ls2.gamma
    return out


def test_features_equal_hugging_faces_dinov2(small_encoder):
    """A second engine that runs here (timm's needs a torchvision this CPU torch lacks): Hugging Face's
    Dinov2Model given the same weights gives the same last four blocks' patch tokens after the final norm, on
    the backbone's own 37 x 37 grid (518 px, no position resampling). Every weight is used (strict load)."""
    transformers = pytest.importorskip("transformers")
    spec = ENCODERS["dinov2_vits14"]
    config = transformers.Dinov2Config(hidden_size=spec.width, num_hidden_layers=spec.depth,
                                       num_attention_heads=spec.heads, intermediate_size=4 * spec.width,
                                       patch_size=spec.patch, image_size=spec.grid * spec.patch, layer_norm_eps=1e-6)
    ref = transformers.Dinov2Model(config).eval()
    ref.load_state_dict(hf_state_dict(small_encoder.backbone), strict=True)
    rgb = torch.rand(1, 3, 518, 518) * 2 - 1
    x = ((rgb + 1) / 2 - small_encoder.mean) / small_encoder.std
    with torch.no_grad():
        hidden = ref(pixel_values=x, output_hidden_states=True).hidden_states  # embeddings, then each block
        theirs = torch.cat([ref.layernorm(h)[:, 1:] for h in hidden[-4:]], dim=-1)
        ours = small_encoder(rgb)
    assert ours.shape == theirs.shape == (1, 37 * 37, 4 * spec.width)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    assert (ours - theirs).abs().max() < 1e-3 * theirs.abs().max()
