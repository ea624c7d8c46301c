"""WT-DiT: a layered-pointmap diffusion transformer, in one file.

Notation used in the shape comments:
    B batch, K geometry layers, H x W image, p patch size, h x w = H/p x W/p patch grid, P = h*w patches,
    D model width, C = 3 point coordinates per pixel, F image-feature width.

Input: one RGB image (B,3,H,W) in [-1, 1], the noisy normalised layered pointmap x_t (B,K,3,H,W) and the
per-layer flow time t (B,K) in [0, 1]. Output: the predicted clean layers (B,K,3,H,W) (or the velocity, as
configured by the trainer) and a validity logit per layer and pixel (B,K,H,W). H and W may be any multiple of
the patch: nothing in the network is tied to one grid (positions are 2D RoPE and pixel-plane coordinates).

Tokens (B,K,P,D) are "split" like the reference's: the first half of each token's width carries the image,
the second half the layer's noisy geometry.
    image half     features (B,P,F) -> Linear(F, D) -> LayerNorm (per position) -> x 0.3 -> Linear(D, D/2),
                   the same for every layer. Features: a frozen DINOv2 backbone's last four blocks
                   concatenated (F = 4 x encoder width, see encoder.py), or with ``encoder="none"`` the raw
                   RGB patch (F = 3p^2).
    geometry half  Linear over the pixel's noisy point (3), RGB (3) and pixel-plane coordinates u, v in
                   [-1, 1] (2): 8 p^2 values per patch -> D/2.
A learned layer embedding is added once. Blocks cycle frame-wise attention (the P tokens of one layer),
ray-wise attention (the K tokens at one patch; no positions) and global attention (all K*P tokens); frame and
global attention rotate queries and keys by 2D RoPE (frequency base ``rope_base``, 100). A zero-initialised
per-layer FiLM, x * (1 + gamma_k) + beta_k, precedes every frame-wise block and the output head. The flow
time conditions every block through DiT's adaLN-Zero, per layer, because each layer may have its own time.

Clips (``temporal=True``, the reference's dynamic model): the batch axis holds B clips of T frames, frame-major
(row b*T + i is frame i of clip b), and ``frames=T`` is passed to forward. A temporal block follows every
global block: each (layer, patch position) token attends over the clip's T frames, with 1D RoPE over the frame
index on queries and keys; adaLN-Zero, so a new temporal block starts as the identity. With T = 1 the temporal
blocks are skipped: the model is exactly the image model (same outputs for the same weights).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from wt_model.encoder import ENCODERS, ImageEncoder

ATTENTION_KINDS = ("frame", "ray", "global")
IMAGE_FEATURE_SCALE = 0.3  # the reference's scale of the layer-normed image features


@dataclass(frozen=True)
class WTDiTConfig:
    """Architecture of a WT-DiT. ``image_size`` (the training size) must be a multiple of ``patch_size``;
    ``encoder`` is ``"none"`` or a name in :data:`wt_model.encoder.ENCODERS` (whose patch it must use)."""

    image_size: int = 64
    patch_size: int = 8
    num_layers: int = 4  # K, geometry layers generated per pixel
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    preset: str = "custom"
    encoder: str = "none"
    rope_base: float = 100.0
    temporal: bool = False  # temporal blocks after the global blocks (clips); see the module docstring

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"model: image_size {self.image_size} is not a multiple of patch {self.patch_size}")
        if self.dim % (2 * self.heads) or (self.dim // self.heads) % 4:
            raise ValueError(f"model: dim {self.dim} / heads {self.heads} must give an even split token and a "
                             "head width divisible by 4 (2D RoPE)")
        if self.encoder != "none":
            if self.encoder not in ENCODERS:
                raise ValueError(f"model: unknown image encoder {self.encoder!r}; choose none or "
                                 f"{', '.join(ENCODERS)}")
            if self.patch_size != ENCODERS[self.encoder].patch:
                raise ValueError(f"model: encoder {self.encoder} needs patch {ENCODERS[self.encoder].patch}")

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, WTDiTConfig] = {
    # Trains on a CPU in minutes at 64x64: 4 layers x 64 patches = 256 tokens, 1.1 M parameters.
    "tiny": WTDiTConfig(64, 8, 4, 96, 6, 4, 4.0, "tiny"),
    # One GPU: 6 layers x 256 patches = 1536 tokens at 256x256.
    "small": WTDiTConfig(256, 16, 6, 384, 12, 6, 4.0, "small"),
    # DiT-B width, World Tracing's 6 layers and patch 14 at 504x504 (36x36 patches).
    "base": WTDiTConfig(504, 14, 6, 768, 12, 12, 4.0, "base"),
    # The released object model's size: width 1536, 36 blocks, 24 heads, 6 layers, 504x504, patch 14.
    "release": WTDiTConfig(504, 14, 6, 1536, 36, 24, 4.0, "release"),
}


def configure(preset: str, encoder: str = "none") -> tuple[WTDiTConfig, str | None]:
    """A preset with an image encoder: (config, a note to log once, or None). With an encoder the patch
    becomes the encoder's and the image size the largest multiple of it not above the preset's."""
    if preset not in PRESETS:
        raise ValueError(f"model: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    if encoder == "none":
        return cfg, None
    if encoder not in ENCODERS:
        raise ValueError(f"model: unknown image encoder {encoder!r}; choose none or {', '.join(ENCODERS)}")
    patch = ENCODERS[encoder].patch
    size = max(cfg.image_size // patch, 1) * patch
    note = None
    if (size, patch) != (cfg.image_size, cfg.patch_size):
        note = (f"note: encoder {encoder} has patch {patch}: preset {preset} runs at {size}x{size} with patch "
                f"{patch} (was {cfg.image_size}x{cfg.image_size}, patch {cfg.patch_size})")
    return replace(cfg, image_size=size, patch_size=patch, encoder=encoder), note


# ----------------------------------------------------------------------------- building blocks


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of flow times in [0, 1] (scaled by 1000 like DiT's integer steps): (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t[..., None].float() * freqs  # (..., D/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (..., D)


def rope_2d(h: int, w: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """2D RoPE angles for an h x w grid, rows then columns: (cos, sin), each (h*w, head_dim). The first half
    of a head's channels turns with the patch row, the second half with the column (RoFormer's rotate-half
    pairing within each half), at frequencies base^(-i / (head_dim/4)), i < head_dim/4."""
    q = head_dim // 4
    inv = base ** (-torch.arange(q, dtype=torch.float64, device=device) / q)  # (q,)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=device),
                            torch.arange(w, dtype=torch.float64, device=device), indexing="ij")
    ang = [c.reshape(-1, 1) * inv for c in (ys, xs)]  # 2 x (P, q)
    ang = torch.cat([ang[0], ang[0], ang[1], ang[1]], dim=1)  # (P, head_dim)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., L, head_dim) by angles (L, head_dim): within each half, pairs (a_i, b_i) -> rotated."""
    y_half, x_half = x.chunk(2, dim=-1)

    def rotate_half(u: torch.Tensor) -> torch.Tensor:
        a, b = u.chunk(2, dim=-1)
        return torch.cat([-b, a], dim=-1)

    rot = torch.cat([rotate_half(y_half), rotate_half(x_half)], dim=-1)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B,K,P,D) with per-layer shift/scale (B,K,1,D)."""
    return x * (1 + scale) + shift


def film(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Per-layer FiLM: x (B,K,P,D), params (2,K',D) with K' >= K -> x * (1 + gamma_k) + beta_k."""
    K = x.shape[1]
    return x * (1 + params[0, :K, None, :]) + params[1, :K, None, :]


