"""Typesetting on a grid of monospace cells for matplotlib figures, with CJK font fallback.

`erm.show` draws its PNG views with it: text is laid out in columns (`cells`: a wide (CJK)
character takes two, a combining mark none), wrapped to a width (`wrap_cells`, `wrap_segments`)
and drawn glyph run by glyph run (`glyph_runs`) with the first font of a chain that has the glyph:
monospace, then the installed CJK fonts (`cjk_fonts`: Noto Sans CJK, WenQuanYi, Droid Sans
Fallback, ... whichever is there), then DejaVu Sans; a character no font has is drawn as
`REPLACEMENT` (□). `Typesetter` measures the cell width and line height with the Agg renderer and
shrinks a glyph wider than its cells, so nothing drawn overlaps. matplotlib is imported on first
use.
"""
import functools
import re
import unicodedata
from typing import List, Optional, Sequence, Tuple

#: Font families with CJK glyphs, most preferred first: the installed ones serve as fallbacks
#: for characters the monospace font lacks (any other installed font that has CJK glyphs is
#: found by its character map).
CJK_FAMILIES = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR",
                "Noto Sans Mono CJK SC", "Noto Sans SC", "Noto Sans JP", "Source Han Sans SC",
                "Source Han Sans", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
                "Droid Sans Fallback", "Sarasa Gothic SC", "IPAexGothic", "IPAGothic",
                "TakaoGothic", "Unifont")
_CJK_PROBE = "中文字日本語"
#: Drawn, in the monospace font, for a character no available font has.
REPLACEMENT = "\u25a1"


