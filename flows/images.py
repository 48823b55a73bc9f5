"""Images in Prefect artifacts: small inline PNGs (the UI renders ``data:`` images; they work offline);
the full-size files stay on disk and are named beside them."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from stamp.escaping import markdown_cell


def inline_png(path: str | Path, width: int = 360) -> str:
    """Markdown for a PNG shrunk to ``width`` px, inline as base64 (keeps artifacts small)."""
    from PIL import Image

    with Image.open(path) as opened:
        img = opened.convert("RGB")
    if img.width > width:
        img = img.resize((width, max(1, round(img.height * width / img.width))))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    data = base64.b64encode(buf.getvalue()).decode()
    return f"![{markdown_cell(Path(path).name)}](data:image/png;base64,{data})"
