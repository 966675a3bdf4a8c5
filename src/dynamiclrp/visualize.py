"""Compatibility module: the heatmap and PNG writer now live in :mod:`dynamiclrp.viz`.

``from dynamiclrp.visualize import heatmap, save_png`` keeps working; new code should import from
``dynamiclrp.viz``, which also has overlays, grids, token HTML and terminal output.
"""

from __future__ import annotations

from .viz import heatmap, save_png

__all__ = ["heatmap", "save_png"]
