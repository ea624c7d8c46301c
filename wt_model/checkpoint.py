"""Checkpoints: plain dicts of tensors and numbers, so ``torch.load(weights_only=True)`` reads them.

Contents: ``model`` and ``ema`` state dicts, ``optimizer`` state dict, ``step``, ``config`` (the model's
WTDiTConfig as a dict), ``flow`` (FlowConfig as a dict) and ``train`` (the data-order settings: seed,
batch size, workers, world size, epoch length).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

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


def check_preset(ckpt: dict, path: str | Path, preset: str) -> None:
    """Refuse a checkpoint of another architecture than ``preset``."""
    if ckpt["config"].get("preset") != preset:
        raise CheckpointError(f"checkpoint {path}: preset {ckpt['config'].get('preset')!r}, "
                              f"but this run uses preset {preset!r}")


def load_model(path: str | Path, ema: bool = True) -> tuple[WTDiT, FlowConfig, dict]:
    """(model in eval mode with EMA weights unless ``ema`` is False, its FlowConfig, the raw checkpoint)."""
    ckpt = read_checkpoint(path)
    model = WTDiT(WTDiTConfig(**ckpt["config"]))
    weights = ckpt["ema"] if ema and "ema" in ckpt else ckpt["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        raise CheckpointError(f"checkpoint {path}: weights do not match its own config") from None
    return model.eval(), FlowConfig(**ckpt.get("flow", {})), ckpt
