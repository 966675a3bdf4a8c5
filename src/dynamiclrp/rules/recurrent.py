"""Recurrent layers (LSTM, GRU, RNN) as fused autograd nodes."""

from __future__ import annotations

TABLE: dict = {}
