"""Build a local lm-eval "which comes next" task from a held-out text (--task, default shakespeare_nextline).

- shakespeare_nextline: from the held-out plays (below).
- pydocs_nextsentence: from the Python HOWTOs (assets/data/pydocs_howto.jsonl, tools/get_modern_text.py), a
  modern text from neither training source: the previous sentences (up to 3, within 320 characters) and four
  candidate next sentences, the true one and three from the *other* HOWTOs, binned as below with the bigram
  prior taken from the handbook's training chapters (modern English, never asked about).

Each question: the last few lines of a play as printed (speaker tags, blank lines) and four candidate
next lines: the true one and three distractors from the *other* held-out plays. A small LM's score for a
line is dominated by how likely the line is on its own, whatever the context; so distractors come from
the answer's bin of similar character length and similar log-probability under a smoothed token bigram
model of the *training* plays (a weight-free stand-in for that prior). Model-free baselines (longest,
shortest, most likely under the bigram) then score ~25%, and what decides the answer is the context.
The plays were never seen by assets/tiny_llama.

Deterministic (seeded). Writes tasks/nextline/<task>.jsonl; the yaml and the loader beside it are hand-written.
Run from anywhere:  python tools/make_nextline_task.py [--task pydocs_nextsentence]
"""
import argparse
import functools
import json
import math
import os
import random
import re
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "assets", "data")
# task: (source text, text of the bigram prior only); the output is tasks/nextline/<task>.jsonl
TASKS = {"shakespeare_nextline": ("shakespeare_eval.jsonl", "shakespeare_train.jsonl"),
         "pydocs_nextsentence": ("pydocs_howto.jsonl", "handbook_train.jsonl")}
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")

SPEAKER = re.compile(r"^[A-Z][A-Z0-9 .,'&-]*\.\s*$")  # "BRUTUS.", "FIRST CITIZEN.", "CALPURNIA. "
HEADING = re.compile(r"^(ACT|SCENE|Scene)\b|^by William Shakespeare|^PERSONS REPRESENTED|^Dramatis")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def play_lines(src):
    """[(play, lines)] with the text split back into lines (chunks were cut at blank lines)."""
    chunks = read_jsonl(src)
    plays = []
    for chunk in chunks:
        title = re.match(r"([A-Z][A-Z ]+).*\n\nby William Shakespeare\n", chunk)  # a play's first chunk
        if title:
            plays.append((title.group(1).strip().lower().replace(" ", "_"), []))
        plays[-1][1].extend(chunk.split("\n") + [""])
    return plays


def is_speech(line):
    s = line.strip()
    return bool(s) and not SPEAKER.match(s) and not HEADING.match(s) and not s.startswith("[") \
        and not s.endswith("]") and s.upper() != s  # all-caps lines are titles / cast lists


