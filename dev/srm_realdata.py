"""The sentence-level reward model on real preference pairs: held-out accuracy of the attention,
sum and last aggregates next to the untrained EndoRM, over several seeds, frozen backbone.

    nice -n 10 .venv/bin/python dev/srm_realdata.py OUT_DIR [--data FILE] [--pairs 600]
        [--train 300] [--seeds 0 1 2 3 4] [--epochs 3] [--max-length 320] [--cache FILE]

1. Pairs: the HH-RLHF transcripts of --data (default ../shared/data/hh_rlhf_harmless_a.jsonl.gz),
   without the pairs whose responses are empty or identical; a fixed shuffle (seed 0), the
   first --pairs of it.
2. One forward of the embedded SmolLM2-135M-Instruct (float32, CPU) per sequence gives both the
   untrained EndoRM's reward (sum over the response tokens, α = 1, γ = 1) and the final hidden
   states from end_0 (the last context token) to the end of the response (kept in float16 in
   the --cache folder, 40 pairs a file: a second run reuses them; contexts longer than
   --max-length are cut from the left).
3. For every seed: a random split (--train pairs to train, the rest held out), then for every
   variant a `SentenceHead` trained on the cached marker states with the trainer's recipe
   (Bradley–Terry loss, AdamW, 10% linear warm-up then cosine, batch 8, gradient clipping 1.0,
   --epochs epochs, lr --head-lr); held-out and training accuracy.

Variants: "attention" (the model's aggregate), "sum", "last" (the response-level baseline), each
with the value head starting at zero as `erm.train_sentence_rm` starts it, and for the defect
hunt: the same with the random value-head initialisation `SentenceHead` has (what the trainer
used before), "attention, no RoPE", "attention, uniform weights" (the query zeroed and frozen:
the mean of the sentence rewards), "attention, d=16" (fewer projection weights to overfit),
"attention, standardised states" (marker states standardised per dimension with the training
pairs' mean and sd: one dimension of SmolLM2's final states has mean 23 and sd 13, the others
about 1), "attention, projections at lr/10" and "lr/100", "attention, unit query/keys × 4"
(logits 4·cos(q, k_k), no RoPE: bounded) and "attention × K, query 0 at init"
(R = K·Σ_k w_k r_k, which starts as "sum"). For the attention variants the JSON also gives how
often one sentence decides R (largest weight > 0.95). With a
shared prompt v(end_0) is the same for both responses of a pair, so "sum" and "last" train alike
unless the context was cut differently for the two responses (--max-length).

Writes OUT_DIR/srm_realdata.json (per seed and variant; means, standard deviations, ranges) and
OUT_DIR/srm_realdata.png (held-out accuracy, mean ± sd over seeds, each seed a dot).
"""
import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf_harmless_a.jsonl.gz"


def read_pairs(path, n: int, max_length: int):
    """(pairs, skipped, usable): the first n pairs of a fixed shuffle of the usable pairs (not
    malformed, responses not identical, each response shorter than max_length − 8 tokens)."""
    from erm import lm
    from erm.data import json_lines, parse_record

    tok = lm.load(None)[1]
    pairs, skipped = [], {"malformed": 0, "identical": 0, "too long": 0}
    for item in json_lines(path):
        rec = item[-1] if isinstance(item, tuple) else item
        try:
            p = parse_record(rec)
        except ValueError:
            skipped["malformed"] += 1
            continue
        if p.chosen.strip() == p.rejected.strip():
            skipped["identical"] += 1
            continue
        pairs.append(p)
    random.Random(0).shuffle(pairs)
    fit = []
    for p in pairs:
        if max(len(tok(r)["input_ids"]) for r in (p.chosen, p.rejected)) > max_length - 8:
            skipped["too long"] += 1
        else:
            fit.append(p)
    return fit[:n], skipped, len(fit)


