"""The drift report of a conversion: ``conversion.json``, ``conversion.md`` and ``drift.png``.

Figures, on the held-out text, of the student with every norm swapped against the teacher:

- ``embedding_cosine``: mean over sequences of cos(pool(S), pool(T)) of the last hidden
  state (mean pooling over unmasked tokens, as sentence-transformers does);
- ``relative_error``: mean over tokens of ‖S_t − T_t‖ / ‖T_t‖ on the last hidden state;
- ``layer_cosine``: per layer (the embeddings first), the mean token cosine of the hidden state;
- ``kl`` (models with logits): mean over tokens of KL(T ‖ S) in nats.
"""

from __future__ import annotations

from pathlib import Path

from ..training.checkpoints import CHECKPOINT_DIR, write_json_atomic

RESULT_FILE = "conversion.json"  # written last: its presence means the conversion finished
ARGS_FILE = "convert_args.json"
REPORT_FILE = "conversion.md"
PLOT_FILE = "drift.png"
MODEL_DIR = "model"
OWN_FILES = (RESULT_FILE, ARGS_FILE, REPORT_FILE, PLOT_FILE, CHECKPOINT_DIR, MODEL_DIR)


def summarize(sums: dict) -> dict:
    """Per-batch sums from ``distill.drift`` -> means."""
    out = {"sequences": sums["sequences"], "tokens": sums["tokens"]}
    if "embedding_cosine" in sums:
        out["embedding_cosine"] = sums["embedding_cosine"] / sums["sequences"]
        out["relative_error"] = sums["relative_error"] / sums["tokens"]
    if "kl" in sums:
        out["kl"] = sums["kl"] / sums["kl_count"]
    if "agreement" in sums:  # a classifier: the share of predictions the student keeps
        out["agreement"] = sums["agreement"] / sums["kl_count"]
    if "lm_tokens" in sums:  # nats per predicted token on the held-out text itself
        out["teacher_lm_loss"] = sums["teacher_lm_loss"] / sums["lm_tokens"]
        out["student_lm_loss"] = sums["student_lm_loss"] / sums["lm_tokens"]
    if "layer_cosine" in sums:
        out["layer_cosine"] = [c / sums["tokens"] for c in sums["layer_cosine"]]
    return out


def _headline(figures: dict) -> str:
    parts = []
    if "kl" in figures:
        parts.append(f"KL {figures['kl']:.4g} nats/token")
    if "embedding_cosine" in figures:
        parts.append(f"embedding cosine {figures['embedding_cosine']:.4f}")
        parts.append(f"relative error {figures['relative_error']:.4f}")
    return ", ".join(parts)


def markdown(result: dict) -> str:
    naive, conv = result["naive"], result["converted"]
    lines = [f"# Conversion of `{result['teacher']}` to {result['norm']['norm']}", "",
             "- norm options: " + ", ".join(f"{k}={v}" for k, v in result["norm"].items() if k != "norm"),
             f"- distilled on `{result['dataset']}` with the `{result['objective']}` objective, schedule "
             f"`{result['schedule']}`, {result['steps']} steps ({result['seconds'] / 60:.1f} min)",
             f"- drift measured on {result['eval_sequences']} held-out sequences", ""]
    if result["exact_without_training"]:
        lines += ["Every norm folded exactly: the swapped model already computes the original function, "
                  "so no training was needed.", ""]
    if result.get("worse_than_naive"):
        lines += ["**Warning: the converted model is farther from the original than the naive swap.** The "
                  "distillation made it worse (a learning rate too high for this model?): do not use it; convert "
                  "again with a lower --learning_rate.", ""]
    start = result.get("start")
    columns = [("naive swap", naive)] + ([("rescaled start", start)] if start else []) + [("after conversion", conv)]
    if start:
        lines += [f"{len(result['rescaled'])} post-LN norms started from the rescaled student "
                  "(hf_adanorm/convert/rescale.py) and were swapped at step 0.", ""]
    lines += ["| | " + " | ".join(c for c, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key, label in (("embedding_cosine", "mean-pooled embedding cosine"),
                       ("relative_error", "relative error of the last hidden state"),
                       ("kl", "KL(teacher ‖ student), nats per " + ("sequence" if "agreement" in conv else "token")),
                       ("agreement", "share of the teacher's predicted classes kept"),
                       ("student_lm_loss", "held-out next-token loss, nats/token "
                                           "(the original's: {teacher_lm_loss:.4g})")):
        if key in conv:
            lines.append(f"| {label.format(**conv)} | " + " | ".join(f"{f[key]:.4g}" for _, f in columns) + " |")
    if "layer_cosine" in conv:
        lines += ["", "Per layer (hidden states; 0 = embeddings), mean token cosine to the teacher:", "",
                  "| layer | " + " | ".join(c for c, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {i} | " + " | ".join(f"{f['layer_cosine'][i]:.4f}" for _, f in columns) + " |"
                  for i in range(len(conv["layer_cosine"]))]
    if result["history"]:
        lines += ["", f"![drift against steps]({PLOT_FILE})"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = result["history"]
    key = "kl" if "kl" in result["converted"] else "embedding_cosine"
    label = {"kl": "KL(teacher || student), nats/token", "embedding_cosine": "embedding cosine to the teacher"}[key]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    first = (result.get("start") or result["naive"])[key]  # step 0: the rescaled start where there is one
    ax.plot([0] + [h["step"] for h in history], [first] + [h[key] for h in history],
            marker="o", ms=3, label="fully swapped")
    ax.axhline(result["naive"][key], ls=":", c="gray", label=f"naive swap ({result['naive'][key]:.3g})")
    if key == "kl":
        ax.set_yscale("log")
    alpha = ax.twinx()
    alpha.plot([0] + [h["step"] for h in history], [result.get("start_alpha", 0.0)] + [h["mean_alpha"] for h in history], c="tab:orange",
               alpha=0.5, lw=1)
    alpha.set_ylabel("mean blend α", color="tab:orange")
    alpha.set_ylim(-0.05, 1.05)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(label)
    ax.set_title(f"{result['teacher'].rstrip('/').split('/')[-1]} -> {result['norm']['norm']} ({result['schedule']})")
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_reports(out: Path, result: dict) -> None:
    if result["history"]:
        plot(result, out / PLOT_FILE)
    tmp = out / f".tmp-{REPORT_FILE}"
    tmp.write_text(markdown(result))
    tmp.replace(out / REPORT_FILE)
    write_json_atomic(out / RESULT_FILE, result)
