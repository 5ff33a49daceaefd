"""Contact sheets: a grid of images, each with a caption, written as one PNG.

    write_sheet(path, "suspect labels", [Tile("a.jpg", "given: cat\nsuggested: dog")], columns=6)

Tiles are laid out row by row, so pairs meant to be seen side by side go next to each other with an
even number of columns. Captions use any installed font that has the class names' script (CJK fonts
when present) and fall back to boxes, never to a warning per missing glyph.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kit.images import load_image
from kit.io import atomic_path

TILE_PX = 160  # thumbnails are shrunk to this before drawing: a sheet stays a few hundred kilobytes
CAPTION_CHARS = 28
_SCRIPT_FONTS = ("Noto Sans CJK", "Noto Sans KR", "NanumGothic", "Malgun Gothic", "AppleGothic", "Droid Sans Fallback")


@dataclass
class Tile:
    path: str | Path | None  # None: an empty cell (keeps a row of pairs aligned)
    caption: str = ""


def _fonts() -> list[str]:
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    script = [name for name in installed if name.startswith(_SCRIPT_FONTS)]
    return ["DejaVu Sans", *sorted(script)]


def _thumbnail(path: str | Path) -> np.ndarray:
    image = load_image(path)
    image.thumbnail((TILE_PX, TILE_PX))
    return np.asarray(image)


def _short(caption: str) -> str:
    return "\n".join(
        line if len(line) <= CAPTION_CHARS else line[: CAPTION_CHARS - 1] + "…" for line in caption.split("\n")
    )


def write_sheet(path: Path, title: str, tiles: Sequence[Tile], columns: int) -> None:
    """One PNG of the tiles (at most a few dozen) in `columns` columns; a sheet without tiles says so."""
    import matplotlib
    from matplotlib.figure import Figure

    rows = max(1, -(-len(tiles) // columns))
    lines = max((t.caption.count("\n") + 1 for t in tiles), default=1)
    with matplotlib.rc_context({"font.family": _fonts()}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
        fig = Figure(figsize=(1.9 * columns, (1.9 + 0.17 * lines) * rows + 0.5))
        axes = fig.subplots(rows, columns, squeeze=False)
        for ax in axes.ravel():
            ax.set_axis_off()
        for ax, tile in zip(axes.ravel(), tiles, strict=False):
            if tile.path is not None:
                ax.imshow(_thumbnail(tile.path))
                ax.set_title(_short(tile.caption), fontsize=7)
        if not tiles:
            axes[0, 0].text(0, 0.5, "none found", fontsize=12)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
