"""Matplotlib, set up once for every plot the project writes (sweep curves, opinion reports, run reports): the Agg
backend, and a font that has Chinese glyphs when the machine has one, so category names and review terms render as
text rather than empty boxes.

A CJK font comes from the system (`scripts/setup.sh` installs Debian's fonts-wqy-microhei when it runs as root),
found even when matplotlib's font cache predates it. When there is none, one warning says how to get one, and the
plots still render (Latin text is unaffected).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

CJK_FAMILIES = ("WenQuanYi", "Noto Sans CJK", "Noto Serif CJK", "Source Han", "SimHei", "Heiti", "PingFang",
                "Microsoft YaHei", "AR PL", "Droid Sans Fallback")


@functools.lru_cache(maxsize=1)
def cjk_font() -> str | None:
    """The family name of an installed font with Chinese glyphs, or None."""
    from matplotlib import font_manager

    def known() -> str | None:
        for f in font_manager.fontManager.ttflist:
            if any(k in f.name for k in CJK_FAMILIES):
                return f.name
        return None

    name = known()
    if name is None:       # installed after matplotlib built its cache: register the system's CJK fonts now
        for path in font_manager.findSystemFonts():
            if any(k.lower().replace(" ", "") in path.lower().replace("-", "").replace("_", "")
                   for k in ("wqy", "notosanscjk", "notoserifcjk", "sourcehan", "simhei", "droidsansfallback")):
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    continue
        name = known()
    return name


@functools.lru_cache(maxsize=1)
def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, with a CJK font first in the sans-serif list when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    font = cjk_font()
    if font:
        plt.rcParams["font.sans-serif"] = [font, *plt.rcParams["font.sans-serif"]]
        plt.rcParams["font.family"] = "sans-serif"
        plt.rcParams["axes.unicode_minus"] = False
    else:
        warnings.warn("no font with Chinese glyphs found: Chinese text in plots will show as boxes. Install one "
                      "(Debian: apt-get install fonts-wqy-microhei; scripts/setup.sh does when run as root).",
                      stacklevel=2)
    return plt
