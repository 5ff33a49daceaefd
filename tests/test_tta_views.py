"""The test-time views are the eight symmetries of the square, and the config knows each by name."""

import torch

from kit.config import TTA_VIEWS
from kit.infer.timm_predict import VIEWS


def test_views_are_the_dihedral_group():
    assert tuple(VIEWS) == TTA_VIEWS
    x = torch.arange(2 * 3 * 4 * 4).view(2, 3, 4, 4)
    seen = {tuple(VIEWS[name](x).flatten().tolist()) for name in VIEWS}
    assert len(seen) == 8  # eight different images of one square
    for name, view in VIEWS.items():  # each a symmetry: same pixels, rearranged within each image
        y = view(x)
        assert y.shape == x.shape and torch.equal(y.flatten(1).sort(1).values, x.flatten(1).sort(1).values), name
    assert torch.equal(VIEWS["rot90"](VIEWS["rot270"](x)), x)
    assert torch.equal(VIEWS["transpose"](VIEWS["transpose"](x)), x)