@functools.lru_cache(maxsize=None)
def _charmap(path: str) -> frozenset:
    from matplotlib.ft2font import FT2Font
    try:
        return frozenset(FT2Font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


@functools.lru_cache(maxsize=None)
def cjk_fonts() -> Tuple[str, ...]:
    """Paths of installed fonts with CJK glyphs: the known CJK families first, then any other
    font covering the probe characters; at most 3. Empty when none is installed. Fonts that
    matplotlib's cached font list predates (installed after it was built) are looked for too."""
    from matplotlib import font_manager as fm
    found = _cjk_fonts_known()
    if not found:
        known = {e.fname for e in fm.fontManager.ttflist}
        new = [p for p in fm.findSystemFonts() if p not in known]
        for path in new:
            try:
                fm.fontManager.addfont(path)
            except (OSError, RuntimeError, ValueError):
                continue
        found = _cjk_fonts_known() if new else ()
    return found


def _cjk_fonts_known() -> Tuple[str, ...]:
    """`cjk_fonts` among the fonts matplotlib's font manager lists."""
    from matplotlib import font_manager as fm
    rank = {name.lower(): i for i, name in enumerate(CJK_FAMILIES)}
    entries = sorted(fm.fontManager.ttflist,
                     key=lambda e: (rank.get(e.name.lower(), len(rank)), e.style != "normal",
                                    str(e.weight) not in ("400", "normal", "regular")))
    found: List[str] = []
    for k, e in enumerate(entries):
        if len(found) == 3 or (k >= 400 and found):
            break
        if "last resort" in e.name.lower():  # placeholder boxes, not glyphs
            continue
        if e.fname not in found and all(ord(c) in _charmap(e.fname) for c in _CJK_PROBE):
            found.append(e.fname)
    return tuple(found)


def _font_chain() -> Tuple[str, ...]:
    """Font files tried in order for each character: monospace, CJK fonts, DejaVu Sans."""
    from matplotlib import font_manager as fm
    from matplotlib.font_manager import FontProperties
    mono = fm.findfont(FontProperties(family="monospace"))
    sans = fm.findfont(FontProperties(family="DejaVu Sans"))
    return tuple(dict.fromkeys((mono,) + cjk_fonts() + (sans,)))


def cells(ch: str) -> int:
    """Columns a character takes on the grid: 2 for East Asian wide/fullwidth, 0 for combining
    marks and format characters, else 1."""
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf", "Cc"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def text_cells(text: str) -> int:
    """Columns `text` takes on the grid (see `cells`)."""
    return sum(cells(c) for c in text)


def glyph_runs(text: str, chain: Sequence[str]) -> List[Tuple[int, str, int, int]]:
    """Split `text` into runs drawn with one font each -> [(column, text, font index in
    `chain`, columns)]. Consecutive one-column characters of the first (monospace) font form
    one run; every other character is a run of its own, so it can be centred in its cells. A
    character no font in `chain` has becomes `REPLACEMENT`; zero-width ones are dropped."""
    maps = [_charmap(p) for p in chain]
    runs: List[Tuple[int, str, int, int]] = []
    col = 0
    for ch in text:
        w = cells(ch)
        if w == 0:
            continue
        font = next((i for i, m in enumerate(maps) if ord(ch) in m), None)
        if font is None:
            ch, font = REPLACEMENT, 0
        if font == 0 and w == 1 and runs and runs[-1][2] == 0 and runs[-1][3] == len(runs[-1][1]):
            c0, t, _, n = runs[-1]
            runs[-1] = (c0, t + ch, 0, n + 1)
        else:
            runs.append((col, ch, font, w))
        col += w
    return runs


def wrap_cells(text: str, width: int, indent: int = 0) -> List[str]:
    """Greedy wrap to `width` columns (wide characters count 2): at spaces when a word fits,
    anywhere otherwise (CJK text has no spaces); continuation lines get `indent` spaces."""
    lines: List[str] = []
    for para in text.splitlines() or [""]:
        line, used = "", 0
        for word in re.findall(r"\s+|\S+", para):
            w = text_cells(word)
            if used + w <= width:
                line, used = line + word, used + w
                continue
            if word.isspace():
                lines.append(line)
                line, used = " " * indent, indent
                continue
            if w <= width - indent and line.strip():
                lines.append(line)
                line, used = " " * indent, indent
            for ch in word:
                c = cells(ch)
                if used + c > width and line.strip():
                    lines.append(line)
                    line, used = " " * indent, indent
                line, used = line + ch, used + c
        lines.append(line)
    return lines


def wrap_segments(pieces, width: int):
    """Lay (text, idx, special) pieces out on lines of `width` columns -> [(line, col, text, idx,
    special)] (columns counted with `cells`); newlines break lines, long pieces are split."""
    out, line, col = [], 0, 0
    for text, j, special in pieces:
        for pi, part in enumerate(text.replace("\t", "    ").split("\n")):
            if pi > 0:
                line, col = line + 1, 0
            if col > 0 and col + text_cells(part) > width >= text_cells(part):
                line, col = line + 1, 0  # a piece that fits on a line is not split
            chunk, used = "", 0
            for ch in part:
                c = cells(ch)
                if col + used + c > width and (chunk or col > 0):
                    if chunk:
                        out.append((line, col, chunk, j, special))
                    line, col, chunk, used = line + 1, 0, "", 0
                chunk, used = chunk + ch, used + c
            if chunk:
                out.append((line, col, chunk, j, special))
                col += used
    return out, line + 1


class Typesetter:
    """Draws text on a grid of monospace cells with per-glyph font fallback (`glyph_runs`); the
    cell width, line height and any glyph wider than its cells are measured with the Agg
    renderer, so nothing drawn overlaps its neighbours.

    Attributes:
        chain: the font files tried for each character (monospace, CJK fonts, DejaVu Sans).
        cw, lh: inches per column and per line at `fontsize` points and `dpi`.
    """

    def __init__(self, fontsize: float, dpi: int):
        from matplotlib.backends.backend_agg import RendererAgg
        self.chain, self.fontsize, self.dpi = _font_chain(), fontsize, dpi
        self._renderer = RendererAgg(100, 100, dpi)
        self.cw = self.extent("0" * 40, 0, fontsize)[0] / 40 / dpi  # inches per column
        heights = [self.extent("Ág" if i == 0 else self._probe(i), i, fontsize)[1]
                   for i in range(len(self.chain))]
        self.lh = max(1.75 * fontsize / 72, 1.3 * max(heights) / dpi)  # inches per line
        self._sizes: dict = {}

    def _probe(self, font: int) -> str:
        m = _charmap(self.chain[font])
        return next((c for c in _CJK_PROBE + "Ag" if ord(c) in m), "A")

    def props(self, font: int, size: float, style="normal", weight="normal"):
        """FontProperties of font `font` of the chain (the first one by family, so that bold and
        italic faces are found)."""
        from matplotlib.font_manager import FontProperties
        if font == 0:
            return FontProperties(family="monospace", size=size, style=style, weight=weight)
        return FontProperties(fname=self.chain[font], size=size)

    def extent(self, text: str, font: int, size: float) -> Tuple[float, float]:
        """(width, height) in pixels of `text` drawn with font `font` of the chain at `size`
        points, as the Agg renderer measures it."""
        w, h, _ = self._renderer.get_text_width_height_descent(text, self.props(font, size),
                                                               ismath=False)
        return w, h

    def _fit(self, ch: str, font: int, n: int, size: float) -> float:
        """The font size at which glyph `ch` fits in `n` cells (at most `size`)."""
        key = (ch, font, n, size)
        if key not in self._sizes:
            w = self.extent(ch, font, size)[0]
            room = 0.96 * n * self.cw * self.dpi
            self._sizes[key] = size if w <= room else size * room / w
        return self._sizes[key]

    def draw(self, ax, col: float, y: float, text: str, *, size: Optional[float] = None,
             color="#000000", style="normal", weight="normal") -> None:
        """Draw `text` from column `col` on line `y` (data coordinates: one unit per cell and
        per line)."""
        size = size or self.fontsize
        for c0, run, font, n in glyph_runs(text, self.chain):
            if font == 0 and n == len(run):
                ax.text(col + c0, y, run, fontproperties=self.props(0, size, style, weight),
                        color=color, va="center", ha="left", parse_math=False)
            else:
                ax.text(col + c0 + n / 2, y, run, color=color, va="center", ha="center",
                        fontproperties=self.props(font, self._fit(run, font, n, size), style,
                                                  weight), parse_math=False)
