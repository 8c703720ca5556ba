"""Token-level views of the endogenous reward: a response coloured token by token.

    erm.show.show(rm, "What is 2+2?", "2+2 is 4.", "tokens.html")   # or tokens.png

Colours come from a diverging red–white–blue map centred at 0 (red: negative reward, blue:
positive), symmetric in ±vmax (default: the largest |reward|, or its 95th percentile for
responses of 20 tokens or more; rewards beyond are clipped). The sentence rewards are listed
under the response. HTML output is one self-contained file (inline CSS, no scripts) with a
tooltip per token (reward, log-prob, soft value); PNG output is rendered by matplotlib (Agg)
on a grid of monospace cells, with wrapped lines and a colour bar. The grid, its wrapping and
the font discovery are `erm.typeset`'s: wide (CJK) characters take two cells and are drawn glyph
by glyph with an installed CJK font (`erm.typeset.cjk_fonts`), and a character no available
font has is drawn as `erm.typeset.REPLACEMENT` (□); cell width and line height are measured with
the renderer, so text never overlaps.

A trained `erm.SentenceRM` colours sentences instead (`sentence_view`): each sentence is one span
coloured by its reward r_k, the sentence table lists its weight in the response score R, and
the header names the model and its aggregate and gives R (what `SentenceRM.score` returns) and
Σ_k r_k apart (`Summary`, `sentence_summary`).
"""
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .lm import render_text as render_conversation
from .typeset import Typesetter, text_cells, wrap_cells, wrap_segments

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


@dataclass
class Summary:
    """What a view's header and legend say.

    Attributes:
        title: the heading ("Endogenous token rewards").
        unit: what is coloured: "token" or "sentence" (the legend says "<unit> reward").
        detail: the second number of a piece's tooltip ("logprob", or "weight" in R).
        stats: the header's facts, joined by " · " in HTML ("3 tokens", "total reward ...").
        line: the same facts on one line after the title in a PNG.
    """

    title: str
    unit: str
    detail: str
    stats: List[str]
    line: str


def token_summary(rewards: Sequence[float]) -> Summary:
    """The header of an `erm.EndoRM` view: the number of tokens, the total and mean reward."""
    rewards = _floats(rewards)
    total = sum(r for r in rewards if math.isfinite(r))
    stats = [f"{len(rewards)} tokens", f"total reward {total:+.3f}"]
    if rewards:
        stats.append(f"mean {total / len(rewards):+.3f}")
    return Summary("Endogenous token rewards", "token", "logprob", stats,
                   f"{len(rewards)} tokens, total {total:+.3f}")


#: How each `erm.SentenceRM` aggregate makes the response score R from the sentence rewards.
_AGGREGATE_R = {"attention": "R = Σ_k w_k·r_k, w = attention weights",
                "sum": "R = Σ_k r_k", "last": "R = v(end_K), the value at the last token"}


def sentence_summary(aggregate: str, score: float, sentences) -> Summary:
    """The header of an `erm.SentenceRM` view: the model and its aggregate, the number of
    sentences, the response score R (what `SentenceRM.score` returns) and Σ_k r_k apart."""
    total = sum(float(x.reward) for x in sentences)
    n = len(sentences)
    how = _AGGREGATE_R.get(aggregate, f"aggregate {aggregate}")
    return Summary(f"Sentence-level RM ({aggregate} aggregate)", "sentence", "weight",
                   [f"{n} sentences", f"score R {score:+.3f} ({how})", f"Σ r_k {total:+.3f}"],
                   f"{n} sentences, score R {score:+.3f}, Σ r_k {total:+.3f}")


def _model_name(rm) -> str:
    """How a page names the model of a scorer (`erm.scoring.Scorer`): the `_name_or_path` of its
    causal LM's config, a local path by its last component ("" when it has none)."""
    cfg = getattr(rm.causal_lm, "config", None)
    name = str(getattr(cfg, "_name_or_path", "") or "")
    return Path(name).name if name.startswith(("/", ".", "~")) else name