@torch.inference_mode()
def encode_and_cache(pairs, max_length: int, batch: int = 8) -> dict:
    """Per sequence (chosen 0..n−1, rejected n..2n−1): hidden states end_0..end (float16), the
    marker offsets in them, the EndoRM sum; one forward each (a hook on the decoder body)."""
    from erm import EndoRM, SentenceRM, lm

    model, tok = lm.load(None, torch.float32)
    rm = SentenceRM(model, tok, max_length=max_length)
    endo = EndoRM(model, tok, max_length=max_length)
    prompts = [p.prompt for p in pairs] * 2
    resp = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ex = rm.encode_many(prompts, resp)
    encs = [endo.encode(p, r) for p, r in zip(prompts, resp)]
    for e, s in zip(ex, encs):
        assert e.ids == s.ids, "EndoRM and SentenceRM encode the pair differently"
    grabbed = {}
    hook = model.get_decoder().register_forward_hook(
        lambda m, a, out: grabbed.__setitem__("h", out.last_hidden_state))
    states, endo_sum = [None] * len(ex), [0.0] * len(ex)
    side = getattr(tok, "padding_side", "right")
    t0 = time.perf_counter()
    try:
        for idx in lm.length_batches([len(e.ids) for e in ex], batch):
            rewards = endo.encoded_stats([encs[i] for i in idx])[0]
            h, width = grabbed["h"], grabbed["h"].shape[1]
            for row, i in enumerate(idx):
                off = width - len(ex[i].ids) if side == "left" else 0
                a = ex[i].ends[0]
                states[i] = h[row, off + a:off + len(ex[i].ids)].to(torch.float16).cpu()
                endo_sum[i] = float(rewards[row].sum())
    finally:
        hook.remove()
    return {"states": states, "ends": [[k - e.ends[0] for k in e.ends] for e in ex],
            "endo": torch.tensor(endo_sum), "n_tokens": [len(e.ids) for e in ex],
            "seconds": time.perf_counter() - t0}


def save_cache(cache: dict, path: Path) -> None:
    """Write one chunk of the cache as safetensors (states float16, lengths, EndoRM sums)."""
    from safetensors.torch import save_file

    flat = torch.cat(cache["states"])
    lens = torch.tensor([s.shape[0] for s in cache["states"]])
    save_file({"states": flat, "lengths": lens, "endo": cache["endo"]}, str(path),
              metadata={"ends": json.dumps(cache["ends"]),
                        "n_tokens": json.dumps(cache["n_tokens"]),
                        "seconds": str(cache["seconds"])})


