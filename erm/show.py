"""Token-level views of the endogenous reward: a response coloured token by token.

    erm.show.show(rm, "What is 2+2?", "2+2 is 4.", "tokens.html")   # or tokens.png

Colours come from a diverging red–white–blue map centred at 0 (red: negative reward, blue:
positive), symmetric in ±vmax (default: the largest |reward|, or its 95th percentile for
responses of 20 tokens or more; rewards beyond are clipped). The sentence rewards are listed
under the response. HTML output is one self-contained file (inline CSS, no scripts) with a
tooltip per token (reward, log-prob, soft value); PNG output is rendered by matplotlib (Agg)
in a monospace font, with wrapped lines and a colour bar.
"""
import html
import math
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .lm import render_text as render_conversation

#: ColorBrewer RdBu (5 classes), from the most negative to the most positive.
_ANCHORS = ((0.792, 0.000, 0.125), (0.957, 0.647, 0.510), (0.969, 0.969, 0.969),
            (0.573, 0.773, 0.871), (0.020, 0.443, 0.690))


def color(x: float, vmax: float) -> Tuple[float, float, float]:
    """RGB in [0, 1] of value `x` on the diverging map over [−vmax, vmax] (0 is light grey)."""
    if not math.isfinite(x):
        return (0.85, 0.85, 0.85)
    u = 0.5 + 0.5 * max(-1.0, min(1.0, x / vmax))
    pos = u * (len(_ANCHORS) - 1)
    k = min(int(pos), len(_ANCHORS) - 2)
    f = pos - k
    a, b = _ANCHORS[k], _ANCHORS[k + 1]
    return tuple(a[i] + f * (b[i] - a[i]) for i in range(3))


def _hex(rgb) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgb)


def _ink(rgb) -> str:
    """Black or white text, whichever reads better on background `rgb`."""
    lum = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    return "#000000" if lum > 0.5 else "#ffffff"


def auto_vmax(rewards: Sequence[float]) -> float:
    """Colour scale: max |reward| (95th percentile of |reward| from 20 tokens on), at least 1e-6."""
    vals = sorted(abs(r) for r in rewards if math.isfinite(r))
    if not vals:
        return 1.0
    v = vals[-1] if len(vals) < 20 else vals[min(len(vals) - 1, int(0.95 * len(vals)))]
    return max(v, 1e-6)


def segments(response: str, offsets, tokens) -> List[Tuple[str, Optional[int], bool]]:
    """Split `response` into (text, token index or None, special) pieces following the token
    offsets. Characters covered by no token get index None; a token with an empty span (e.g. an
    end-of-turn token) becomes a `special` piece showing the token's own text."""
    out, cursor = [], 0
    for j, (s, e) in enumerate(offsets):
        s, e = int(s), int(e)
        s = max(s, cursor)
        if e <= s:
            if int(offsets[j][1]) <= int(offsets[j][0]):  # genuinely empty span: show the token
                out.append((str(tokens[j]), j, True))
            continue
        if s > cursor:
            out.append((response[cursor:s], None, False))
        out.append((response[s:e], j, False))
        cursor = e
    if cursor < len(response):
        out.append((response[cursor:], None, False))
    return out


def _floats(t) -> List[float]:
    return [float(x) for x in (t.tolist() if hasattr(t, "tolist") else t)]


def _model_name(rm) -> str:
    cfg = getattr(getattr(rm, "model", None), "config", None)
    name = str(getattr(rm, "name_or_path", None) or getattr(cfg, "_name_or_path", "") or "")
    return Path(name).name if name.startswith(("/", ".", "~")) else name


def render_html(prompt, response: str, token_rewards, sentences, *, vmax: Optional[float] = None,
                model_name: str = "") -> str:
    """A self-contained HTML page: the prompt, the response coloured by token reward (hover a
    token for its reward, log-prob and soft value), a colour legend and the sentence rewards."""
    tr = token_rewards
    rewards, logprobs = _floats(tr.rewards), _floats(tr.logprobs)
    values = _floats(tr.values) if getattr(tr, "values", None) is not None \
        else [math.nan] * len(rewards)
    vmax = vmax or auto_vmax(rewards)
    esc = html.escape
    spans = []
    for text, j, special in segments(response, tr.offsets, tr.tokens):
        if j is None:
            spans.append(esc(text))
            continue
        rgb = color(rewards[j], vmax)
        tip = (f"token {j}: {tr.tokens[j]!r}\nreward {rewards[j]:+.4f}\nlogprob {logprobs[j]:.4f}"
               f"\nvalue {values[j]:.4f}")
        cls = "tok special" if special else "tok"
        spans.append(f'<span class="{cls}" style="background:{_hex(rgb)};color:{_ink(rgb)}" '
                     f'title="{esc(tip)}">{esc(text)}</span>')
    stops = ", ".join(f"{_hex(c)} {100 * i / (len(_ANCHORS) - 1):.0f}%"
                      for i, c in enumerate(_ANCHORS))
    rows = []
    for s in sentences:
        rgb = color(float(s.reward), vmax * max(1, s.n_tokens) ** 0.5)
        rows.append(f'<tr><td class="num" style="background:{_hex(rgb)};color:{_ink(rgb)}">'
                    f'{float(s.reward):+.3f}</td><td class="num">{int(s.n_tokens)}</td>'
                    f'<td>{esc(s.text)}</td></tr>')
    total = sum(r for r in rewards if math.isfinite(r))
    meta = f"{len(rewards)} tokens · total reward {total:+.3f}"
    if rewards:
        meta += f" · mean {total / len(rewards):+.3f}"
    if model_name:
        meta = f"model {esc(model_name)} · " + meta
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>erm · token rewards</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 60rem;
       margin: 2rem auto; padding: 0 1rem; color: #222; }}