def _html_spans(response: str, tr, rewards, vmax: float, summary: Summary) -> List[str]:
    """One coloured <span> per token (or sentence) with its tooltip, plain text in between."""
    logprobs = _floats(tr.logprobs)
    values = _floats(tr.values) if getattr(tr, "values", None) is not None \
        else [math.nan] * len(rewards)
    esc, spans = html.escape, []
    for text, j, special in segments(response, tr.offsets, tr.tokens):
        if j is None:
            spans.append(esc(text))
            continue
        rgb = color(rewards[j], vmax)
        tip = (f"{summary.unit} {j}: {tr.tokens[j]!r}\nreward {rewards[j]:+.4f}\n"
               f"{summary.detail} {logprobs[j]:.4f}\nvalue {values[j]:.4f}")
        cls = "tok special" if special else "tok"
        spans.append(f'<span class="{cls}" style="background:{_hex(rgb)};color:{_ink(rgb)}" '
                     f'title="{esc(tip)}">{esc(text)}</span>')
    return spans


def _sentence_scale(s, vmax: float, summary: Summary) -> float:
    """Colour scale of a sentence's reward: vmax for sentence rewards; for summed token rewards
    vmax·√(tokens), the spread of a sum of that many tokens."""
    return vmax if summary.unit == "sentence" else vmax * max(1, int(s.n_tokens)) ** 0.5


def _html_table(sentences, vmax: float, summary: Summary) -> str:
    """The sentence table: reward (coloured), weight in R (when the sentences have one), tokens,
    text."""
    weighted = bool(sentences) and all(hasattr(s, "weight") for s in sentences)
    head = "<tr><th>reward</th>" + ("<th>weight</th>" if weighted else "") + \
        "<th>tokens</th><th>sentence</th></tr>"
    rows = []
    for s in sentences:
        rgb = color(float(s.reward), _sentence_scale(s, vmax, summary))
        weight = f'<td class="num">{float(s.weight):.3f}</td>' if weighted else ""
        rows.append(f'<tr><td class="num" style="background:{_hex(rgb)};color:{_ink(rgb)}">'
                    f'{float(s.reward):+.3f}</td>{weight}<td class="num">{int(s.n_tokens)}</td>'
                    f'<td>{html.escape(s.text)}</td></tr>')
    return f"<table>{head}\n{''.join(rows)}\n</table>"


