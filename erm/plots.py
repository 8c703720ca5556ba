"""Figures of erm's runs, drawn with matplotlib (Agg, imported on first use).

`plot_curves`: the per-step curves of an RL run (`erm.rl.Trainer`, `erm rl --plot` →
out/curves.png) from the records of its log.jsonl.
"""
from pathlib import Path
from typing import List

#: (record key, panel title) of each panel of `plot_curves`, in reading order.
CURVES = (("reward", "endogenous reward Σr_t"), ("accuracy", "verifiable accuracy"),
          ("kl", "KL(π‖ref) (k3)"), ("entropy", "entropy / token"),
          ("response_len", "response length"), ("clip_frac", "clip fraction"))


def plot_curves(records: List[dict], path) -> Path:
    """PNG of the per-step curves (reward, accuracy, KL, entropy, length, clip fraction).

    Args:
        records: one dict per step with "step" and every key of `CURVES` (floats), as
            `erm.rl.Trainer.step` returns them.
        path: the image file to write (its folder is created).
    Returns:
        the path written.
    """
    missing = sorted({k for k, _ in CURVES + (("step", ""),) for r in records if k not in r})
    if missing:
        raise ValueError(f"plot_curves: records lack {', '.join(missing)}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, (k, title) in zip(axes.flat, CURVES):
        ax.plot(steps, [r[k] for r in records], marker="o", ms=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
