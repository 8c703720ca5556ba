"""`erm show` PNG layout: mixed English / Chinese / Japanese text on the cell grid, no text
overlapping other text or leaving the figure, CJK glyphs from an installed CJK font when there is
one (else one replacement glyph, never a missing-glyph box), and the wrapping helpers."""
import itertools
import re
import types
import warnings

import matplotlib
import pytest

matplotlib.use("Agg")

from matplotlib import font_manager as fm  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from erm import show, typeset  # noqa: E402

PROMPT = "请用中文和日本語回答: What is the capital of France? フランスの首都はどこですか？"
RESPONSE = ("The capital of France is Paris. 法国的首都是巴黎，这是一个众所周知的事实。"
            "フランスの首都はパリです。Berlin is in Germany; 柏林在德国。😀 Ünïcödé, e\u0301 too.\n"
            "A long English sentence follows to check wrapping across the whole width.")
CJK = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff\uff00-\uffef]")


def _fake(response):
    """TokenRewards / SentenceReward stand-ins: one token per word or CJK character."""
    spans = [m.span() for m in re.finditer(r"\s*[A-Za-z\u00c0-\u024f\u0301]+|\s*\S", response)]
    n = len(spans) + 1
    tr = types.SimpleNamespace(
        tokens=[response[a:b] for a, b in spans] + ["<|im_end|>"],
        offsets=spans + [(len(response), len(response))],
        rewards=[((i * 7) % 11 - 5) / 2 for i in range(n)], logprobs=[-1.0] * n,
        values=[0.0] * n)
    sents = [types.SimpleNamespace(text=s, reward=-1.5 * k, n_tokens=3 + k)
             for k, s in enumerate(re.split(r"(?<=[.。])\s*", response)) if s]
    return tr, sents