def render_html(prompt, response: str, token_rewards, sentences, *, vmax: Optional[float] = None,
                model_name: str = "", summary: Optional[Summary] = None) -> str:
    """A self-contained HTML page: the prompt, the response coloured by token reward (hover a
    token for its reward, log-prob and soft value), a colour legend and the sentence rewards.
    `summary` (default `token_summary`) says what is coloured and what the header says; a
    SentenceRM view (`view`) colours sentences and lists each one's weight in R."""
    tr = token_rewards
    rewards = _floats(tr.rewards)
    summary = summary or token_summary(rewards)
    vmax = vmax or auto_vmax(rewards)
    esc = html.escape
    spans = _html_spans(response, tr, rewards, vmax, summary)
    stops = ", ".join(f"{_hex(c)} {100 * i / (len(_ANCHORS) - 1):.0f}%"
                      for i, c in enumerate(_ANCHORS))
    meta = " · ".join(esc(x) for x in summary.stats)
    if model_name:
        meta = f"model {esc(model_name)} · " + meta
    unit = summary.unit
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>erm · {unit} rewards</title>
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
<h1>{esc(summary.title)}</h1>
<div class="meta">{meta}</div>
<h2>Prompt</h2>
<div class="prompt">{esc(render_conversation(prompt))}</div>
<h2>Response</h2>
<div class="response">{"".join(spans)}</div>
<div class="legend"><span>{unit} reward</span><span>{-vmax:+.2f}</span><div class="bar"></div>
<span>{vmax:+.2f}</span><span>(red: negative, blue: positive; hover a {unit} for details)</span>
</div>
<h2>Sentences</h2>
{_html_table(sentences, vmax, summary)}
</body></html>
"""


# ------------------------------------------------------------------------------------- PNG
def _sentence_lines(sentences, width: int) -> Tuple[str, list]:
    """(column header, [(text, sentence or None)]): the first line of a sentence carries its
    reward, its weight in R when the sentences have one, and its token count."""
    weighted = bool(sentences) and all(hasattr(s, "weight") for s in sentences)
    indent = 24 if weighted else 16
    header = "   reward  weight  tok  sentence" if weighted else "   reward  tok  sentence"
    out = []
    for s in sentences:
        body = wrap_cells(" ".join(str(s.text).split()), width - indent)
        weight = f"{float(s.weight):6.3f}  " if weighted else ""
        out.append((f"{float(s.reward):+9.3f}  {weight}{int(s.n_tokens):3d}  {body[0]}", s))
        out += [(" " * indent + b, None) for b in body[1:]]
    return header, out


def render_figure(prompt, response: str, token_rewards, sentences, *,
                  vmax: Optional[float] = None, model_name: str = "", width: int = 88,
                  fontsize: float = 11.0, dpi: int = 120, summary: Optional[Summary] = None):
    """The matplotlib Figure `render_png` saves: the header, the prompt, the response on a
    grid of `width` columns with a coloured box per token, a colour bar and the sentence
    rewards. Wide (CJK) characters take two columns and are drawn with an installed CJK font
    when there is one (`erm.typeset.cjk_fonts`), else as `erm.typeset.REPLACEMENT`. `summary`
    as in `render_html`. The caller closes the figure."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    tr = token_rewards
    rewards = _floats(tr.rewards)
    summary = summary or token_summary(rewards)
    vmax = vmax or auto_vmax(rewards)
    ts = Typesetter(fontsize, dpi)
    placed, n_tok_lines = wrap_segments(segments(response, tr.offsets, tr.tokens), width)
    header = f"{summary.title}: {summary.line}"
    header_lines = wrap_cells(header + (f"  ({model_name})" if model_name else ""), width, 2)
    prompt_lines = wrap_cells("Prompt: " + render_conversation(prompt), width, indent=2)
    sent_header, sent_lines = _sentence_lines(sentences, width)
    y_prompt = len(header_lines) + 1
    y_tokens = y_prompt + len(prompt_lines) + 1
    y_bar = y_tokens + n_tok_lines + 1
    y_sent = y_bar + 3
    n_lines = y_sent + 1 + len(sent_lines) + 1

    margin = 2
    fig = plt.figure(figsize=((width + 2 * margin) * ts.cw, (n_lines + 1) * ts.lh), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-margin, width + margin)
    ax.set_ylim(n_lines + 0.5, -0.5)
    ax.axis("off")
    for i, text in enumerate(header_lines):
        ts.draw(ax, 0, i + 0.5, text, weight="bold")
    for i, text in enumerate(prompt_lines):
        ts.draw(ax, 0, y_prompt + i + 0.5, text, color="0.35")
    for line, col, text, j, special in placed:
        y, ink = y_tokens + line, "#000000"
        if j is not None:
            rgb = color(rewards[j], vmax)
            ax.add_patch(Rectangle((col, y + 0.08), text_cells(text), 0.84, facecolor=rgb,
                                   edgecolor="0.3" if special else "none", linewidth=0.5))
            ink = _ink(rgb)
        ts.draw(ax, col, y + 0.5, text, color=ink, style="italic" if special else "normal")
    _colour_bar(fig, ax, ts, vmax, y_bar, n_lines, width, margin, f"{summary.unit} reward")
    ts.draw(ax, 0, y_sent + 0.5, sent_header, weight="bold")
    for i, (text, sent) in enumerate(sent_lines):
        y = y_sent + 1 + i + 0.5
        if sent is not None:
            rgb = color(float(sent.reward), _sentence_scale(sent, vmax, summary))
            ax.add_patch(Rectangle((0, y - 0.42), 9, 0.84, facecolor=rgb, edgecolor="none"))
            ts.draw(ax, 0, y, text[:9], color=_ink(rgb))
            ts.draw(ax, 9, y, text[9:])
        else:
            ts.draw(ax, 0, y, text)
    return fig


