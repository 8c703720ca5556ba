"""Generative-verifier baseline: ask the model itself whether a response is good.

The prompt and the response are shown to the model in one user turn, followed by the question
`QUESTION`, rendered as every erm feature renders a context (`erm.lm.context_ids`: the chat
template with the generation prompt; without a template the message contents joined by blank
lines). The score is

    log p("Yes" | judge prompt) − log p("No" | judge prompt)

where each answer is tokenized the way the model would write it right after that context
(`erm.lm.continuation_ids`: the tokens of ``context_text + "Yes"`` past the context's; this
handles tokenizers where "Yes" and " Yes" differ), and a multi-token answer sums the log-probs of
its tokens (teacher-forced). Only the last positions are read, through `erm.lm.window` (the fused
LM-head op for plain heads, `logits_to_keep` logits otherwise) — never a softmax over the
vocabulary at every position. Sequences are batched with left padding.

    judge = Judge(model, tokenizer)          # or Judge.of(rm): on an EndoRM's model
    judge.score(["What is 2+2?"] * 2, ["4.", "5."])   # tensor([...]) float32, (2,)
"""
import warnings
from typing import List, Optional

import torch

from . import lm
from ._checks import check_int
from .constants import IGNORE_INDEX
from .scoring import Scorer, in_batches

QUESTION = "Is this response correct, helpful and harmless? Answer Yes or No."
ANSWERS = ("Yes", "No")


def judge_messages(prompt, response: str, *, system_prompt: Optional[str] = None) -> List[dict]:
    """The chat messages shown to the judge: one user turn with the conversation
    (`erm.lm.render_text`), the response and `QUESTION`, after `system_prompt` if given."""
    content = f"{lm.render_text(prompt)}\n\nResponse: {response}\n\n{QUESTION}"
    return lm.messages(content, system_prompt)


def _queries(tok, prompts, responses, system_prompt):
    """One query per pair when "Yes" and "No" share all but their last token (one forward reads
    both), else one per answer: [(ids, [(pair index, sign, answer ids), ...])]."""
    queries = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        msgs = judge_messages(p, r, system_prompt=system_prompt)
        ids, (yes, no) = lm.continuations(tok, msgs, ANSWERS)
        if yes[:-1] == no[:-1]:
            queries.append((ids + yes[:-1], [(i, 1.0, yes), (i, -1.0, no)]))
        else:
            queries.append((ids + yes[:-1], [(i, 1.0, yes)]))
            queries.append((ids + no[:-1], [(i, -1.0, no)]))
    return queries


def _read_out(win, batch, queries, k, out):
    """Add sign · Σ log p(answer tokens) of each read-out of a batch's window to `out`."""
    for slot in range(2):
        targets = torch.full((len(batch), k), IGNORE_INDEX, dtype=torch.long)
        reads = []
        for b, q in enumerate(batch):
            if slot < len(queries[q][1]):
                i, sign, a = queries[q][1][slot]
                targets[b, k - len(a):] = torch.tensor(a, dtype=torch.long)
                reads.append((b, sign, i))
        if reads:
            dev = win.logits.device if win.logits is not None else win.hidden.device
            lp = lm.window_stats(win, targets.to(dev), alpha=1.0).logprob.sum(-1).float().cpu()
            for b, sign, i in reads:
                out[i] += sign * lp[b]