class Attention(nn.Module):
    """Multi-head self-attention with qk-norm (timm style) over the second-to-last axis: (N, L, D) -> same;
    queries and keys are rotated by RoPE angles ``rope`` ((L, D/heads) cos, sin) when given."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(dim // heads)  # qk-norm keeps attention logits bounded as training goes
        self.k_norm = nn.LayerNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        N, L, D = x.shape
        qkv = self.qkv(x).reshape(N, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (3,N,h,L,D/h)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)  # (N,h,L,D/h)
        return self.proj(x.transpose(1, 2).reshape(N, L, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WTBlock(nn.Module):
    """A DiT block (adaLN-Zero) whose attention runs frame-wise, ray-wise or globally over (B,K,P,D) tokens.
    Frame-wise blocks start with the per-layer FiLM (zero-initialised, (2,K,D))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, kind: str, num_layers: int = 1):
        super().__init__()
        self.kind = kind
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.film = nn.Parameter(torch.zeros(2, num_layers, dim)) if kind == "frame" else None

    def attend(self, x: torch.Tensor, rope: dict | None, frames: int = 1) -> torch.Tensor:
        B, K, P, D = x.shape
        rope = rope or {}
        if self.kind == "temporal":  # the T frames of one clip at one (layer, patch): x is (N*T,K,P,D)
            N = B // frames
            y = x.reshape(N, frames, K, P, D).permute(0, 2, 3, 1, 4).reshape(N * K * P, frames, D)
            y = self.attn(y, rope.get("temporal"))  # (N*K*P, T, D)
            return y.reshape(N, K, P, frames, D).permute(0, 3, 1, 2, 4).reshape(B, K, P, D)
        if self.kind == "frame":  # the P tokens of one layer, RoPE over the patch grid
            return self.attn(x.reshape(B * K, P, D), rope.get("frame")).reshape(B, K, P, D)
        if self.kind == "ray":  # the K tokens at one patch position: no positions
            y = self.attn(x.transpose(1, 2).reshape(B * P, K, D))  # (B*P, K, D)
            return y.reshape(B, P, K, D).transpose(1, 2)
        return self.attn(x.reshape(B, K * P, D), rope.get("global")).reshape(B, K, P, D)  # all K*P tokens

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: dict | None = None, frames: int = 1) -> torch.Tensor:
        # x (B,K,P,D); c (B,K,D), one conditioning vector per layer; rope {"frame": (P,..), "global": (K*P,..),
        # "temporal": (T,..)}; frames: T, the clip length along B (temporal blocks only)
        if self.film is not None:
            x = film(x, self.film)
        mod = self.adaLN_modulation(c).unsqueeze(2)  # (B,K,1,6D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)  # 6 x (B,K,1,D)
        x = x + gate_a * self.attend(modulate(self.norm1(x), shift_a, scale_a), rope, frames)
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """Per-layer FiLM, adaLN, then a linear map to p*p*(3 coordinates + 1 validity logit) per token."""

    def __init__(self, dim: int, patch: int, num_layers: int):
        super().__init__()
        self.film = nn.Parameter(torch.zeros(2, num_layers, dim))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * 4)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).unsqueeze(2).chunk(2, dim=-1)  # 2 x (B,K,1,D)
        return self.linear(modulate(self.norm(film(x, self.film)), shift, scale))  # (B,K,P,p*p*4)