h1 {{ font-size: 1.3rem; }} h2 {{ font-size: 1rem; margin-top: 1.5rem; }}
.meta {{ color: #666; font-size: .85rem; }}
.prompt {{ white-space: pre-wrap; background: #f4f4f4; padding: .6rem; border-radius: 4px; }}
.response {{ white-space: pre-wrap; font-family: ui-monospace, Menlo, Consolas, monospace;
            line-height: 1.9; padding: .6rem; border: 1px solid #ddd; border-radius: 4px; }}
.tok {{ border-radius: 2px; padding: .1rem 0; cursor: help; }}
.tok:hover {{ outline: 2px solid #222; }}
.special {{ font-style: italic; font-size: .8em; margin-left: .15em; padding: .1rem .2rem; }}
.legend {{ display: flex; align-items: center; gap: .5rem; font-size: .8rem; margin: .6rem 0; }}
.bar {{ width: 16rem; height: .8rem; border: 1px solid #999;
        background: linear-gradient(to right, {stops}); }}
table {{ border-collapse: collapse; font-size: .9rem; }}
td, th {{ padding: .25rem .5rem; border-bottom: 1px solid #eee; text-align: left;
          vertical-align: top; }}
td.num {{ text-align: right; font-family: ui-monospace, Menlo, Consolas, monospace; }}
</style></head><body>
<h1>Endogenous token rewards</h1>
<div class="meta">{meta}</div>
<h2>Prompt</h2>
<div class="prompt">{esc(render_conversation(prompt))}</div>
<h2>Response</h2>
<div class="response">{"".join(spans)}</div>
<div class="legend"><span>token reward</span><span>{-vmax:+.2f}</span><div class="bar"></div>
<span>{vmax:+.2f}</span><span>(red: negative, blue: positive; hover a token for details)</span>
</div>
<h2>Sentences</h2>
<table><tr><th>reward</th><th>tokens</th><th>sentence</th></tr>
{"".join(rows)}
</table>
</body></html>
"""


def _wrap_segments(pieces, width: int):
    """Lay (text, idx, special) pieces out on lines of `width` columns -> [(line, col, text, idx,
    special)]; newlines break lines, long pieces are split."""
    out, line, col = [], 0, 0
    for text, j, special in pieces:
        text = text.replace("\t", "    ")
        parts = text.split("\n")
        for pi, part in enumerate(parts):
            if pi > 0:
                line, col = line + 1, 0
            while part:
                if col + len(part) > width and col > 0:
                    line, col = line + 1, 0
                chunk, part = part[:width - col], part[width - col:]
                out.append((line, col, chunk, j, special))
                col += len(chunk)
                if part:
                    line, col = line + 1, 0
    return out, line + 1


def _wrap_text(text: str, width: int, indent: int = 0) -> List[str]:
    import textwrap
    lines = []
    for para in text.splitlines() or [""]:
        lines += textwrap.wrap(para, width, subsequent_indent=" " * indent) or [""]
    return lines


def render_png(prompt, response: str, token_rewards, sentences, path, *,
               vmax: Optional[float] = None, model_name: str = "", width: int = 88,
               fontsize: float = 11.0, dpi: int = 120) -> None:
    """Render the token rewards to an image file (PNG, or what the suffix says) with matplotlib:
    the prompt, the wrapped response with a coloured box per token, a colour bar, and the
    sentence rewards."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LinearSegmentedColormap, Normalize
    from matplotlib.patches import Rectangle

    tr = token_rewards
    rewards = _floats(tr.rewards)
    vmax = vmax or auto_vmax(rewards)
    placed, n_tok_lines = _wrap_segments(segments(response, tr.offsets, tr.tokens), width)
    prompt_lines = _wrap_text("Prompt: " + render_conversation(prompt), width, indent=2)
    total = sum(r for r in rewards if math.isfinite(r))
    header = f"Endogenous token rewards: {len(rewards)} tokens, total {total:+.3f}"
    if model_name:
        header += f"  ({model_name})"
    sent_lines = []  # (text, reward or None, n_tokens)
    for s in sentences:
        body = _wrap_text(" ".join(str(s.text).split()), width - 16, indent=0)
        sent_lines.append((f"{float(s.reward):+9.3f}  {int(s.n_tokens):3d}  {body[0]}",
                           float(s.reward), int(s.n_tokens)))
        sent_lines += [(" " * 16 + b, None, 0) for b in body[1:]]

    # vertical layout, in text lines
    y_header = 0
    y_prompt = 2
    y_tokens = y_prompt + len(prompt_lines) + 1
    y_bar = y_tokens + n_tok_lines + 1
    y_sent = y_bar + 3
    n_lines = y_sent + 1 + len(sent_lines) + 1

    cw = 0.6021 * fontsize / 72  # DejaVu Sans Mono advance, inches per column
    lh = 1.75 * fontsize / 72    # inches per line
    margin = 2
    fig_w, fig_h = (width + 2 * margin) * cw, (n_lines + 1) * lh
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    try:
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(-margin, width + margin)
        ax.set_ylim(n_lines + 0.5, -0.5)
        ax.axis("off")
        kw = dict(fontfamily="monospace", fontsize=fontsize, va="center", ha="left",
                  parse_math=False)
        ax.text(0, y_header + 0.5, header, fontweight="bold", **kw)
        for i, text in enumerate(prompt_lines):
            ax.text(0, y_prompt + i + 0.5, text, color="0.35", **kw)
        for line, col, text, j, special in placed:
            y = y_tokens + line
            if j is not None:
                rgb = color(rewards[j], vmax)
                ax.add_patch(Rectangle((col, y + 0.08), len(text), 0.84, facecolor=rgb,
                                       edgecolor="0.3" if special else "none", linewidth=0.5))
                ink = _ink(rgb)
            else:
                ink = "#000000"
            ax.text(col, y + 0.5, text, color=ink, fontstyle="italic" if special else "normal",
                    **kw)
        # colour bar, in figure coordinates
        cmap = LinearSegmentedColormap.from_list("erm_rdbu", list(_ANCHORS))
        bx0 = (margin + 16) / (width + 2 * margin)
        bw = min(0.45, 40 / (width + 2 * margin))
        by = 1 - (y_bar + 1.15 + 0.5) / (n_lines + 1)
        cax = fig.add_axes((bx0, by, bw, 0.55 / (n_lines + 1)))
        cb = fig.colorbar(ScalarMappable(Normalize(-vmax, vmax), cmap), cax=cax,
                          orientation="horizontal", extend="both")
        cb.ax.tick_params(labelsize=fontsize * 0.7)
        ax.text(0, y_bar + 0.9, "token reward", fontsize=fontsize * 0.85,
                fontfamily="monospace", va="center", ha="left")
        ax.text(0, y_sent + 0.5, "   reward  tok  sentence", fontweight="bold", **kw)
        for i, (text, r, n) in enumerate(sent_lines):
            y = y_sent + 1 + i
            if r is not None:
                rgb = color(r, vmax * max(1, n) ** 0.5)
                ax.add_patch(Rectangle((0, y + 0.08), 9, 0.84, facecolor=rgb, edgecolor="none"))
                ax.text(0, y + 0.5, text[:9], color=_ink(rgb), **kw)
                ax.text(9, y + 0.5, text[9:], **kw)
            else:
                ax.text(0, y + 0.5, text, **kw)
        with warnings.catch_warnings():  # characters outside the font render as boxes
            warnings.filterwarnings("ignore", message="Glyph .* missing from")
            fig.savefig(path, dpi=dpi, facecolor="white")
    finally:
        plt.close(fig)


def show(rm, prompt, response: str, out, *, vmax: Optional[float] = None) -> Path:
    """Compute the token and sentence rewards of `response` with `rm` (an `erm.EndoRM`) and write
    them to `out`: ``.html``/``.htm`` (self-contained page) or ``.png``/``.svg``/``.pdf``
    (matplotlib). Returns the path written."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".html", ".htm", ".png", ".svg", ".pdf"):
        raise ValueError(f"--out must end in .html or .png (got {out.name!r})")
    tr = rm.token_rewards(prompt, response)
    sents = rm.sentence_rewards(prompt, response)
    name = _model_name(rm)
    if suffix in (".html", ".htm"):
        out.write_text(render_html(prompt, response, tr, sents, vmax=vmax, model_name=name),
                       encoding="utf-8")
    else:
        render_png(prompt, response, tr, sents, out, vmax=vmax, model_name=name)
    return out
