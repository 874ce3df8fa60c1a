"""The reproduction's outputs: <table>.json (a list of rows), <table>.md and <table>.png (tiny_table, smollm2_table)."""
import os

from utils.evaluate import write_json
from utils.io import atomic_write

METHODS = ("RTN", "SmoothQuant", "GPTQ", "LLM-QAT", "QAT-real")


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(rows, targets, mode, s):
    head = ("| Method | W-A-KV | Training data | Held-out ppl ↓ | Next-line acc ↑ | acc_norm |\n"
            "|---|---|---|---|---|---|\n")
    line = "| {method} | {bits} | {data} | {ppl} | {acc} | {acc_norm} |\n"

    def table(subset):
        return head + "".join(line.format(**{**r, "ppl": fmt(r["ppl"]), "acc": fmt(100 * r["acc"], 1),
                                             "acc_norm": fmt(None if r["acc_norm"] is None else 100 * r["acc_norm"], 1)})
                              for r in subset)

    main = [r for r in rows if r["method"] in ("FP", *METHODS)]
    ablation = [r for r in rows if r["bits"] == "4-8-4" and r["method"] not in ("FP", *METHODS)]
    ablation = [r for r in rows if r["bits"] == "4-8-4" and r["method"] == "LLM-QAT"] + ablation
    ablation += [r for r in rows if r["bits"] == "4-8-4" and r["method"] == "QAT-real"]
    rec, ratio = targets["recovered_gap_4-8-4"], targets["llm_qat_8-8-8_over_fp"]
    return (f"# LLM-QAT at small scale: the embedded 4M-parameter LLaMA ({mode} run)\n\n"
            f"Trained rows: {s['blocks']} blocks of 256 tokens x {s['epochs']} epoch(s), batch 4, lr {s['lr']}, "
            "KD from the FP model. Held-out ppl: windows of 256 tokens over three plays never seen in training"
            + ("" if not s["eval_windows"] else f" (the first {s['eval_windows']})") +
            "; next-line acc: zero-shot 4-way choice of the true next line (local lm-eval task "
            f"shakespeare_nextline{'' if not s['limit'] else ', first ' + str(s['limit']) + ' questions'}).\n\n"
            + table(main) +
            "\n## Ablations at W4-A8-KV4 (same token count)\n\n" + table(ablation) +
            "\n## Targets\n\n"
            f"- LLM-QAT 4-8-4 recovers {fmt(None if rec is None else 100 * rec, 1)}% of the perplexity gap RTN 4-8-4 "
            f"opens against FP (target: at least 70%).\n"
            f"- LLM-QAT 8-8-8 perplexity is {100 * (ratio - 1):+.2f}% relative to FP (target: within 3%).\n")


