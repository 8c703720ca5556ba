"""Helpers shared by the benches: median of many runs, floors measured in the same run, the
versions of what ran, and small random models (nothing imported from tests/)."""
import functools
import statistics
import time

import torch


def eager_stats(z, t):
    """The plain PyTorch peer: logprob, lse and entropy per row of logits z (N, V), in float32."""
    zf = z.float()
    lse = torch.logsumexp(zf, -1)
    logp = zf - lse.unsqueeze(-1)
    lp = logp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, lse, ent


def add_common_args(ap, *, reps):
    """The options every ratio bench takes: shape (N, V), dtype, device, repetitions, peers,
    outputs."""
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default=None, help="cuda (default) or cpu for a smoke run")
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile peer")
    ap.add_argument("--plot", help="also draw the ratios to the floors as a PNG here")
    ap.add_argument("--json", help="also write the results here")


def add_model_args(ap):
    """The options of a random Qwen2-shaped model, Qwen2.5-0.5B's shape by default: --layers
    24, --hidden 896, --heads 14, --kv-heads 2, --intermediate 4864, --vocab 151936."""
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=4864)
    ap.add_argument("--vocab", type=int, default=151936)


def bench_device(requested, bench_name):
    """The device to measure on: `requested` ("cuda" / "cpu"), else the GPU; None, after saying
    so, when nothing was requested and there is no GPU (these are GPU benchmarks)."""
    if requested is not None:
        return torch.device(requested)
    if not torch.cuda.is_available():
        print(f"{bench_name}: no CUDA device; this is a GPU benchmark "
              "(pass --device cpu for a smoke run)")
        return None
    return torch.device("cuda")


def proc_kib(field):
    """VmRSS / VmHWM (peak RSS) of this process in KiB from /proc/self/status (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Reset the process's peak RSS (VmHWM) so the next reading covers only what follows;
    False where Linux's /proc/self/clear_refs is not writable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, *, warmup=5, reps=30):
    """Median wall time of fn() in ms (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, nbytes=2 * 2**30):
    """Device-to-device copy bandwidth in bytes/ms, counting bytes read plus bytes written."""
    nbytes = min(nbytes, 256 * 2**20) if device.type == "cpu" else nbytes
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, reps=20)
    return 2 * nbytes / ms


def peak_extra_mib(fn, device, base_bytes):
    """Peak memory allocated during fn() beyond `base_bytes`, in MiB (CUDA only)."""
    if device.type != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base_bytes) / 2**20


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


PEER_DISTS = ("triton", "erm", "transformers", "liger-kernel", "cut-cross-entropy", "trl",
              "quack-kernels", "nvidia-cutlass-dsl")


def versions():
    """{name: version} of torch, its CUDA, and each of PEER_DISTS that is installed."""
    from importlib import metadata

    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for dist in PEER_DISTS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def bench_meta(device, **fields):
    """The `meta` of a results JSON: {device, date, versions, floors: {}} plus `fields`."""
    import datetime

    return dict(device=device_name(device), date=datetime.date.today().isoformat(),
                versions=versions(), floors={}, **fields)


def save_json(path, meta, rows):
    """Write {meta, rows} to `path` (also after each row, so a run stopped by a time limit
    leaves the rows it measured; `report` writes the final file with the ratios)."""
    import json

    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


def report(header: str, rows, meta, *, json_path=None, plot_path=None, title="",
           targets=(None, None)):
    """Fill each row's ratios to the floors in `meta` (floor_fwd_ms, floor_fwdbwd_ms, also
    collected under meta["floors"]), print the header line and a markdown table, and optionally
    dump {meta: {device, date, versions, floors, ...}, rows} as JSON and draw the ratios as a PNG
    (`plot_ratios`, `title` formatted with meta)."""
    meta.setdefault("versions", versions())
    meta.setdefault("floors", {}).update(fwd_ms=meta["floor_fwd_ms"],
                                         fwdbwd_ms=meta["floor_fwdbwd_ms"])
    for r in rows:
        r["fwd_ratio"] = r["fwd_ms"] / meta["floor_fwd_ms"]
        r["fwdbwd_ratio"] = r["fwdbwd_ms"] / meta["floor_fwdbwd_ms"]
    print(header)
    print("| op | fwd ms | fwd / floor | fwd+bwd ms | fwd+bwd / floor | peak extra MiB (fwd+bwd) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['fwd_ms']:.3f} | {r['fwd_ratio']:.2f}x | {r['fwdbwd_ms']:.3f} | "
              f"{r['fwdbwd_ratio']:.2f}x | {r['extra_mib']:.0f} |")
    if json_path:
        save_json(json_path, meta, rows)
    if plot_path and rows:
        plot_ratios(rows, meta, plot_path, title.format(**meta), targets)


def plot_ratios(rows, meta, path, title, targets=(None, None)):
    """Bar chart of each op's time over its floor (forward; forward+backward), with the
    targets as dashed lines, saved as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.55 * len(rows) + 1.8), sharey=True)
    for ax, key, label, target in zip(axes, ("fwd_ratio", "fwdbwd_ratio"),
                                      ("forward / floor", "forward+backward / floor"), targets):
        vals = [r[key] for r in rows]
        colors = ["tab:blue" if n.startswith("erm") else "tab:gray" for n in names]
        ax.barh(range(len(rows)), vals, color=colors)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.2f}x", va="center", fontsize=9)
        ax.axvline(1.0, color="black", lw=1)
        if target:
            ax.axvline(target, color="tab:red", ls="--", lw=1, label=f"target {target}x")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel(label)
        ax.set_xlim(0, max(vals + [target or 0, 1.0]) * 1.25)
    axes[0].set_yticks(range(len(rows)))
    axes[0].set_yticklabels(names)
    axes[0].invert_yaxis()
    fig.suptitle(f"{title} — {meta['device']}, {meta['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ small random models
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Berlin is the capital of Germany. Madrid is the capital of Spain.",
    "You are a helpful assistant. Answer the question briefly and correctly.",
    "The quick brown fox jumps over the lazy dog. 1. First item\n2. Second item",
    "def add(a, b):\n    return a + b\nprint(add(2, 3))",
    "I think the answer is 4. Two plus two equals four. It is not five.",
]


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tk.to_str()


def small_tokenizer():
    """A fast byte-level BPE tokenizer trained in memory (~0.1 s, about 400 tokens, any text
    encodes) with a ChatML chat template: eos "<|im_end|>", pad "<pad>". Nothing downloaded."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<pad>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def random_causal_lm(arch="qwen2", *, vocab, hidden=32, layers=2, heads=4, kv_heads=2,
                     intermediate=None, max_positions=2048, tie=True, seed=0, device="cpu"):
    """A randomly initialised LlamaForCausalLM / Qwen2ForCausalLM (float32, eval mode, sdpa
    attention, ids 1/2/3 = bos/eos/pad) built on `device`. Qwen2.5-0.5B's shape: hidden 896,
    layers 24, heads 14, kv_heads 2, intermediate 4864, vocab 151936, tie=True."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if arch not in classes:
        raise ValueError(f"arch must be 'llama' or 'qwen2', got {arch!r}")
    cfg_cls, cls = classes[arch]
    cfg = cfg_cls(vocab_size=vocab, hidden_size=hidden,
                  intermediate_size=intermediate or 2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                  rope_theta=1e6)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(cfg)
    return model.float().eval()
