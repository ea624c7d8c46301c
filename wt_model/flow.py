"""The training objective and the time schedule shared by the trainer and the sampler.

Rectified flow in the normalised pointmap space: x_t = (1 - t) x0 + t eps, eps ~ N(0, I), t = 1 pure noise.
The velocity is v = dx_t/dt = eps - x0. By default the network predicts the clean layers x0 and the loss is
taken on velocity (JiT): v_hat = (x_t - x0_hat) / max(t, t_clamp), compared with v computed with the same
clamp, so the loss is an x0 loss weighted by 1 / max(t, t_clamp)^2. Predicting v directly is the option
``prediction="velocity"``. The clamp belongs to the loss only: the sampler steps on the exact straight path
(:func:`euler_step`), so its last step lands on the prediction for every layer.

Times (``clock``). One global time s per sample walks from 1 to 0 during sampling. ``"shared"`` (the default,
the reference's inference): every layer on t = s. ``"layered"`` (ours before, kept as an option): each layer
k runs on its own clock t_k = s ** gamma_k with gamma_0 = ``layer0_gamma`` > 1 and gamma_k = 1 for the hidden
layers, so layer 0 is always less noisy than the hidden layers at the same s (it resolves first and the hidden
layers are generated behind it), yet every layer starts at pure noise (s = 1) and ends clean (s = 0), and
training and sampling use the same map. On the learning benchmark (README) the shared clock measured better
on every figure, so it is the default. Training draws s per sample from a mixture: with probability
``p_uniform`` uniform on [0, 1], otherwise logit-normal(``logit_mean``, ``logit_std``), whose negative mean
favours low noise. Default (0.3, -0.4, 1.0): the logit-normal part spends most samples at low and mid noise,
where the visible surface's detail is decided; the uniform part keeps the high-noise end trained, where the
hidden layers are generated from nothing and the sampler's first steps run.

Missing layers (``fill``). ``"repeat"`` (ours, the default: with the shared clock it measured better on every
figure): x0 holds the data's geometric fill (data.py) and x_t is built from it like every other entry.
``"noise"`` (the reference): the network's input x_t is replaced by fresh noise wherever a layer is missing.
Either way the point loss covers valid entries only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

CLOCKS = ("shared", "layered")
FILLS = ("repeat", "noise")


@dataclass(frozen=True)
class FlowConfig:
    prediction: str = "x0"  # "x0" (the network predicts clean layers) or "velocity"
    p_uniform: float = 0.3
    logit_mean: float = -0.4
    logit_std: float = 1.0
    layer0_gamma: float = 1.5
    t_clamp: float = 0.05
    valid_weight: float = 1.0  # weight of the validity BCE next to the velocity loss
    clock: str = "shared"  # "shared" (one t per sample) or "layered" (per-layer clocks)
    fill: str = "repeat"  # missing layers in x_t: "repeat" (the data's fill) or "noise" (fresh noise)
    single_frame: float = 0.0  # clips: share of steps trained frame by frame (T = 1, each frame's own scale)

    def __post_init__(self) -> None:
        if self.prediction not in ("x0", "velocity"):
            raise ValueError(f"flow: prediction must be 'x0' or 'velocity', got {self.prediction!r}")
        if self.clock not in CLOCKS:
            raise ValueError(f"flow: clock must be one of {', '.join(CLOCKS)}, got {self.clock!r}")
        if self.fill not in FILLS:
            raise ValueError(f"flow: fill must be one of {', '.join(FILLS)}, got {self.fill!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def sample_s(batch: int, cfg: FlowConfig, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Global times (B,) from the uniform / logit-normal mixture."""
    u = torch.rand(batch, generator=generator)
    ln = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(batch, generator=generator))
    use_uniform = torch.rand(batch, generator=generator) < cfg.p_uniform
    return torch.where(use_uniform, u, ln).to(device)


def layer_times(s: torch.Tensor, num_layers: int, cfg: FlowConfig) -> torch.Tensor:
    """Global times (B,) -> per-layer times (B,K): layer 0 on s ** layer0_gamma and hidden layers on s
    (``clock="layered"``), or every layer on s (``"shared"``)."""
    gamma = torch.ones(num_layers, device=s.device)
    if cfg.clock == "layered":
        gamma[0] = cfg.layer0_gamma
    return s[:, None] ** gamma  # (B,K)


def predict(model, x_t: torch.Tensor, t: torch.Tensor, rgb: torch.Tensor, cfg: FlowConfig,
            image_tokens: torch.Tensor | None = None, frames: int = 1):
    """Run the network; return (x0_hat, v_hat, valid_logits) whichever quantity it predicts. v_hat uses the
    loss's clamp. x_t (B,K,3,H,W), t (B,K), rgb (B,3,H,W), image_tokens from ``model.encode`` or None;
    ``frames``: B holds clips of this many frames (the model's temporal blocks)."""
    if frames > 1:
        out, valid_logits = model(x_t, t, rgb, image_tokens, frames=frames)
    elif image_tokens is None:
        out, valid_logits = model(x_t, t, rgb)
    else:
        out, valid_logits = model(x_t, t, rgb, image_tokens)
    t5 = t[..., None, None, None]  # (B,K,1,1,1)
    if cfg.prediction == "x0":
        return out, (x_t - out) / t5.clamp(min=cfg.t_clamp), valid_logits
    return x_t - t5 * out, out, valid_logits


def euler_step(x_t: torch.Tensor, x0_hat: torch.Tensor, v_hat: torch.Tensor, t: torch.Tensor,
               t_next: torch.Tensor, cfg: FlowConfig) -> torch.Tensor:
    """One Euler step from t to t_next (B,K) on the straight path. With x0 prediction the unclamped velocity
    (x_t - x0_hat) / t gives x_next = x0_hat + (t_next / t)(x_t - x0_hat): at t_next = 0 exactly x0_hat, whatever
    t is. With velocity prediction x_next = x_t + (t_next - t) v_hat."""
    t5, tn5 = t[..., None, None, None], t_next[..., None, None, None]
    if cfg.prediction == "x0":
        return x0_hat + (tn5 / t5.clamp(min=1e-12)) * (x_t - x0_hat)
    return x_t + (tn5 - t5) * v_hat


def noisy_input(x0: torch.Tensor, valid: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cfg: FlowConfig,
                generator: torch.Generator) -> torch.Tensor:
    """x_t (B,K,3,H,W) of clean layers x0, validity (B,K,H,W), times (B,K) and noise eps; with
    ``fill="noise"`` missing entries hold fresh noise instead."""
    t5 = t[..., None, None, None]
    x_t = (1 - t5) * x0 + t5 * eps
    if cfg.fill == "noise":
        fresh = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_t = torch.where(valid[:, :, None], x_t, fresh)
    return x_t


def rescale_normalised(points: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """median-log points (B,T,K,3,H,W) normalised by a scale s -> the same points normalised by s / ratio
    (ratio (B,T)): z' = z + log r, x' = sign(x) log1p(expm1(|x|) r). ``ratio`` 1 changes nothing (zscore)."""
    r = ratio.to(points.dtype)[:, :, None, None, None, None]  # (B,T,1,1,1,1)
    xy, z = points[:, :, :, :2], points[:, :, :, 2:]
    return torch.cat([torch.sign(xy) * torch.log1p(torch.expm1(xy.abs()) * r), z + torch.log(r)], dim=3)


def flow_loss(model, batch: dict, cfg: FlowConfig, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """The training loss of one batch (tensors on the model's device); returns (loss, parts for logging).

    Velocity MSE over valid entries only (missing layers hold fills, not targets) plus the validity BCE over
    every layer and pixel. A batch of clips (``points`` (B,T,K,3,H,W), the clip loader's windows) runs as B*T
    frames with one time s per clip, the model's temporal blocks over each clip's T frames; T = 1 is exactly a
    batch of views."""
    x0, valid, rgb = batch["points"], batch["valid"], batch["rgb"]  # (B,K,3,H,W), (B,K,H,W), (B,3,H,W)
    frames = 1
    if x0.ndim == 6:  # clips: (B,T,...) -> (B*T,...), frame-major
        frames = x0.shape[1]
        if cfg.single_frame > 0 and torch.rand(1, generator=generator).item() < cfg.single_frame:
            frames = 1  # this step frame by frame, each frame in its own normalisation (the image model)
            x0 = rescale_normalised(x0, batch["frame_ratio"])
        x0, valid, rgb = x0.flatten(0, 1), valid.flatten(0, 1), rgb.flatten(0, 1)
    B, K = x0.shape[:2]
    s = sample_s(B // frames, cfg, generator, x0.device).repeat_interleave(frames)  # one time per clip
    t = layer_times(s, K, cfg)  # (B,K)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = noisy_input(x0, valid, t, eps, cfg, generator)
    _, v_hat, valid_logits = predict(model, x_t, t, rgb, cfg, frames=frames)
    t5 = t[..., None, None, None]
    v = (x_t - x0) / t5.clamp(min=cfg.t_clamp) if cfg.prediction == "x0" else eps - x0
    mask = valid[:, :, None].float()  # (B,K,1,H,W)
    loss_flow = ((v_hat.float() - v) ** 2 * mask).sum() / (3 * mask.sum()).clamp(min=1)
    loss_valid = F.binary_cross_entropy_with_logits(valid_logits.float(), valid.float())
    loss = loss_flow + cfg.valid_weight * loss_valid
    return loss, {"loss_flow": loss_flow.detach(), "loss_valid": loss_valid.detach()}
