"""Network factories used by the bundle configs."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from monai.networks.nets import UNet

__all__ = ["SegAINet", "load_checkpoint"]


class SegAINet(UNet):
    """SegAI: a small 2D MONAI UNet that maps a normalised mammogram tile to MC logits.

    Input: ``(B, 1, H, W)`` float32 (H, W multiples of 2**(len(channels)-1)).
    Output: ``(B, 1, H, W)`` logits; apply a sigmoid for the MC probability.

    Args:
        channels: feature channels per level.
        strides: down-sampling strides between levels.
        num_res_units: residual units per block.
        dropout: dropout probability.
        prior: initial MC probability of every pixel. The bias of the last convolution starts
            at ``log(prior / (1 - prior))`` (the focal-loss "prior" initialisation): with
            instance normalisation in front of it, that bias alone sets the output level, and
            starting at 0.5 costs thousands of steps before the background turns negative.
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        num_res_units: int = 1,
        dropout: float = 0.0,
        prior: float = 0.01,
    ) -> None:
        super().__init__(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
            dropout=dropout,
        )
        if not 0.0 < prior < 1.0:
            raise ValueError(f"prior must be in (0, 1), got {prior}")
        last = [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.out_channels == 1][-1]
        if last.bias is not None:
            nn.init.constant_(last.bias, math.log(prior / (1.0 - prior)))


def load_checkpoint(network: torch.nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load weights into ``network`` with a clear error when the file is missing or does not fit.

    Accepts a plain state dict or a MONAI ``CheckpointSaver`` file holding ``{"network": ...}``.

    Args:
        network: the module to fill.
        path: checkpoint file.
        device: where to map the tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint not found; train it with the train config or pass --ckpt_path")
    state = torch.load(p, map_location=device, weights_only=True)
    if isinstance(state, Mapping) and "network" in state and isinstance(state["network"], Mapping):
        state = state["network"]
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise RuntimeError(f"{p}: weights do not fit the network in the config: {e}") from e
    return network.to(device).eval()
