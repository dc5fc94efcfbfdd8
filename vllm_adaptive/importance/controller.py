"""ADORE's controller: a small GRU that scores every token as it is computed.

The paper's formula (ADORE, ACL Findings 2024, section 3)::

    z_i     = GRU(x_i, z_{i-1})
    sigma_i = sigmoid(MLP(p_i + z_i))

Choices the paper leaves open, and ours:

* ``x_i``, the token's representation: the **value vectors** of one decoder
  layer (``layer``, all KV heads concatenated), standardised with the
  training set's mean and std. Values carry no rotary position (keys do),
  they are what the attention impl receives anyway (no model hook), and the
  same rows exist on every tensor-parallel rank once gathered.
* ``p_i``: a fixed sinusoidal embedding of the absolute position, in the
  GRU's width, scaled by ``log2`` spacing so that 8K positions stay distinct.
* Widths: GRU state 32, MLP 32 -> 32 -> 1 (about 25K parameters, 100 KB).
* The state runs across the whole sequence of a request (chunked prefill
  continues it) and restarts when the request starts again from position 0
  (new, or preempted and recomputed).

Training (``importance/train.py``) and the file format live next door; the
file shipped for the embedded model is ``controller_smollm2.pt``.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
from torch import nn

from vllm_adaptive.errors import config_error

SHIPPED = Path(__file__).with_name("controller_smollm2.pt")


def position_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[T] int -> [T, dim] float32 sinusoids (periods 2 .. ~2^16 tokens)."""
    half = dim // 2
    freqs = torch.exp(-math.log(2.0) * torch.arange(half, dtype=torch.float32) * (16.0 / half))
    ang = positions.float()[:, None] * freqs[None, :] * math.pi
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


class Controller(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.in_dim, self.hidden = in_dim, hidden
        self.gru = nn.GRU(in_dim, hidden, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.layer = 0

    def logits(self, x: torch.Tensor, positions: torch.Tensor, h0: torch.Tensor | None = None):
        """x [B, T, in_dim], positions [B, T] -> (logits [B, T], last state [1, B, hidden])."""
        x = (x.float() - self.mean) / self.std
        z, h = self.gru(x, h0)
        p = position_embedding(positions.reshape(-1), self.hidden).reshape(*positions.shape, self.hidden)
        return self.mlp(z + p).squeeze(-1), h

    @torch.no_grad()
    def step(self, x: torch.Tensor, positions: torch.Tensor, h0: torch.Tensor | None):
        """One request's new tokens: x [T, in_dim], positions [T] -> (sigma [T], state)."""
        logits, h = self.logits(x[None], positions[None], h0)
        return torch.sigmoid(logits[0]), h

    def save(self, path: Path, **info) -> None:
        torch.save({"state_dict": self.state_dict(), "in_dim": self.in_dim, "hidden": self.hidden,
                    "layer": self.layer, "info": info}, path)


@functools.lru_cache(maxsize=4)
def load_controller(path: str | None) -> Controller:
    """The controller in ``path`` (None: the shipped one). Errors name
    ``release.controller``."""
    p = SHIPPED if path is None else Path(path)
    if not p.is_file():
        what = "the shipped controller (reinstall the package or run vllm-adaptive train-controller)" \
            if path is None else "an existing controller file"
        raise config_error("release.controller", what, str(p))
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
        ctl = Controller(blob["in_dim"], blob["hidden"])
        ctl.load_state_dict(blob["state_dict"])
        ctl.layer = int(blob["layer"])
    except Exception as e:  # a wrong or damaged file
        raise config_error("release.controller", "a controller file written by train-controller",
                           f"{p} ({type(e).__name__}: {e})") from e
    ctl.eval()
    ctl.info = blob.get("info", {})
    return ctl


def check_controller_fits(ctl: Controller, num_layers: int, num_kv_heads: int, head_size: int) -> None:
    """The controller reads layer ``ctl.layer``'s values: the model must have them."""
    want = num_kv_heads * head_size
    if ctl.layer >= num_layers or ctl.in_dim != want:
        raise config_error(
            "release.controller",
            f"a controller for this model (values of a layer < {num_layers}, "
            f"{num_kv_heads} KV heads x {head_size} = {want} inputs)",
            f"one trained on layer {ctl.layer} with {ctl.in_dim} inputs",
        )
