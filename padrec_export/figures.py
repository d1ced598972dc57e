"""Plots written as small PNGs."""
from __future__ import annotations

import io
from pathlib import Path


def save_png(fig, path: Path | str, dpi: int = 120) -> None:
    """Write a matplotlib figure as a 256-colour PNG: a plot's few colours read the same, and the file is about a
    third of matplotlib's own (the tracked results must leave a GPU call room for a wheel part beside them)."""
    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    image = Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    image.save(path, format="PNG", optimize=True)