def bigram_logprob(train):
    """Line -> log-probability under an interpolated token bigram model of a training text."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "assets", "tiny_llama"))
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    uni, bi = Counter(), Counter()
    for text in read_jsonl(train):
        ids = encode(text)
        uni.update(ids)
        bi.update(zip(ids, ids[1:]))
    n, v = sum(uni.values()), len(uni) + 1

    @functools.cache
    def logprob(s):
        ids = encode(s)
        return sum(math.log(0.7 * bi[a, b] / max(uni[a], 1) + 0.3 * (uni[b] + 1) / (n + v))
                   for a, b in zip([None] + ids, ids))
    return logprob


def play_units(src, args):
    """(pool, targets) of the plays: every speech line a possible distractor (len, play, text); a target is
    (play, line index, context, true line)."""
    pool, targets = [], []
    for play, lines in play_lines(src):
        start = next(i for i, l in enumerate(lines) if l.startswith("ACT"))  # skip the cast list
        for i in range(start, len(lines)):
            s = lines[i].strip()
            if not is_speech(s) or len(s) < args.min_chars:
                continue
            pool.append((len(s), play, s))
            # Context: back to the `context_lines`-th non-blank line, blank lines kept (the text as the
            # model saw it in training), then whole lines dropped from the front to fit the char cap.
            j, nonblank = i, 0
            while j > start and nonblank < args.context_lines:
                j -= 1
                nonblank += bool(lines[j].strip())
            ctx = [l.rstrip() for l in lines[j:i]]
            while ctx and (not ctx[0] or len("\n".join(ctx)) > args.max_context_chars):
                ctx.pop(0)
            if sum(map(bool, ctx)) >= 2 and any(map(is_speech, ctx)):
                targets.append((play, i, "\n".join(ctx) + "\n", s))
    return pool, targets


def sentence_units(src, args):
    """(pool, targets) of a prose text, one document per jsonl line: every sentence of min_chars..max_chars a
    possible distractor; a target's context is the previous sentences of its document (up to context_lines,
    within max_context_chars, a paragraph break kept as a blank line). A sentence ending in ":" introduced a code
    block the text left out: it is neither asked for nor context."""
    pool, targets = [], []
    for d, doc in enumerate(read_jsonl(src)):
        sents = [(p, s.strip()) for p, par in enumerate(doc.split("\n\n")) for s in SENTENCE_END.split(par)]
        for i, (par, s) in enumerate(sents):
            if not args.min_chars <= len(s) <= args.max_sentence_chars or not s[0].isupper() or s.endswith(":"):
                continue
            pool.append((len(s), d, s))
            ctx, j = "", i
            while j > 0 and i - j < args.context_lines:
                sep = " " if sents[j - 1][0] == sents[j][0] else "\n\n"
                longer = sents[j - 1][1] + sep + ctx
                if len(longer) > args.max_context_chars or sents[j - 1][1].endswith(":"):  # code followed it
                    break
                ctx, j = longer, j - 1
            if ctx:
                targets.append((d, i, ctx, s))
    return pool, targets


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="shakespeare_nextline")
    ap.add_argument("--n", type=int, default=800, help="number of questions")
    ap.add_argument("--context_lines", type=int, default=None, help="non-blank lines (sentences) of context "
                    "(default: 6 lines of a play, 3 sentences of prose)")
    ap.add_argument("--max_sentence_chars", type=int, default=200, help="prose: longest sentence asked for")
    ap.add_argument("--max_context_chars", type=int, default=320)
    ap.add_argument("--min_chars", type=int, default=24, help="shortest line asked for or used as distractor")
    ap.add_argument("--len_bin", type=float, default=0.1, help="width of a length bin, in log(chars)")
    ap.add_argument("--prior_bins", type=int, default=12, help="bigram-prior bins per length bin")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default=None, help="default: tasks/nextline/<task>.jsonl")
    args = ap.parse_args()
    args.context_lines = args.context_lines or (6 if args.task == "shakespeare_nextline" else 3)
    args.out = args.out or os.path.join(ROOT, "tasks", "nextline", f"{args.task}.jsonl")
    rng = random.Random(args.seed)
    src, prior_text = (os.path.join(DATA, f) for f in TASKS[args.task])
    prior = bigram_logprob(prior_text)
    units = play_units if args.task == "shakespeare_nextline" else sentence_units
    pool, targets = units(src, args)
    # Distractors share the answer's bin: length (10% wide in log chars) x quantile of the bigram prior
    # per char within that length. Bins are fixed in advance, not centred on each answer, so within a
    # bin the answer and its distractors are exchangeable: no "pick the middle one" shortcut either.
    by_len = {}
    for t in sorted({p[2] for p in pool}, key=lambda t: (prior(t) / len(t), t)):
        by_len.setdefault(round(math.log(len(t)) / args.len_bin), []).append(t)
    bin_of = {t: (b, r * args.prior_bins // len(ts)) for b, ts in by_len.items() for r, t in enumerate(ts)}
    bins = {}
    for _, play, text in sorted(set(pool)):
        bins.setdefault(bin_of[text], []).append((play, text))

    # Distractors from the other plays (nothing from the question's own scene), distinct, not the answer.
    others = lambda play, true: sorted({t for p, t in bins[bin_of[true]] if p != play and t != true})
    targets = [t for t in targets if len(others(t[0], t[3])) >= 3]  # drops a few very long/short lines
    chosen = sorted(rng.sample(range(len(targets)), min(args.n, len(targets))))
    with open(args.out, "w", encoding="utf-8") as f:
        for k in chosen:
            play, line_no, context, true = targets[k]
            distractors = rng.sample(others(play, true), 3)
            label = rng.randrange(4)
            choices = distractors[:label] + [true] + distractors[label:]
            f.write(json.dumps({"id": f"{play}:{line_no + 1}", "context": context, "choices": choices,
                                "label": label}, ensure_ascii=False) + "\n")
    print(f"wrote {len(chosen)} of {len(targets)} possible questions to {args.out} "
          f"({os.path.getsize(args.out) / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
