"""Checkpoints: plain dicts of tensors and numbers, so ``torch.load(weights_only=True)`` reads them.

Contents: ``model`` and ``ema`` state dicts (the denoiser only: the frozen image encoder is not stored),
``optimizer`` state dict, ``step``, ``config`` (the model's WTDiTConfig as a dict), ``flow`` (FlowConfig as a
dict), ``norm`` (the Normalisation), ``encoder`` (``{"name", "file", "sha256"}`` of the encoder weights file
the run used; name ``none`` without an encoder), ``train`` (the run's settings, which ``--resume`` keeps) and
``data`` (the stream position's bookkeeping: undecodable samples met per rank and worker in the current
epoch). A checkpoint trained with an encoder loads only with a weights file of the same SHA-256.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from wt_model.encoder import EncoderError, file_sha256, load_encoder
from wt_model.flow import FlowConfig
from wt_model.models import WTDiT, WTDiTConfig


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit; the message is one line."""


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write atomically (temporary file then rename), so a run killed mid-write keeps the previous one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict, loaded safely on the CPU."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise CheckpointError(f"checkpoint {path}: cannot be read safely ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= ckpt.keys():
        raise CheckpointError(f"checkpoint {path}: not a wt-model checkpoint")
    return ckpt


def encoder_record(ckpt: dict) -> dict:
    """``{"name", "file", "sha256"}`` of the checkpoint's image encoder (name ``none`` without one)."""
    return ckpt.get("encoder") or {"name": ckpt["config"].get("encoder", "none"), "file": None, "sha256": None}


def check_encoder_weights(ckpt: dict, path: str | Path, weights: str | Path | None) -> None:
    """Refuse an encoder weights file other than the one the checkpoint was trained with (or none/one too many)."""
    rec = encoder_record(ckpt)
    if rec["name"] == "none":
        if weights is not None:
            raise CheckpointError(f"checkpoint {path}: trained without an image encoder, but encoder weights "
                                  f"{weights} were given")
        return
    if weights is None:
        raise CheckpointError(f"checkpoint {path}: trained with image encoder {rec['name']} ({rec['file']}); "
                              "pass its weights with --encoder-weights")
    if not Path(weights).is_file():
        raise CheckpointError(f"encoder weights {weights}: no such file")
    if rec["sha256"] is not None and file_sha256(weights) != rec["sha256"]:
        raise CheckpointError(f"checkpoint {path}: trained with encoder weights {rec['file']} (sha256 "
                              f"{rec['sha256'][:12]}...), but {weights} differs")


def load_model(path: str | Path, ema: bool = True, encoder_weights: str | Path | None = None,
               ckpt: dict | None = None) -> tuple[WTDiT, FlowConfig, dict]:
    """(model in eval mode with EMA weights unless ``ema`` is False, its FlowConfig, the raw checkpoint).
    ``encoder_weights``: the file of the encoder the checkpoint was trained with (checked by SHA-256)."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    check_encoder_weights(ckpt, path, encoder_weights)
    cfg = WTDiTConfig(**ckpt["config"])
    try:
        encoder = load_encoder(cfg.encoder, encoder_weights) if cfg.encoder != "none" else None
    except EncoderError as e:
        raise CheckpointError(str(e)) from None
    model = WTDiT(cfg, encoder)
    weights = ckpt["ema"] if ema and "ema" in ckpt else ckpt["model"]
    try:
        model.load_denoiser_state_dict(weights)
    except RuntimeError:
        raise CheckpointError(f"checkpoint {path}: weights do not match its own config") from None
    return model.eval(), FlowConfig(**ckpt.get("flow", {})), ckpt
