"""The training objective and the time schedule shared by the trainer and the sampler.

Rectified flow in the normalised pointmap space: x_t = (1 - t) x0 + t eps, eps ~ N(0, I), t = 1 pure noise.
The velocity is v = dx_t/dt = eps - x0. By default the network predicts the clean layers x0 and the loss is
taken on velocity (JiT): v_hat = (x_t - x0_hat) / max(t, t_clamp), compared with v computed with the same
clamp, so the loss is an x0 loss weighted by 1 / max(t, t_clamp)^2. Predicting v directly is the option
``prediction="velocity"``.

Times. One global time s per sample walks from 1 to 0 during sampling; each layer k runs on its own clock
t_k = s ** gamma_k with gamma_0 = ``layer0_gamma`` > 1 and gamma_k = 1 for the hidden layers. So layer 0
is always less noisy than the hidden layers at the same s (it resolves first and the hidden layers are
generated behind it), yet every layer starts at pure noise (s = 1) and ends clean (s = 0), and training
and sampling use the same map. Training draws s per sample from a mixture: with probability ``p_uniform``
uniform on [0, 1], otherwise logit-normal(``logit_mean``, ``logit_std``), whose negative mean favours low
noise. Default (0.3, -0.4, 1.0, gamma 1.5): the logit-normal part spends most samples at low and mid noise,
where the visible surface's detail is decided; the uniform part keeps the high-noise end trained, where the
hidden layers are generated from nothing and the sampler's first steps run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FlowConfig:
    prediction: str = "x0"  # "x0" (the network predicts clean layers) or "velocity"
    p_uniform: float = 0.3
    logit_mean: float = -0.4
    logit_std: float = 1.0
    layer0_gamma: float = 1.5
    t_clamp: float = 0.05
    valid_weight: float = 1.0  # weight of the validity BCE next to the velocity loss

    def __post_init__(self) -> None:
        if self.prediction not in ("x0", "velocity"):
            raise ValueError(f"flow: prediction must be 'x0' or 'velocity', got {self.prediction!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def sample_s(batch: int, cfg: FlowConfig, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Global times (B,) from the uniform / logit-normal mixture."""
    u = torch.rand(batch, generator=generator)
    ln = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(batch, generator=generator))
    use_uniform = torch.rand(batch, generator=generator) < cfg.p_uniform
    return torch.where(use_uniform, u, ln).to(device)


def layer_times(s: torch.Tensor, num_layers: int, cfg: FlowConfig) -> torch.Tensor:
    """Global times (B,) -> per-layer times (B,K): layer 0 on s ** layer0_gamma, hidden layers on s."""
    gamma = torch.ones(num_layers, device=s.device)
    gamma[0] = cfg.layer0_gamma
    return s[:, None] ** gamma  # (B,K)


def predict(model, x_t: torch.Tensor, t: torch.Tensor, rgb: torch.Tensor, cfg: FlowConfig):
    """Run the network; return (x0_hat, v_hat, valid_logits) whichever quantity it predicts.
    x_t (B,K,3,H,W), t (B,K), rgb (B,3,H,W)."""
    out, valid_logits = model(x_t, t, rgb)
    tc = t.clamp(min=cfg.t_clamp)[..., None, None, None]  # (B,K,1,1,1)
    if cfg.prediction == "x0":
        return out, (x_t - out) / tc, valid_logits
    return x_t - t[..., None, None, None] * out, out, valid_logits


def flow_loss(model, batch: dict, cfg: FlowConfig, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """The training loss of one batch (tensors on the model's device); returns (loss, parts for logging).

    Velocity MSE over valid entries only (missing layers hold fills, not targets) plus the validity BCE over
    every layer and pixel."""
    x0, valid, rgb = batch["points"], batch["valid"], batch["rgb"]  # (B,K,3,H,W), (B,K,H,W), (B,3,H,W)
    B, K = x0.shape[:2]
    t = layer_times(sample_s(B, cfg, generator, x0.device), K, cfg)  # (B,K)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    t5 = t[..., None, None, None]
    x_t = (1 - t5) * x0 + t5 * eps
    _, v_hat, valid_logits = predict(model, x_t, t, rgb, cfg)
    v = (x_t - x0) / t5.clamp(min=cfg.t_clamp) if cfg.prediction == "x0" else eps - x0
    mask = valid[:, :, None].float()  # (B,K,1,H,W)
    loss_flow = ((v_hat.float() - v) ** 2 * mask).sum() / (3 * mask.sum()).clamp(min=1)
    loss_valid = F.binary_cross_entropy_with_logits(valid_logits.float(), valid.float())
    loss = loss_flow + cfg.valid_weight * loss_valid
    return loss, {"loss_flow": loss_flow.detach(), "loss_valid": loss_valid.detach()}