# ----------------------------------------------------------------------------- the network


class WTDiT(nn.Module):
    """WT-DiT. The image encoder (frozen, never trained, not part of :meth:`denoiser_state_dict`) is built
    from ``cfg.encoder`` with random weights unless a loaded one is passed as ``encoder``."""

    def __init__(self, cfg: WTDiTConfig, encoder: ImageEncoder | None = None):
        super().__init__()
        self.cfg = cfg
        p, D, K = cfg.patch_size, cfg.dim, cfg.num_layers
        if cfg.encoder == "none":
            self.encoder, feat_dim = None, 3 * p * p
        else:
            self.encoder = encoder if encoder is not None else ImageEncoder(cfg.encoder)
            feat_dim = self.encoder.feature_dim
        # image half: features -> width -> layer norm -> x 0.3 -> half width
        self.img_proj = nn.Linear(feat_dim, D)
        self.img_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.img_half = nn.Linear(D, D // 2)
        # geometry half: noisy point, RGB and pixel-plane (u, v) of every pixel of the patch
        self.geo_half = nn.Linear(8 * p * p, D // 2)
        self.layer_embed = nn.Parameter(torch.zeros(K, D))  # (K, D), learned
        self.t_embed = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList(
            WTBlock(D, cfg.heads, cfg.mlp_ratio, ATTENTION_KINDS[i % 3], K) for i in range(cfg.depth))
        self.final = FinalLayer(D, p, K)
        # registered last, so the image model's weights are initialised identically with or without them
        self.temporal = nn.ModuleDict(
            {str(i): WTBlock(D, cfg.heads, cfg.mlp_ratio, "temporal", K)
             for i, blk in enumerate(self.blocks) if blk.kind == "global"}) if cfg.temporal else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, small embeddings, zeroed adaLN modulations and output head; FiLM starts
        as the identity (zeros, set at construction)."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("encoder"):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.layer_embed, std=0.02)
        for lin in (self.t_embed[0], self.t_embed[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for blk in [*self.blocks, *(self.temporal.values() if self.temporal is not None else [])]:
            # adaLN-Zero: every residual branch starts as the identity
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for lin in (self.final.adaLN_modulation[-1], self.final.linear):  # zero-initialised output head
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # ------------------------------------------------------------------ the frozen encoder stays out
    def train(self, mode: bool = True) -> WTDiT:
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()  # frozen: always in inference mode
        return self

    def denoiser_state_dict(self) -> dict:
        """The trained weights: everything but the frozen encoder (which comes from its own file)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def load_denoiser_state_dict(self, state: dict) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("encoder.")]
        if missing or unexpected:
            raise RuntimeError(f"weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def denoiser_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("encoder.")]

    # ------------------------------------------------------------------ patches
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N,C,H,W) -> (N,P,C*p*p), patches in row-major order."""
        p = self.cfg.patch_size
        N, C, H, W = x.shape
        x = x.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (N,h,w,C,p,p)
        return x.reshape(N, (H // p) * (W // p), C * p * p)

    def unpatchify(self, x: torch.Tensor, C: int, H: int, W: int) -> torch.Tensor:
        """(N,P,C*p*p) -> (N,C,H,W)."""
        p = self.cfg.patch_size
        N = x.shape[0]
        x = x.reshape(N, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5)  # (N,C,h,p,w,p)
        return x.reshape(N, C, H, W)

    # ------------------------------------------------------------------ forward
    def encode(self, rgb: torch.Tensor) -> torch.Tensor:
        """The image half of the tokens, computed once per image (the sampler reuses it for every step):
        rgb (B,3,H,W) in [-1, 1] -> (B,P,D/2). The encoder runs without gradients."""
        H, W = rgb.shape[-2:]
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"model: image {W}x{H} is not a multiple of the patch {p}")
        if self.encoder is None:
            feats = self.patchify(rgb)  # (B,P,3p²)
        else:
            feats = self.encoder(rgb).to(self.img_proj.weight.dtype)  # (B,P,F), no grad inside
        return self.img_half(IMAGE_FEATURE_SCALE * self.img_norm(self.img_proj(feats)))  # (B,P,D/2)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, rgb: torch.Tensor,
                image_tokens: torch.Tensor | None = None, frames: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t (B,K,3,H,W), t (B,K), rgb (B,3,H,W), image_tokens (B,P,D/2) from :meth:`encode` (computed here
        when None) -> (points (B,K,3,H,W), valid logits (B,K,H,W)). ``frames``: B holds clips of this many
        frames, frame-major (module docstring); the temporal blocks run when it is above 1."""
        B, K, C, H, W = x_t.shape
        if B % frames:
            raise ValueError(f"model: batch {B} is not a whole number of clips of {frames} frames")
        p, h, w = self.cfg.patch_size, H // self.cfg.patch_size, W // self.cfg.patch_size
        if image_tokens is None:
            image_tokens = self.encode(rgb)
        img = image_tokens.unsqueeze(1).expand(B, K, -1, -1)  # (B,K,P,D/2)
        v, u = torch.meshgrid(torch.linspace(-1 + 1 / H, 1 - 1 / H, H, device=rgb.device),
                              torch.linspace(-1 + 1 / W, 1 - 1 / W, W, device=rgb.device), indexing="ij")
        pix = torch.cat([rgb, torch.stack([u, v]).to(rgb.dtype).expand(B, 2, H, W)], dim=1)  # (B,5,H,W)
        pix = self.patchify(pix).unsqueeze(1).expand(B, K, -1, -1)  # (B,K,P,5p²)
        pts = self.patchify(x_t.reshape(B * K, C, H, W)).reshape(B, K, h * w, C * p * p)  # (B,K,P,3p²)
        geo = self.geo_half(torch.cat([pts, pix], dim=-1))  # (B,K,P,D/2)
        x = torch.cat([img, geo], dim=-1) + self.layer_embed[:K, None, :]  # (B,K,P,D) + (K,1,D)
        c = self.t_embed(timestep_embedding(t, 256))  # (B,K,D)
        cos, sin = rope_2d(h, w, self.cfg.dim // self.cfg.heads, self.cfg.rope_base, x.device)  # (P, D/heads)
        rope = {"frame": (cos, sin), "global": (cos.repeat(K, 1), sin.repeat(K, 1))}  # (P,.), (K*P,.)
        temporal = self.temporal if frames > 1 and self.temporal is not None else {}
        if temporal:  # 1D RoPE over the frame index: the grid's row angles with one column
            rope["temporal"] = rope_2d(frames, 1, self.cfg.dim // self.cfg.heads, self.cfg.rope_base, x.device)
        for i, blk in enumerate(self.blocks):
            x = blk(x, c, rope)  # (B,K,P,D)
            if str(i) in temporal:
                x = temporal[str(i)](x, c, rope, frames)  # each (layer, patch) over the clip's frames
        out = self.final(x, c)  # (B,K,P,4p²)
        out = self.unpatchify(out.reshape(B * K, h * w, -1), 4, H, W).reshape(B, K, 4, H, W)
        return out[:, :, :3], out[:, :, 3]  # (B,K,3,H,W), (B,K,H,W)


def build_model(preset_or_cfg: str | WTDiTConfig, encoder: ImageEncoder | None = None) -> WTDiT:
    """A WT-DiT from a preset name or a config (the encoder, when set, loaded by the caller or random)."""
    if isinstance(preset_or_cfg, str):
        preset_or_cfg = configure(preset_or_cfg)[0]
    return WTDiT(preset_or_cfg, encoder)