def _colour_bar(fig, ax, ts: Typesetter, vmax, y_bar, n_lines, width, margin,
                label: str = "token reward") -> None:
    """The label ("token reward") and, right of its measured extent, the colour bar."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LinearSegmentedColormap, Normalize
    size = ts.fontsize * 0.85
    ts.draw(ax, 0, y_bar + 0.9, label, size=size)
    label_cols = math.ceil(ts.extent(label, 0, size)[0] / ts.dpi / ts.cw)
    x0 = label_cols + 3  # two cells of gap, one for the colour bar's end triangle
    cmap = LinearSegmentedColormap.from_list("erm_rdbu", list(_ANCHORS))
    total = width + 2 * margin
    by = 1 - (y_bar + 1.15 + 0.5) / (n_lines + 1)
    cax = fig.add_axes(((x0 + margin) / total, by, min(0.45, 40 / total),
                        0.55 / (n_lines + 1)))
    cb = fig.colorbar(ScalarMappable(Normalize(-vmax, vmax), cmap), cax=cax,
                      orientation="horizontal", extend="both")
    cb.ax.tick_params(labelsize=ts.fontsize * 0.7)


def render_png(prompt, response: str, token_rewards, sentences, path, *,
               vmax: Optional[float] = None, model_name: str = "", width: int = 88,
               fontsize: float = 11.0, dpi: int = 120, summary: Optional[Summary] = None) -> None:
    """Render the token rewards to an image file (PNG, or what the suffix says) with matplotlib:
    the prompt, the wrapped response with a coloured box per token, a colour bar, and the
    sentence rewards (see `render_figure`)."""
    import matplotlib.pyplot as plt
    fig = render_figure(prompt, response, token_rewards, sentences, vmax=vmax,
                        model_name=model_name, width=width, fontsize=fontsize, dpi=dpi,
                        summary=summary)
    try:
        fig.savefig(path, dpi=dpi, facecolor="white")
    finally:
        plt.close(fig)


def sentence_view(srm, prompt, response: str):
    """(TokenRewards, [SentenceScore], Summary) of a trained `erm.SentenceRM`, which scores
    sentences and not tokens: each sentence is one coloured span with its reward r_k, its
    weight in the response score R (shown where a token shows its log-prob) and its value
    v(end_k); the summary names the model and its aggregate and gives R (`SentenceRM.score`)
    and Σ_k r_k apart."""
    import torch

    from .model import TokenRewards

    ss = srm.sentence_rewards(prompt, response)
    score = float(srm.score([prompt], [response], progress=False)[0])
    tensor = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    tr = TokenRewards(tokens=[x.text for x in ss], offsets=[(x.start, x.end) for x in ss],
                      rewards=tensor([x.reward for x in ss]),
                      logprobs=tensor([x.weight for x in ss]),
                      values=tensor([x.value for x in ss]))
    return tr, ss, sentence_summary(srm.aggregate, score, ss)


def view(rm, prompt, response: str):
    """(TokenRewards, sentences, Summary) that `show` draws: an `erm.EndoRM`'s token and
    sentence rewards, or a `erm.SentenceRM`'s sentences (`sentence_view`), told apart by their
    `kind` (`erm.scoring.Scorer`). Raises TypeError for another kind of scorer (a judge has no
    per-token or per-sentence rewards to draw)."""
    kind = getattr(rm, "kind", None)
    if kind == "endorm":
        from .model import sentence_rewards_of

        tr = rm.token_rewards(prompt, response)  # one forward for tokens and sentences
        return tr, sentence_rewards_of(tr, response), token_summary(tr.rewards)
    if kind == "sentence_rm":
        return sentence_view(rm, prompt, response)
    raise TypeError(f"erm show draws an EndoRM or a SentenceRM (kind 'endorm' or "
                    f"'sentence_rm'), got {type(rm).__name__} of kind {kind!r}")


def show(rm, prompt, response: str, out, *, vmax: Optional[float] = None) -> Path:
    """Compute the token and sentence rewards of `response` with `rm` and write them to `out`:
    ``.html``/``.htm`` (self-contained page) or ``.png``/``.svg``/``.pdf`` (matplotlib).
    `rm` is an `erm.EndoRM` (tokens coloured by reward) or an `erm.SentenceRM` (sentences
    coloured by reward, `sentence_view`). Returns the path written."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".html", ".htm", ".png", ".svg", ".pdf"):
        raise ValueError(f"--out must end in .html or .png (got {out.name!r})")
    tr, sents, summary = view(rm, prompt, response)
    name = _model_name(rm)
    if suffix in (".html", ".htm"):
        out.write_text(render_html(prompt, response, tr, sents, vmax=vmax, model_name=name,
                                   summary=summary), encoding="utf-8")
    else:
        render_png(prompt, response, tr, sents, out, vmax=vmax, model_name=name, summary=summary)
    return out