def _texts(fig):
    """(text, window extent) of every visible, non-empty Text of the drawn figure."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.canvas.draw()
    missing = [str(w.message) for w in caught if "missing from" in str(w.message)]
    renderer = fig.canvas.get_renderer()
    out = [(t, t.get_window_extent(renderer)) for t in fig.findobj(Text)
           if t.get_visible() and t.get_text().strip()]
    return out, missing


@pytest.fixture
def figure():
    figs = []

    def make(**kw):
        tr, sents = _fake(RESPONSE)
        fig = show.render_figure(PROMPT, RESPONSE, tr, sents, model_name="tiny/模型", **kw)
        figs.append(fig)
        return fig

    yield make
    import matplotlib.pyplot as plt
    for f in figs:
        plt.close(f)


@pytest.mark.parametrize("width", [88, 40])
def test_no_overlap_and_inside_the_figure(figure, width):
    fig = figure(width=width)
    texts, missing = _texts(fig)
    assert not missing, missing  # every glyph drawn comes from a font that has it
    w, h = fig.bbox.width, fig.bbox.height
    assert len(texts) > 50
    for t, bb in texts:
        assert bb.x0 >= -0.5 and bb.y0 >= -0.5 and bb.x1 <= w + 0.5 and bb.y1 <= h + 0.5, \
            (t.get_text(), bb, w, h)
    for (t1, a), (t2, b) in itertools.combinations(texts, 2):
        overlap_x = min(a.x1, b.x1) - max(a.x0, b.x0)
        overlap_y = min(a.y1, b.y1) - max(a.y0, b.y0)
        assert overlap_x <= 1.0 or overlap_y <= 1.0, (t1.get_text(), t2.get_text(), a, b)


def test_cjk_glyphs_use_a_cjk_font(figure):
    if not typeset.cjk_fonts():
        pytest.skip("no font with CJK glyphs is installed")
    texts, _ = _texts(figure())
    drawn = 0
    for t, _ in texts:
        for ch in CJK.findall(t.get_text()):
            path = fm.findfont(t.get_fontproperties())
            assert ord(ch) in typeset._charmap(path), (ch, path)
            drawn += 1
    assert drawn >= 10


def test_a_cjk_font_newer_than_matplotlibs_font_cache_is_found(monkeypatch):
    """A CJK font installed after matplotlib cached its font list is still used."""
    installed = tuple(p for p in fm.findSystemFonts()
                      if all(ord(c) in typeset._charmap(p) for c in typeset._CJK_PROBE))
    if not installed:
        pytest.skip("no font with CJK glyphs is installed")
    stale = [e for e in fm.fontManager.ttflist if e.fname not in installed]
    monkeypatch.setattr(fm.fontManager, "ttflist", stale)
    typeset.cjk_fonts.cache_clear()
    try:
        found = typeset.cjk_fonts()
        assert found and set(found) <= set(installed), (found, installed)
        assert set(found) <= {e.fname for e in fm.fontManager.ttflist}
    finally:
        typeset.cjk_fonts.cache_clear()


def test_without_cjk_font_characters_are_replaced(figure, monkeypatch):
    monkeypatch.setattr(typeset, "cjk_fonts", lambda: ())
    texts, missing = _texts(figure())
    assert not missing, missing
    joined = "".join(t.get_text() for t, _ in texts)
    assert not CJK.search(joined)
    for t, _ in texts:  # what is drawn, each font has (the emoji: DejaVu Sans, or replaced)
        path = fm.findfont(t.get_fontproperties())
        assert all(ord(c) in typeset._charmap(path) for c in t.get_text() if not c.isspace()), \
            (t.get_text(), path)
    assert joined.count(typeset.REPLACEMENT) >= 20
    assert "Berlin" in joined and "Ünïcödé" in joined


def test_cells_and_wrapping():
    assert typeset.text_cells("ab中文。😀e\u0301") == 2 + 4 + 2 + 2 + 1
    for width, indent in ((10, 2), (17, 0), (3, 1)):
        lines = typeset.wrap_cells(PROMPT + " " + RESPONSE, width, indent)
        assert all(typeset.text_cells(x) <= width for x in lines), (width, lines)
        assert "".join(lines).replace(" ", "").replace("\n", "") == \
            (PROMPT + RESPONSE).replace(" ", "").replace("\n", "")
    tr, _ = _fake(RESPONSE)
    placed, n = typeset.wrap_segments(show.segments(RESPONSE, tr.offsets, tr.tokens), 20)
    rows = {}
    for line, col, text, j, special in placed:
        assert col + typeset.text_cells(text) <= 20
        assert rows.get(line, 0) <= col  # pieces of a line do not overlap
        rows[line] = col + typeset.text_cells(text)
    assert n == max(rows) + 1
    runs = typeset.glyph_runs("ab中c", typeset._font_chain())
    assert [(c, n) for c, _, _, n in runs][:1] == [(0, 2)] and runs[-1][0] == 4


# ------------------------------------------------------------------- what the page says
SRM_PROMPT = "What is the capital of France?"
SRM_RESPONSE = "The capital of France is Paris. It is big! Berlin is in Germany."


@pytest.fixture(scope="module")
def srm():
    import torch

    from erm import SentenceRM
    from tests.tiny import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer("llama")
    torch.manual_seed(0)
    return SentenceRM(model, tok, aggregate="attention", attn_dim=16)


def test_sentence_rm_page_names_the_model_score_and_weights(srm, tmp_path):
    """A SentenceRM page: the header names the sentence-level RM and its aggregate and shows the
    score R (what `SentenceRM.score` returns) and Σ r_k apart, counts sentences, the legend says
    "sentence reward" and every sentence shows its attention weight."""
    ss = srm.sentence_rewards(SRM_PROMPT, SRM_RESPONSE)
    score = float(srm.score(SRM_PROMPT, SRM_RESPONSE)[0])
    total = sum(s.reward for s in ss)
    assert len(ss) == 3 and abs(score - total) > 1e-3  # the two numbers differ here
    page = show.show(srm, SRM_PROMPT, SRM_RESPONSE, tmp_path / "s.html").read_text("utf-8")
    head = page[page.index("<h1>"):page.index("<h2>")]
    assert "sentence-level" in head.lower() and "attention" in head
    assert f"score R {score:+.3f}" in head and f"Σ r_k {total:+.3f}" in head
    assert "3 sentences" in head and "token" not in head and "Endogenous" not in head
    assert "sentence reward" in page and "token reward" not in page
    table = page[page.index("<table>"):]
    assert "<th>weight</th>" in table
    for s in ss:
        assert f"{s.weight:.3f}</td>" in table and f"{s.reward:+.3f}" in table

    tr, sents, summary = show.view(srm, SRM_PROMPT, SRM_RESPONSE)
    fig = show.render_figure(SRM_PROMPT, SRM_RESPONSE, tr, sents, summary=summary)
    try:
        texts, _ = _texts(fig)
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)
    drawn = " ".join(" ".join(t.get_text() for t, _ in texts).split())  # wrapped lines joined
    assert f"score R {score:+.3f}" in drawn and f"Σ r_k {total:+.3f}" in drawn
    assert "3 sentences" in drawn and "attention" in drawn and "Endogenous" not in drawn
    assert "sentence reward" in drawn and "token reward" not in drawn and "weight" in drawn
    for s in ss:
        assert f"{s.weight:.3f}" in drawn


def test_endorm_page_keeps_token_wording():
    tr, sents = _fake(RESPONSE)
    page = show.render_html(PROMPT, RESPONSE, tr, sents)
    total = sum(tr.rewards)
    assert "<h1>Endogenous token rewards</h1>" in page
    assert f"{len(tr.rewards)} tokens · total reward {total:+.3f}" in page
    assert "token reward" in page and "<th>weight</th>" not in page
    fig = show.render_figure(PROMPT, RESPONSE, tr, sents)
    try:
        drawn = "\n".join(t.get_text() for t, _ in _texts(fig)[0])
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)
    assert f"Endogenous token rewards: {len(tr.rewards)} tokens, total {total:+.3f}" in drawn
    assert "token reward" in drawn


def _endorm_stand_in(name):
    """A scorer of kind "endorm" (`erm.scoring.Scorer`) whose model is reachable only through
    `causal_lm`, with fixed token rewards."""
    import torch

    from erm.model import TokenRewards

    tr = TokenRewards(tokens=["Paris", "."], offsets=[(0, 5), (5, 6)],
                      rewards=torch.tensor([1.5, -0.5]), logprobs=torch.tensor([-0.1, -0.2]),
                      values=torch.tensor([0.0, 0.0]))
    lm = types.SimpleNamespace(config=types.SimpleNamespace(_name_or_path=name))
    return types.SimpleNamespace(kind="endorm", label="EndoRM", causal_lm=lm,
                                 token_rewards=lambda prompt, response: tr)


def test_page_names_the_model_of_any_scorer_by_its_causal_lm(tmp_path):
    """The model name comes from the Scorer protocol's `causal_lm`, not from attribute names
    one scorer class happens to use."""
    page = show.show(_endorm_stand_in("/models/tiny-llama-ft"), "Capital?", "Paris.",
                     tmp_path / "p.html").read_text("utf-8")
    assert "tiny-llama-ft" in page and "/models" not in page
    assert show.view(_endorm_stand_in("org/model"), "Capital?", "Paris.")[2].title \
        .startswith("Endogenous")


def test_view_follows_the_scorer_kind(srm, monkeypatch):
    """A SentenceRM is drawn by sentences even when it has a `token_rewards` attribute; a judge
    (no token or sentence rewards) is refused with a TypeError naming its kind."""
    def boom(*args, **kwargs):
        raise AssertionError("a SentenceRM must not be drawn from token rewards")

    monkeypatch.setattr(srm, "token_rewards", boom, raising=False)
    tr, sents, summary = show.view(srm, SRM_PROMPT, SRM_RESPONSE)
    assert len(sents) == 3 and "sentence" in summary.title.lower()
    judge = types.SimpleNamespace(kind="judge", label="Judge (Yes/No)",
                                  causal_lm=_endorm_stand_in("x").causal_lm)
    with pytest.raises(TypeError, match="kind 'judge'"):
        show.view(judge, "Capital?", "Paris.")
