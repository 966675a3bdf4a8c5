"""Sequence-model ops: state-space scans, mixture-of-experts routing and grouped products."""

from __future__ import annotations

TABLE: dict = {}
