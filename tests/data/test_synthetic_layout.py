"""Synthetic layouts: `fixed` keeps every word at one place (learnable from scratch), `random` moves them."""
import random

import pytest

from piip_llava.data.synthetic import sample_scene


def _boxes(layout, n=20):
    rng = random.Random(0)
    return [{w.role: w.box for w in sample_scene(rng, 128, layout).words} for _ in range(n)]


def test_fixed_layout_centres_words_at_constant_rows():
    scenes = _boxes("fixed")
    for role in ("large", "top", "bottom"):
        centres_x = {round((b[role][0] + b[role][2]) / 2) for b in scenes}
        tops = {b[role][1] for b in scenes}
        assert max(centres_x) - min(centres_x) <= 2, role  # all 3-letter words centred
        assert len(tops) <= 2, role
    assert all(b["top"][1] < b["large"][1] < b["bottom"][1] for b in scenes)


def test_random_layout_moves_words_and_bad_layout_is_an_error():
    scenes = _boxes("random")
    assert len({b["large"][:2] for b in scenes}) > 10
    assert len({b["top"][0] for b in scenes}) > 5
    with pytest.raises(ValueError, match="layout must be"):
        sample_scene(random.Random(0), 128, "diagonal")
