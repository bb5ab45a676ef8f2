"""Matplotlib, set up in one place: the Agg backend (files only, no display needed).

Matplotlib is imported on first use, never at import time: it costs ~0.4 s, and
`fedscore.data`, the samplers and every Flower ClientApp process (one per round) import
fedscore without drawing anything.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def pyplot():
    """`matplotlib.pyplot`, with the Agg backend selected the first time (every figure
    fedscore draws goes to a PNG file; a headless server or CI has no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(**kwargs: Any):
    """A matplotlib Figure with its own Agg canvas and no pyplot state (nothing to close,
    no global backend switch); kwargs go to `matplotlib.figure.Figure`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig
