"""Plots render Chinese: the CJK font that scripts/setup.sh installs is found (even when matplotlib's font cache
predates it) and a Chinese label is drawn with no missing glyph."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from ecomray.plots import cjk_font, pyplot


def test_a_chinese_label_renders_with_every_glyph(tmp_path: Path) -> None:
    if cjk_font() is None:
        pytest.skip("no CJK font on this machine: scripts/setup.sh installs fonts-wqy-microhei when run as root")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.set_title("洗发水 差评 假货")
    ax.bar(["书籍", "平板", "热水器"], [1, 2, 3])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(tmp_path / "zh.png")
    plt.close(fig)
    missing = [str(w.message) for w in caught if "missing from" in str(w.message) or "Glyph" in str(w.message)]
    assert not missing, missing
    assert (tmp_path / "zh.png").stat().st_size > 1000