def plot(rows, path, title=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bits = list(dict.fromkeys(r["bits"] for r in rows if r["method"] in METHODS))
    fp = next((r for r in rows if r["method"] == "FP"), None)
    if fp is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, label, scale in ((axes[0], "ppl", "held-out perplexity (lower is better)", 1),
                                  (axes[1], "acc", "next-line accuracy % (higher is better)", 100)):
        width = 0.8 / len(METHODS)
        for k, method in enumerate(METHODS):
            vals = [scale * next((r[key] for r in rows if r["method"] == method and r["bits"] == b), float("nan"))
                    for b in bits]
            ax.bar([i + (k - (len(METHODS) - 1) / 2) * width for i in range(len(bits))], vals, width, label=method)
        ax.axhline(scale * fp[key], color="black", linestyle="--", linewidth=1, label="FP")
        ax.set_xticks(range(len(bits)), [f"W{b.replace('-', ' A', 1).replace('-', ' KV')}" for b in bits])
        ax.set_ylabel(label)
        values = [scale * r[key] for r in rows]
        lo, hi = min(values), max(values)
        ax.set_ylim(lo - 0.15 * (hi - lo + 1e-9), hi + 0.15 * (hi - lo + 1e-9))
    axes[0].legend()
    fig.suptitle((title or "LLM-QAT on the embedded 4M-parameter LLaMA") + ": FP, RTN, SmoothQuant, GPTQ, "
                 "LLM-QAT (generated data), QAT on real text")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown_real(rows, targets, mode, s, profile, pending):
    """The real model's table: one perplexity column per held-out text."""
    texts = list(profile.ppl_texts)
    head = ("| Method | W-A-KV | Training data | " + " | ".join(f"ppl {t} ↓" for t in texts)
            + " | Next-line acc ↑ |\n|" + "---|" * (4 + len(texts)) + "\n")

    def table(subset):
        return head + "".join(
            f"| {r['method']} | {r['bits']} | {r['data']} | "
            + " | ".join(fmt(r.get("ppl_by_text", {}).get(t)) for t in texts)
            + f" | {fmt(100 * r['acc'], 1)} |\n" for r in subset)

    main = [r for r in rows if r["method"] in ("FP", *METHODS)]
    ablation = [r for r in rows if r["bits"] == "4-8-4" and r["method"].startswith("LLM-QAT")]
    choice = s.get("lr_choice")
    lr = (f"lr {choice['lr']:g}, chosen on milton_valid (Paradise Regained) from "
          + ", ".join(f"{k}: ppl {v}" for k, v in choice["tried"].items()) + f" after {choice['blocks']} blocks"
          if choice else f"lr {s['lr']}")
    lines = [f"# LLM-QAT on {profile.title} ({mode} run)\n",
             f"Trained rows: {s['blocks']} blocks of 256 tokens x {s['epochs']} epoch(s) "
             f"({s['blocks'] * 256 * s['epochs']} tokens), batch 4, {lr}; KD from the FP model, bf16 autocast with "
             "fp32 master weights. Held-out ppl: windows of 256 tokens"
             + (f" (the first {s['eval_windows']} per text)" if s["eval_windows"] else "")
             + "; next-line acc: zero-shot 4-way choice of the true next line (lm-eval task shakespeare_nextline"
             + (f", first {s['limit']} questions" if s["limit"] else "") + ", chance 25%).\n",
             table(main), "\n## Generation ablation at W4-A8-KV4 (same token count)\n\n", table(ablation)]
    if pending:
        lines.append("\n## Pending rows (not computed yet; rerun to continue)\n\n"
                     + ", ".join(f"{m} {b}" for m, b in pending) + "\n")
    rec = targets.get("recovered_gap_4-8-4_by_text", {})
    lines.append("\n## Targets\n\n- LLM-QAT 4-8-4 recovers of the gap RTN 4-8-4 opens against FP (target >= 70%): "
                 + ", ".join(f"{t} {pct(v)}" for t, v in rec.items()) + ".\n")
    ratio = targets.get("llm_qat_8-8-8_over_fp")
    lines.append(f"- LLM-QAT 8-8-8 vs FP (target within 3%): {'-' if ratio is None else f'{100 * (ratio - 1):+.2f}%'}.\n")
    for other in ("GPTQ", "SmoothQuant", "QAT-real"):
        won = targets.get(f"llm_qat_beats_{other}", {})
        lines.append(f"- LLM-QAT below {other}: " + ", ".join(
            f"{b} {'-' if v is None else 'yes' if v else 'no'}" for b, v in won.items()) + ".\n")
    order = targets.get("ablation_in_paper_order")
    lines.append(f"- Generation ablation hybrid <= pure sampling <= pure greedy: "
                 f"{'-' if order is None else 'yes' if order else 'no'}.\n")
    return "\n".join(lines[:2]) + "\n" + "".join(lines[2:])


def write_report(rows, targets, mode, s, out_dir, profile=None, pending=()):
    os.makedirs(out_dir, exist_ok=True)
    stem = "tiny_table" if profile is None else profile.table
    write_json(os.path.join(out_dir, f"{stem}.json"), rows)
    with atomic_write(os.path.join(out_dir, f"{stem}.md")) as f:
        if stem == "tiny_table":
            f.write(markdown(rows, targets, mode, s))
        else:
            f.write(markdown_real(rows, targets, mode, s, profile, pending))
    if rows:
        plot(rows, os.path.join(out_dir, f"{stem}.png"), None if profile is None or stem == "tiny_table"
             else f"LLM-QAT on {profile.title}")
