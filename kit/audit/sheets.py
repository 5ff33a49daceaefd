"""Contact sheets: a grid of images, each with a caption, written as one PNG.

    write_sheet(path, "suspect labels", [Tile("a.jpg", "given: cat\nsuggested: dog")], columns=6)

Tiles are laid out row by row, so pairs meant to be seen side by side go next to each other with an
even number of columns. The thumbnails are pasted into one picture and the captions drawn over it in a
single matplotlib axes (a subplot per tile took seconds per sheet). Captions use any installed font that
has the class names' script (CJK fonts when present) and fall back to boxes, never to a warning per
missing glyph.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from kit.images import load_image
from kit.io import atomic_path

TILE_PX = 160  # thumbnails are shrunk to this: a sheet stays a few hundred kilobytes
PAD_PX = 8
LINE_PX = 12  # one caption line at FONT_PT and DPI
FONT_PT = 7
DPI = 100  # with figsize in pixels / DPI, one mosaic pixel is one PNG pixel
TITLE_PX = 30
CAPTION_CHARS = 30
_SCRIPT_FONTS = ("Noto Sans CJK", "Noto Sans KR", "NanumGothic", "Malgun Gothic", "AppleGothic", "Droid Sans Fallback")


@dataclass
class Tile:
    path: str | Path | None  # None: an empty cell (keeps a row of pairs aligned)
    caption: str = ""


def _fonts() -> list[str]:
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return ["DejaVu Sans", *sorted(name for name in installed if name.startswith(_SCRIPT_FONTS))]


def _short(caption: str) -> str:
    return "\n".join(
        line if len(line) <= CAPTION_CHARS else line[: CAPTION_CHARS - 1] + "…" for line in caption.split("\n")
    )


def _mosaic(tiles: Sequence[Tile], columns: int, caption_px: int) -> tuple[Image.Image, list[tuple[int, int]]]:
    """White canvas with every thumbnail pasted in; returns it and each tile's caption anchor (x, y)."""
    rows = max(1, -(-len(tiles) // columns))
    cell_w, cell_h = TILE_PX + PAD_PX, TILE_PX + caption_px + PAD_PX
    canvas = Image.new("RGB", (columns * cell_w + PAD_PX, TITLE_PX + rows * cell_h), "white")
    anchors = []
    for n, tile in enumerate(tiles):
        x, y = PAD_PX + (n % columns) * cell_w, TITLE_PX + (n // columns) * cell_h
        anchors.append((x, y + TILE_PX + 2))
        if tile.path is not None:
            image = ImageOps.contain(load_image(tile.path), (TILE_PX, TILE_PX))  # small images scaled up too
            canvas.paste(image, (x + (TILE_PX - image.width) // 2, y + (TILE_PX - image.height) // 2))
    return canvas, anchors


def write_sheet(path: Path, title: str, tiles: Sequence[Tile], columns: int) -> None:
    """One PNG of the tiles (a few dozen) in `columns` columns; a sheet without tiles says so."""
    import matplotlib
    from matplotlib.figure import Figure

    lines = max((t.caption.count("\n") + 1 for t in tiles), default=1)
    canvas, anchors = _mosaic(tiles, columns, lines * LINE_PX + 4)
    with matplotlib.rc_context({"font.family": _fonts()}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
        fig = Figure(figsize=(canvas.width / DPI, canvas.height / DPI), dpi=DPI)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.imshow(np.asarray(canvas), interpolation="nearest")
        ax.set_axis_off()
        ax.text(PAD_PX, TITLE_PX / 2, title, fontsize=9, va="center")
        for (x, y), tile in zip(anchors, tiles, strict=True):
            if tile.path is not None and tile.caption:
                ax.text(x, y, _short(tile.caption), fontsize=FONT_PT, va="top", linespacing=1.1)
        if not tiles:
            ax.text(PAD_PX, TITLE_PX + TILE_PX / 2, "none found", fontsize=12)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
