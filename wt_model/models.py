"""WT-DiT: a compact layered-pointmap diffusion transformer, in one file.

Notation used in the shape comments:
    B batch, K geometry layers, H x W image, p patch size, h x w = H/p x W/p patch grid, P = h*w patches,
    D model width, C = 3 point coordinates per pixel.

Input: one RGB image (B,3,H,W) in [-1, 1], the noisy normalised layered pointmap x_t (B,K,3,H,W) and the
per-layer flow time t (B,K) in [0, 1]. Output: the predicted clean layers (B,K,3,H,W) (or the velocity, as
configured by the trainer) and a validity logit per layer and pixel (B,K,H,W).

Every geometry layer is its own set of P patch tokens; the image's patch features are concatenated to every
layer's tokens (pixel-aligned conditioning); a learned layer embedding tells layers apart and a fixed 2D
sin-cos embedding gives positions. Blocks cycle through frame-wise attention (the P tokens of one layer),
ray-wise attention (the K tokens at one patch; positions are identical there, so no 2D information is used)
and global attention (all K*P tokens). The flow time conditions every block through DiT's adaLN-Zero, per
layer, because each layer has its own time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_KINDS = ("frame", "ray", "global")


@dataclass(frozen=True)
class WTDiTConfig:
    """Architecture of a WT-DiT. ``image_size`` must be a multiple of ``patch_size``."""

    image_size: int = 64
    patch_size: int = 8
    num_layers: int = 4  # K, geometry layers generated per pixel
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    preset: str = "custom"

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, WTDiTConfig] = {
    # Trains on a CPU in minutes at 64x64: 4 layers x 64 patches = 256 tokens, 1.1 M parameters.
    "tiny": WTDiTConfig(64, 8, 4, 96, 6, 4, 4.0, "tiny"),
    # One GPU: 6 layers x 256 patches = 1536 tokens at 256x256.
    "small": WTDiTConfig(256, 16, 6, 384, 12, 6, 4.0, "small"),
    # DiT-B width, World Tracing's 6 layers and patch 14 at 504x504 (36x36 patches).
    "base": WTDiTConfig(504, 14, 6, 768, 12, 12, 4.0, "base"),
}


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (MAE/DiT style): (h*w, dim), rows then columns."""
    assert dim % 4 == 0, "sin-cos 2D embedding needs dim divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    out = [f(c.reshape(-1, 1) * omega) for c in (ys, xs) for f in (torch.sin, torch.cos)]  # 4 x (P, D/4)
    return torch.cat(out, dim=1).float()  # (P, D)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of flow times in [0, 1] (scaled by 1000 like DiT's integer steps): (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t[..., None].float() * freqs  # (..., D/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (..., D)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B,K,P,D) with per-layer shift/scale (B,K,1,D)."""
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head self-attention with qk-norm (timm style) over the second-to-last axis: (N, L, D) -> same."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(dim // heads)  # qk-norm keeps attention logits bounded as training goes
        self.k_norm = nn.LayerNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, L, D = x.shape
        qkv = self.qkv(x).reshape(N, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (3,N,h,L,D/h)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)  # (N,h,L,D/h)
        return self.proj(x.transpose(1, 2).reshape(N, L, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WTBlock(nn.Module):
    """A DiT block (adaLN-Zero) whose attention runs frame-wise, ray-wise or globally over (B,K,P,D) tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, kind: str):
        super().__init__()
        self.kind = kind
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        B, K, P, D = x.shape
        if self.kind == "frame":  # the P tokens of one layer
            return self.attn(x.reshape(B * K, P, D)).reshape(B, K, P, D)
        if self.kind == "ray":  # the K tokens at one patch position
            y = self.attn(x.transpose(1, 2).reshape(B * P, K, D))  # (B*P, K, D)
            return y.reshape(B, P, K, D).transpose(1, 2)
        return self.attn(x.reshape(B, K * P, D)).reshape(B, K, P, D)  # all K*P tokens

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x (B,K,P,D); c (B,K,D), one conditioning vector per layer
        mod = self.adaLN_modulation(c).unsqueeze(2)  # (B,K,1,6D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)  # 6 x (B,K,1,D)
        x = x + gate_a * self.attend(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """adaLN then a linear map to p*p*(3 coordinates + 1 validity logit) per token."""

    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * 4)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).unsqueeze(2).chunk(2, dim=-1)  # 2 x (B,K,1,D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B,K,P,p*p*4)


class WTDiT(nn.Module):
    def __init__(self, cfg: WTDiTConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"model: image_size {cfg.image_size} is not a multiple of patch {cfg.patch_size}")
        self.cfg = cfg
        p, D, g = cfg.patch_size, cfg.dim, cfg.image_size // cfg.patch_size
        self.grid = g
        # Pixel-aligned conditioning: each token sees its layer's noisy patch and the image patch, concatenated.
        self.x_embed = nn.Linear(2 * 3 * p * p, D)
        self.layer_embed = nn.Parameter(torch.zeros(cfg.num_layers, D))  # (K, D), learned
        self.register_buffer("pos_embed", sincos_2d(D, g, g), persistent=False)  # (P, D), fixed
        self.t_embed = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList(
            WTBlock(D, cfg.heads, cfg.mlp_ratio, ATTENTION_KINDS[i % 3]) for i in range(cfg.depth))
        self.final = FinalLayer(D, p)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, small embeddings, zeroed adaLN modulations and output head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.layer_embed, std=0.02)
        for lin in (self.t_embed[0], self.t_embed[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for blk in self.blocks:  # adaLN-Zero: every residual branch starts as the identity
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for lin in (self.final.adaLN_modulation[-1], self.final.linear):  # zero-initialised output head
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N,C,H,W) -> (N,P,C*p*p), patches in row-major order."""
        p = self.cfg.patch_size
        N, C, H, W = x.shape
        x = x.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (N,h,w,C,p,p)
        return x.reshape(N, (H // p) * (W // p), C * p * p)

    def unpatchify(self, x: torch.Tensor, C: int) -> torch.Tensor:
        """(N,P,C*p*p) -> (N,C,H,W)."""
        p, g = self.cfg.patch_size, self.grid
        N = x.shape[0]
        x = x.reshape(N, g, g, C, p, p).permute(0, 3, 1, 4, 2, 5)  # (N,C,h,p,w,p)
        return x.reshape(N, C, g * p, g * p)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t (B,K,3,H,W), t (B,K), rgb (B,3,H,W) -> (points (B,K,3,H,W), valid logits (B,K,H,W))."""
        B, K, C, H, W = x_t.shape
        img = self.patchify(rgb).unsqueeze(1).expand(B, K, -1, -1)  # (B,K,P,3p²)
        pts = self.patchify(x_t.reshape(B * K, C, H, W)).reshape(B, K, -1, C * self.cfg.patch_size ** 2)
        x = self.x_embed(torch.cat([pts, img], dim=-1))  # (B,K,P,D)
        x = x + self.pos_embed + self.layer_embed[:K, None, :]  # + (P,D) + (K,1,D)
        c = self.t_embed(timestep_embedding(t, 256))  # (B,K,D)
        for blk in self.blocks:
            x = blk(x, c)  # (B,K,P,D)
        out = self.final(x, c)  # (B,K,P,4p²)
        out = self.unpatchify(out.reshape(B * K, -1, out.shape[-1]), 4).reshape(B, K, 4, H, W)
        return out[:, :, :3], out[:, :, 3]  # (B,K,3,H,W), (B,K,H,W)


def build_model(preset_or_cfg: str | WTDiTConfig) -> WTDiT:
    """A WT-DiT from a preset name or a config."""
    if isinstance(preset_or_cfg, str):
        if preset_or_cfg not in PRESETS:
            raise ValueError(f"model: unknown preset {preset_or_cfg!r}; choose from {', '.join(PRESETS)}")
        preset_or_cfg = PRESETS[preset_or_cfg]
    return WTDiT(preset_or_cfg)
