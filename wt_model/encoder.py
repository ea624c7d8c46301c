"""The frozen image encoder: a DINOv2 vision transformer (ViT/14) whose last four blocks feed WT-DiT.

Architectures are timm's ``vit_{small,base,large}_patch14_dinov2`` (= Meta's ``dinov2_vit{s,b,l}14``):
patch 14, a class token, a learned absolute position embedding for a 37 x 37 grid (518 px) resampled
bicubically (antialiased) to the input's grid, pre-norm blocks with LayerScale, LayerNorm eps 1e-6, GELU MLPs
of 4x width. The module's state-dict keys are timm's and Meta's (``patch_embed.proj.weight``,
``blocks.N.attn.qkv.weight``, ``blocks.N.ls1.gamma``, ...), so either release's weights load as they are.
(timm itself is not imported: on a CPU-only torch it needs a torchvision built for that torch.)

Weights come only from a local file the user names (``--encoder-weights``): safetensors, or a torch state
dict read with ``torch.load(weights_only=True)``; keys may sit under a prefix (``backbone.``, ``encoder.``,
as in MoGe's file), Meta's ``mask_token`` is ignored. Nothing is ever downloaded.

Features: the last four blocks' outputs, each through the final LayerNorm (DINOv2's
``get_intermediate_layers(n=4)``), patch tokens only, concatenated: (B, P, 4 x width). The input is
RGB in [-1, 1], normalised with ImageNet's mean and std as DINOv2 expects. The encoder runs under no_grad (and
bf16 autocast on a GPU that supports it); its parameters never require gradients.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_BLOCKS = 4  # the last four blocks feed the model


@dataclass(frozen=True)
class EncoderSpec:
    width: int
    depth: int
    heads: int
    patch: int = 14
    grid: int = 37  # the position table's side (518 / 14)


ENCODERS: dict[str, EncoderSpec] = {
    "dinov2_vits14": EncoderSpec(384, 12, 6),
    "dinov2_vitb14": EncoderSpec(768, 12, 12),
    "dinov2_vitl14": EncoderSpec(1024, 24, 16),
}


class EncoderError(ValueError):
    """Encoder weights that are missing, unreadable or of another architecture; the message is one line."""


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B,P,C)


class ViTAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))


class ViTMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ViTMlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nn.Module):
    """A DINOv2 ViT/14 backbone with timm's / Meta's parameter names; random weights as timm initialises."""

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        self.spec = spec
        C = spec.width
        self.patch_embed = PatchEmbed(spec.patch, C)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + spec.grid ** 2, C))
        self.blocks = nn.ModuleList(ViTBlock(C, spec.heads) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(C, eps=1e-6)

    @classmethod
    def random(cls, spec: EncoderSpec) -> DinoV2:
        """Random weights as timm initialises them (normal 0.02 cut at +-2, zero biases, LayerScale 1e-5)."""
        with torch.device("meta"):  # skip torch's default initialisation, then initialise once
            m = cls(spec)
        m.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith(".weight") and p.ndim > 1 or name == "pos_embed":
                    p.normal_(0, 0.02).clamp_(-2, 2)  # timm: trunc_normal_(std=0.02) with bounds +-2
                elif name.endswith(".gamma"):
                    p.fill_(1e-5)
                elif name.startswith("norm") or ".norm" in name:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name == "cls_token":
                    nn.init.normal_(p, std=1e-6)
                else:
                    p.zero_()
        return m

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """(1, 1 + h*w, C): the class token's entry and the grid table resampled to h x w."""
        pos = self.pos_embed
        n = int(round((pos.shape[1] - 1) ** 0.5))
        if (h, w) == (n, n):
            return pos
        grid = pos[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2).float()  # (1,C,n,n)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(pos.dtype)], dim=1)

    def features(self, x: torch.Tensor, n: int = FEATURE_BLOCKS) -> list[torch.Tensor]:
        """Normalised image (B,3,H,W) -> the last ``n`` blocks' patch tokens after the final norm, n x (B,P,C)."""
        B, _, H, W = x.shape
        p = self.spec.patch
        tokens = self.patch_embed(x)  # (B,P,C)
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(H // p, W // p)
        out = []
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens)
            if i >= len(self.blocks) - n:
                out.append(self.norm(tokens)[:, 1:])
        return out