class Judge:
    """The Yes/No generative verifier as a scorer (`erm.scoring.Scorer`, kind "judge"): each
    response's score is log p("Yes") − log p("No") of `QUESTION` (see the module doc).

    Args:
        model: a transformers causal LM; tokenizer: its tokenizer.
        system_prompt: a system message for the judge (None: none; the template may add its own).
        batch_size: sequences per forward pass.
        max_length: longer judge inputs keep their last `max_length` tokens (the question and the
            generation prompt are at the end) with one `erm.lm.TruncationWarning` per call, or
            are an error with `truncate=False`; None: no limit.
    """

    kind = "judge"
    label = "Judge (Yes/No)"
    reductions = ()
    cuts_prompts = True

    def __init__(self, model, tokenizer, *, system_prompt: Optional[str] = None,
                 batch_size: int = 8, max_length: Optional[int] = None):
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt = system_prompt
        self.batch_size = check_int(batch_size, "batch_size", 1)
        self.max_length = None if max_length is None else check_int(max_length, "max_length", 1)
        self.end_ids = lm.end_token_ids(model, tokenizer)

    @classmethod
    def of(cls, scorer, *, batch_size: Optional[int] = None,
           max_length: Optional[int] = None) -> "Judge":
        """The judge on another scorer's causal LM (`Scorer.causal_lm`), with its batch size and
        max_length unless given."""
        return cls(scorer.causal_lm, scorer.tokenizer, batch_size=batch_size or scorer.batch_size,
                   max_length=max_length or scorer.max_length)

    @property
    def causal_lm(self):
        """The causal LM asked the question (`model`)."""
        return self.model

    def _queries(self, prompts, responses, system_prompt, truncate: bool):
        """The judge queries of N pairs, cut to max_length (a warning, or with truncate=False a
        ValueError naming the first pair too long)."""
        sp = self.system_prompt if system_prompt is None else system_prompt
        pairs = lm.pairs(prompts, responses)
        queries = _queries(self.tokenizer, [p for p, _ in pairs], [r for _, r in pairs], sp)
        n = self.max_length
        cut = sorted({i for ids, outs in queries if n and len(ids) > n for i, _, _ in outs})
        if cut and not truncate:
            raise ValueError(f"{len(cut)} judge input(s) do not fit in max_length={n} (first: "
                             f"pair {cut[0]}); raise max_length or pass truncate=True")
        if cut:
            warnings.warn(lm.TruncationWarning(
                f"{len(cut)} judge input(s) cut from the left to fit max_length={n} "
                f"(first: pair {cut[0]})", cut), stacklevel=4)
        return len(pairs), [(ids[-n:] if n else ids, outs) for ids, outs in queries]

    def check_pair(self, prompt, response: str, *, system_prompt: Optional[str] = None,
                   truncate: bool = True) -> None:
        """Raise the TypeError / ValueError `score` would raise for this pair (a malformed
        prompt, a non-string response, a judge input too long with truncate=False)."""
        self._queries([prompt], [response], system_prompt, truncate)

    @torch.inference_mode()
    def score(self, prompts, responses, *, system_prompt: Optional[str] = None,
              progress: Optional[bool] = False, truncate: bool = True) -> torch.Tensor:
        """log p("Yes") − log p("No") of the judge question, per (prompt, response).

        Args:
            prompts: a string / message list, or a list of them (one per response).
            responses: a string or a list of strings.
            system_prompt: None: `self.system_prompt`; "": none.
            progress: show a tqdm progress bar (None: when there is more than one batch).
            truncate: False: a judge input longer than max_length is a ValueError, not a cut.
        Returns:
            float32 tensor (N,) on the CPU.
        """
        n, queries = self._queries(prompts, responses, system_prompt, truncate)
        out = torch.zeros(n, dtype=torch.float32)
        device = next(self.model.parameters()).device
        pad_token = lm.pad_id(self.tokenizer, self.end_ids)

        def run(batch):
            ids, attn, _ = lm.pad([queries[q][0] for q in batch], pad_token, side="left")
            k = max(len(a) for q in batch for _, _, a in queries[q][1])
            win = lm.window(self.model, ids.to(device), attn.to(device), ids.shape[1] - k)
            _read_out(win, batch, queries, k, out)

        was_training = self.model.training
        self.model.eval()
        try:
            in_batches([len(q[0]) for q in queries], self.batch_size, run, progress=progress,
                       desc="judge")
        finally:
            self.model.train(was_training)
        return out


def judge_scores(rm, prompts, responses, *, batch_size: Optional[int] = None,
                 system_prompt: Optional[str] = None, max_length: Optional[int] = None,
                 progress: bool = False) -> torch.Tensor:
    """log p("Yes") − log p("No") of the judge question, per (prompt, response): `Judge.score`
    on the causal LM of `rm`.

    Args:
        rm: an `erm.scoring.Scorer` (an `erm.EndoRM`: its causal LM, batch size and max_length),
            or any object with `.model` (a causal LM) and `.tokenizer` (batch size 8, no limit).
        prompts: a string / message list, or a list of them (one per response).
        responses: a string or a list of strings.
        batch_size: sequences per forward pass (default: the scorer's, else 8).
        system_prompt: an optional system message for the judge (default: none; the chat
            template may insert its own).
        max_length: longer judge inputs keep their last `max_length` tokens, with one
            `erm.lm.TruncationWarning` per call (default: the scorer's, else no limit).
        progress: show a tqdm progress bar.

    Returns:
        float32 tensor (N,) on the CPU.
    """
    if isinstance(rm, Scorer):
        judge = Judge.of(rm, batch_size=batch_size, max_length=max_length)
    else:
        judge = Judge(rm.model, rm.tokenizer, batch_size=batch_size or 8, max_length=max_length)
    return judge.score(prompts, responses, system_prompt=system_prompt, progress=progress)
