"""Generative-verifier baseline: ask the model itself whether a response is good.

The prompt and the response are shown to the model in one user turn, followed by the question
`QUESTION`, rendered with the tokenizer's chat template (``add_generation_prompt=True``). The score
is

    log p("Yes" | judge prompt) − log p("No" | judge prompt)

where each answer is tokenized the way the model would write it right after the generation
prompt (the tokens of ``template_text + "Yes"`` past those of ``template_text``; this handles
tokenizers where "Yes" and " Yes" differ), and a multi-token answer sums the log-probs of its
tokens (teacher-forced). Only the logits of the last positions are computed (`logits_to_keep`
where the model supports it) and turned into log-probs with `erm.token_stats` — never a softmax
over the vocabulary at every position. Sequences are batched with left padding.
"""
import inspect
from typing import List, Optional, Sequence

import torch

from .ops import token_stats

QUESTION = "Is this response correct, helpful and harmless? Answer Yes or No."
ANSWERS = ("Yes", "No")
_IGNORE = -100


def render_conversation(prompt) -> str:
    """A prompt (string, or chat message list) as plain text: "User: ...", "Assistant: ..."."""
    if isinstance(prompt, str):
        return f"User: {prompt}"
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n".join(f"{names.get(m['role'], m['role'].capitalize())}: {m['content']}"
                     for m in prompt)


def judge_messages(prompt, response: str, *, system_prompt: Optional[str] = None) -> List[dict]:
    """The chat messages shown to the judge: one user turn with the conversation, the response
    and `QUESTION` (after an optional system message)."""
    content = (f"{render_conversation(prompt)}\n\nResponse: {response}\n\n{QUESTION}")
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": content}]


def _ids(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_ids(tokenizer, prefix_text: str, prefix_ids: Sequence[int], answer: str) -> List[int]:
    """Token ids of `answer` as the model would produce it right after `prefix_text`.

    The tokens of ``prefix_text + answer`` past the tokens of `prefix_text`, when the latter are a
    prefix of the former; otherwise (a merge across the boundary) the answer tokenized alone."""
    full = _ids(tokenizer, prefix_text + answer)
    k = len(prefix_ids)
    if len(full) > k and full[:k] == list(prefix_ids):
        return full[k:]
    return _ids(tokenizer, answer)


def _device(rm, model):
    dev = getattr(rm, "device", None)
    if dev is not None:
        return torch.device(dev)
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


@torch.inference_mode()
def judge_scores(rm, prompts, responses, *, batch_size: Optional[int] = None,
                 system_prompt: Optional[str] = None, max_length: Optional[int] = None,
                 progress: bool = False) -> torch.Tensor:
    """log p("Yes") − log p("No") of the judge question, per (prompt, response).

    Args:
        rm: an `erm.EndoRM`, or any object with `.model` (a causal LM) and `.tokenizer` (with a
            chat template).
        prompts: a string / message list, or a list of them (one per response).
        responses: a string or a list of strings.
        batch_size: sequences per forward pass (default `rm.batch_size`, else 8).
        system_prompt: an optional system message for the judge (default: none; the chat
            template may insert its own).
        max_length: longer judge inputs keep their last `max_length` tokens (the question and the
            generation prompt are at the end). Default `rm.max_length`, else no limit.
        progress: show a tqdm progress bar.

    Returns:
        float32 tensor (N,) on the CPU.
    """
    model, tok = rm.model, rm.tokenizer
    if isinstance(responses, str):
        responses = [responses]
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                    and isinstance(prompts[0], dict)):
        prompts = [prompts] * len(responses)
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    batch_size = int(batch_size or getattr(rm, "batch_size", None) or 8)
    max_length = max_length or getattr(rm, "max_length", None)
    device = _device(rm, model)

    # One query = a token sequence and up to two read-outs (sign, answer ids) at its last
    # positions. When "Yes" and "No" share everything but the last token (usually: both are one
    # token), one forward pass serves both.
    queries = []  # (ids, [(example, sign, answer_ids)])
    for i, (p, r) in enumerate(zip(prompts, responses)):
        text = tok.apply_chat_template(judge_messages(p, r, system_prompt=system_prompt),
                                       tokenize=False, add_generation_prompt=True)
        ids = _ids(tok, text)
        yes, no = (answer_ids(tok, text, ids, a) for a in ANSWERS)
        if yes[:-1] == no[:-1]:
            queries.append((ids + yes[:-1], [(i, 1.0, yes), (i, -1.0, no)]))
        else:
            queries.append((ids + yes[:-1], [(i, 1.0, yes)]))
            queries.append((ids + no[:-1], [(i, -1.0, no)]))
    if max_length:
        queries = [(ids[-max_length:], outs) for ids, outs in queries]

    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    keep_kw = "logits_to_keep" in inspect.signature(model.forward).parameters
    out = torch.zeros(len(responses), dtype=torch.float32)
    order = sorted(range(len(queries)), key=lambda q: -len(queries[q][0]))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="judge", unit="batch", leave=False)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            seqs = [queries[q][0] for q in batch]
            t = max(len(s) for s in seqs)
            k = max(len(a) for q in batch for _, _, a in queries[q][1])
            input_ids = torch.full((len(seqs), t), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), t), dtype=torch.long)
            for b, s in enumerate(seqs):
                input_ids[b, t - len(s):] = torch.tensor(s, dtype=torch.long)
                mask[b, t - len(s):] = 1
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            kwargs = dict(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                          position_ids=position_ids.to(device), use_cache=False)
            if keep_kw:
                kwargs["logits_to_keep"] = k
            logits = model(**kwargs).logits[:, -k:]
            for slot in range(2):
                targets = torch.full((len(seqs), k), _IGNORE, dtype=torch.long)
                rows, signs, examples = [], [], []
                for b, q in enumerate(batch):
                    outs = queries[q][1]
                    if slot < len(outs):
                        i, sign, a = outs[slot]
                        targets[b, k - len(a):] = torch.tensor(a, dtype=torch.long)
                        rows.append(b)
                        signs.append(sign)
                        examples.append(i)
                if not rows:
                    continue
                lp = token_stats(logits, targets.to(logits.device),
                                 ignore_index=_IGNORE).logprob.sum(-1).float().cpu()
                for b, sign, i in zip(rows, signs, examples):
                    out[i] += sign * lp[b]
    finally:
        model.train(was_training)
    return out