class ImageEncoder(nn.Module):
    """Frozen DINOv2 features for WT-DiT: rgb (B,3,H,W) in [-1, 1], H and W multiples of 14 ->
    (B, P, 4 x width). ``weights``: ``{"file": name, "sha256": hex}`` of the loaded file, or None (random)."""

    def __init__(self, name: str, backbone: DinoV2 | None = None):
        super().__init__()
        if name not in ENCODERS:
            raise EncoderError(f"image encoder {name!r}: unknown; choose from {', '.join(ENCODERS)}")
        self.name = name
        self.backbone = backbone if backbone is not None else DinoV2.random(ENCODERS[name])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.weights: dict | None = None
        self.requires_grad_(False)
        self.eval()

    @property
    def feature_dim(self) -> int:
        return FEATURE_BLOCKS * ENCODERS[self.name].width

    def train(self, mode: bool = True) -> ImageEncoder:
        return super().train(False)  # frozen: always in inference mode

    @torch.no_grad()
    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        x = ((rgb.float() + 1) / 2 - self.mean) / self.std
        bf16 = x.is_cuda and torch.cuda.is_bf16_supported()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            return torch.cat(self.backbone.features(x), dim=-1).float()  # (B,P,4C)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file: safetensors, or a torch state dict (``weights_only=True``; a dict
    nesting it under ``model`` or ``state_dict`` is opened)."""
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"encoder weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, unsafe (pickled objects) or not a weights file
        raise EncoderError(f"encoder weights {path}: cannot be read safely ({type(e).__name__})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise EncoderError(f"encoder weights {path}: not a state dict of tensors")
    return state


def load_encoder(name: str, path: str | Path) -> ImageEncoder:
    """An :class:`ImageEncoder` of architecture ``name`` with the weights of the local file ``path``."""
    if name not in ENCODERS:
        raise EncoderError(f"image encoder {name!r}: unknown; choose from {', '.join(ENCODERS)}")
    with torch.device("meta"):  # no random initialisation: every tensor comes from the file
        backbone = DinoV2(ENCODERS[name])
    state = read_state_dict(path)
    anchor = "patch_embed.proj.weight"
    prefixes = [k[: -len(anchor)] for k in state if k.endswith(anchor)]
    if len(prefixes) != 1:
        raise EncoderError(f"encoder weights {path}: no DINOv2 backbone ({anchor} found {len(prefixes)} times)")
    prefix = prefixes[0]
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if any(k.startswith(("reg_token", "register_tokens")) for k in state):
        raise EncoderError(f"encoder weights {path}: a DINOv2 with registers, not {name}")
    state = {k: v for k, v in state.items() if k != "mask_token" and not k.startswith("head.")}
    own = backbone.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and k != "pos_embed" and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        what = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                else f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}")
        raise EncoderError(f"encoder weights {path}: not a {name} backbone ({what})")
    pos = state["pos_embed"]
    if pos.ndim != 3 or pos.shape[-1] != own["pos_embed"].shape[-1] or round((pos.shape[1] - 1) ** 0.5) ** 2 \
            != pos.shape[1] - 1:
        raise EncoderError(f"encoder weights {path}: pos_embed {tuple(pos.shape)} is not a square grid table")
    backbone.pos_embed = nn.Parameter(torch.empty(pos.shape, device="meta"))
    backbone.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    encoder = ImageEncoder(name, backbone)
    encoder.weights = {"file": Path(path).name, "sha256": file_sha256(path)}
    return encoder