def load_cache(path: Path) -> dict:
    """Read one chunk written by `save_cache`."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        flat, lens, endo = (f.get_tensor(k) for k in ("states", "lengths", "endo"))
    return {"states": list(torch.split(flat, lens.tolist())), "ends": json.loads(meta["ends"]),
            "endo": endo, "n_tokens": json.loads(meta["n_tokens"]),
            "seconds": float(meta["seconds"])}


CHUNK = 40


def cached_pairs(pairs, folder: Path, max_length: int, compute: bool) -> dict:
    """The cache of the pairs, in chunks of CHUNK pairs (folder/chunk-K.safetensors, computed
    when missing and `compute`); without `compute`, the leading chunks present. Sequences are
    indexed chosen 0..n−1, rejected n..2n−1 over the pairs cached."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for k in range(0, len(pairs), CHUNK):
        path = folder / f"chunk-{k // CHUNK:03d}-{max_length}.safetensors"
        if not path.is_file():
            if not compute:
                break
            save_cache(encode_and_cache(pairs[k:k + CHUNK], max_length), path)
            print(f"  cached pairs {k}..{min(len(pairs), k + CHUNK) - 1}", flush=True)
        parts.append(load_cache(path))
    halves = [len(p["states"]) // 2 for p in parts]
    out = {"states": [], "ends": [], "n_tokens": [], "endo": [],
           "seconds": sum(p["seconds"] for p in parts)}
    for side in (0, 1):
        for p, h in zip(parts, halves):
            sl = slice(side * h, (side + 1) * h)
            out["states"] += p["states"][sl]
            out["ends"] += p["ends"][sl]
            out["n_tokens"] += p["n_tokens"][sl]
            out["endo"].append(p["endo"][sl])
    out["endo"] = torch.cat(out["endo"]) if out["endo"] else torch.empty(0)
    out["n_pairs"] = sum(halves)
    return out


VARIANTS = {  # name: (aggregate, SentenceHead / training options)
    "attention": ("attention", {}),
    "sum": ("sum", {}),
    "last": ("last", {}),
    "attention, random value-head init": ("attention", {"random_value": True}),
    "sum, random value-head init": ("sum", {"random_value": True}),
    "last, random value-head init": ("last", {"random_value": True}),
    "attention, no RoPE": ("attention", {"rope": False}),
    "attention, uniform weights": ("attention", {"freeze_query": True}),
    "attention, d=16": ("attention", {"attn_dim": 16}),
    "attention, standardised states": ("attention", {"standardise": True}),
    "attention, projections at lr/10": ("attention", {"proj_lr": 0.1}),
    "attention, projections at lr/100": ("attention", {"proj_lr": 0.01}),
    "attention, unit query/keys × 4": ("attention", {"qk_norm": 4.0}),
    "attention × K, query 0 at init": ("attention", {"times_k": True, "zero_query": True}),
}


def bounded_head(hidden: int, attn_dim: int, scale: float):
    """A SentenceHead whose attention logits are scale·cos(q, k_k): the query and the keys
    L2-normalised after the rotary embedding, so no weight can exceed e^(2·scale) times
    another."""
    import math as _math

    from erm.sentence_rm import SentenceHead

    class Bounded(SentenceHead):
        def forward(self, states, n):
            b, m, _ = states.shape
            states = states.float()
            v = self.value(states).squeeze(-1)
            idx = torch.arange(m - 1)
            valid = idx[None, :] < n[:, None]
            v = v * torch.cat([torch.ones_like(valid[:, :1]), valid], 1)
            r = (v[:, 1:] - v[:, :-1]) * valid
            last_h = states.gather(1, n[:, None, None].expand(b, 1, states.shape[-1]))
            q = self.query(last_h)
            keys = self.key(states[:, 1:])
            q = F.normalize(q, dim=-1)
            keys = F.normalize(keys, dim=-1)
            logits = scale * (q * keys).sum(-1)
            w = torch.softmax(logits.masked_fill(~valid, float("-inf")), -1)
            w = torch.where(valid, w, torch.zeros_like(w))
            return (w * r).sum(-1), r, w, v
    del _math
    return Bounded(hidden, "attention", attn_dim, rope=False)


def markers(cache, i: int) -> torch.Tensor:
    """(K+1, D) float32 marker states end_0..end_K of cached sequence i."""
    return cache["states"][i][cache["ends"][i]].float()


def rewards(head, cache, idx) -> torch.Tensor:
    """(len(idx),) R of cached sequences; × K (the sentence count) for the "× K" variants."""
    states = [markers(cache, i) for i in idx]
    if getattr(head, "stats", None) is not None:
        mu, sd = head.stats
        states = [(s - mu) / sd for s in states]
    n = torch.tensor([s.shape[0] - 1 for s in states])
    r = head(torch.nn.utils.rnn.pad_sequence(states, batch_first=True), n)[0]
    return r * n if getattr(head, "times_k", False) else r


def train_head(variant, cache, train_idx, n_pairs, args, seed):
    """A SentenceHead trained on the cached marker states of the training pairs."""
    from erm.sentence_rm import SentenceHead

    agg, opts = VARIANTS[variant]
    torch.manual_seed(seed)
    if opts.get("qk_norm"):
        head = bounded_head(cache["states"][0].shape[1], opts.get("attn_dim", 256),
                            opts["qk_norm"])
    else:
        head = SentenceHead(cache["states"][0].shape[1], agg,
                            attn_dim=opts.get("attn_dim", 256), rope=opts.get("rope", True))
    head.times_k = bool(opts.get("times_k"))
    if not opts.get("random_value"):  # as erm.train_sentence_rm starts it
        torch.nn.init.zeros_(head.value.weight)
    head.stats = None
    if opts.get("standardise"):  # per-dimension mean and sd of the training marker states
        m = torch.cat([markers(cache, i) for i in list(train_idx) +
                       [n_pairs + i for i in train_idx]])
        head.stats = (m.mean(0), m.std(0).clamp_min(1e-3))
    if opts.get("freeze_query") or opts.get("zero_query"):
        torch.nn.init.zeros_(head.query.weight)
        head.query.weight.requires_grad_(not opts.get("freeze_query"))
    params = [p for p in head.parameters() if p.requires_grad]
    proj = [p for n, p in head.named_parameters() if p.requires_grad and n.startswith(("query",
                                                                                      "key"))]
    rest = [p for n, p in head.named_parameters() if p.requires_grad and not n.startswith(
        ("query", "key"))]
    opt = torch.optim.AdamW([{"params": rest}, {"params": proj, "lr": args.head_lr * opts.get(
        "proj_lr", 1.0)}] if proj else rest, lr=args.head_lr, weight_decay=0.0)
    gen = random.Random(seed)
    n_batches = math.ceil(len(train_idx) / 8)
    total = n_batches * args.epochs
    warm = int(round(0.1 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / (warm + 1) if s < warm
                                              else 0.5 * (1 + math.cos(math.pi * min(
                                                  1.0, (s - warm) / max(1, total - warm)))))
    head.train()
    for _ in range(args.epochs):
        order = list(train_idx)
        gen.shuffle(order)
        for k in range(0, len(order), 8):
            b = order[k:k + 8]
            r = rewards(head, cache, b + [n_pairs + i for i in b])
            loss = -F.logsigmoid(r[:len(b)] - r[len(b):]).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    return head.eval()


@torch.no_grad()
def accuracy(head, cache, idx, n_pairs) -> float:
    """Share of pairs idx whose chosen response scores higher (a tie counts half)."""
    c = rewards(head, cache, list(idx))
    r = rewards(head, cache, [n_pairs + i for i in idx])
    return float(((c > r).double() + 0.5 * (c == r).double()).mean())


@torch.no_grad()
def saturation(head, cache, idx, n_pairs):
    """Among the held-out responses of two or more sentences: the mean largest attention weight,
    and the share of them whose largest weight exceeds 0.95 (one sentence decides R)."""
    top = []
    for i in list(idx) + [n_pairs + i for i in idx]:
        m = markers(cache, i)
        if m.shape[0] > 2:
            top.append(float(head(m[None], torch.tensor([m.shape[0] - 1]))[2].max()))
    return {"mean_max_weight": sum(top) / len(top),
            "share_above_0.95": sum(t > 0.95 for t in top) / len(top), "responses": len(top)}


def summarise(values):
    """mean, sd (n − 1), min, max of a list of numbers, and the list."""
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / max(1, len(values) - 1))
    return {"mean": m, "sd": sd, "min": min(values), "max": max(values), "values": values}


def paired(results) -> dict:
    """Per variant, the per-seed differences (same split, same held-out pairs) to EndoRM and to
    "last", in accuracy points: mean, sd, range."""
    endo = [r["held_out"] for r in results["EndoRM (untrained, sum)"]]
    last = [r["held_out"] for r in results.get("last", [])]
    out = {}
    for k, v in results.items():
        mine = [r["held_out"] for r in v]
        out[k] = {"minus_endorm": summarise([100 * (a - b) for a, b in zip(mine, endo)])}
        if last:
            out[k]["minus_last"] = summarise([100 * (a - b) for a, b in zip(mine, last)])
    return out


def main(argv=None) -> int:
    """The command line (see the module doc)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output folder")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--pairs", type=int, default=600)
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--max-length", type=int, default=320)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--cache", help="hidden-state cache folder (default OUT_DIR/cache): "
                                    "chunks read when present, else computed")
    ap.add_argument("--cached-only", action="store_true",
                    help="compute nothing: use the leading chunks already cached")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs, skipped, usable = read_pairs(args.data, args.pairs, args.max_length)
    cache = cached_pairs(pairs, Path(args.cache) if args.cache else out / "cache",
                         args.max_length, not args.cached_only)
    n = cache["n_pairs"]
    if n <= args.train:
        raise SystemExit(f"only {n} pairs cached: fewer than --train {args.train} + held-out")
    results = {v: [] for v in args.variants}
    results["EndoRM (untrained, sum)"] = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        order = list(range(n))
        random.Random(1000 + seed).shuffle(order)
        tr, held = order[:args.train], order[args.train:]
        e = cache["endo"]
        results["EndoRM (untrained, sum)"].append(
            {"seed": seed, "held_out": float(((e[held] > e[[n + i for i in held]]).double()
                                              ).mean())})
        for v in args.variants:
            head = train_head(v, cache, tr, n, args, seed)
            results[v].append({"seed": seed, "held_out": accuracy(head, cache, held, n),
                               "train": accuracy(head, cache, tr, n)})
            if VARIANTS[v][0] == "attention":
                results[v][-1]["attention"] = saturation(head, cache, held, n)
            print(f"seed {seed} {v:28s} held-out {100 * results[v][-1]['held_out']:.1f}% "
                  f"train {100 * results[v][-1]['train']:.1f}%", flush=True)
    summary = {"data": f"{Path(args.data).name}: {usable} usable pairs ({skipped} skipped), {n} used: "
                       f"per seed {args.train} train / {n - args.train} held out",
               "model": "SmolLM2-135M-Instruct (embedded), frozen, float32, CPU",
               "date": time.strftime("%Y-%m-%d", time.gmtime()),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
               "settings": vars(args), "cache_seconds": cache["seconds"],
               "train_seconds": time.perf_counter() - t0,
               "mean_tokens": sum(cache["n_tokens"]) / len(cache["n_tokens"]),
               "held_out": {k: summarise([r["held_out"] for r in v]) for k, v in results.items()},
               "train": {k: summarise([r["train"] for r in v]) for k, v in results.items()
                         if v and "train" in v[0]},
               "paired": paired(results),
               "one_sentence_decides": {
                   k: summarise([r["attention"]["share_above_0.95"] for r in v])
                   for k, v in results.items() if v and "attention" in v[0]},
               "runs": results}
    (out / "srm_realdata.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, out / "srm_realdata.png", n - args.train, len(args.seeds))
    for k, s in summary["held_out"].items():
        print(f"{k:28s} {100 * s['mean']:.1f}% ± {100 * s['sd']:.1f} "
              f"[{100 * s['min']:.1f}, {100 * s['max']:.1f}]")
    return 0


def plot(summary, path: Path, n_held: int, n_seeds: int) -> None:
    """Horizontal bars of the held-out accuracy, mean ± sd over seeds, each seed a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["held_out"])
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5))
    for y, k in enumerate(names):
        s = summary["held_out"][k]
        ax.barh(y, 100 * s["mean"], xerr=100 * s["sd"], color="#4c72b0" if "Endo" not in k
                else "#dd8452", alpha=0.8)
        ax.plot([100 * v for v in s["values"]], [y] * len(s["values"]), "k.", ms=4)
        ax.text(100 * s["max"] + 1, y, f"{100 * s['mean']:.1f}%", va="center", fontsize=8)
    ax.axvline(50, color="grey", lw=0.8, ls="--")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlim(30, 90)
    ax.invert_yaxis()
    ax.set_xlabel(f"held-out pair accuracy (%), {n_held} pairs, mean ± sd over {n_seeds} seeds")
    ax.set_title(f"HH-RLHF harmless, frozen SmolLM2-135M, CPU, {summary['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
