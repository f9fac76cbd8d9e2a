"""Passkey retrieval on more than one prompt: look-alike keys, other words, real prose, a baseline.

passkey.py, the demo, runs the paper's prompt. This runs the same test on variants of it, so
that no setting is judged on one prompt alone:
  --distractors N  hides N more keys under other labels ("The pass key for Oslo is ..."), spread
                   evenly over the haystack; the question names the asked key's label. A trial's
                   outcome: yes, wrong key (a distractor's) or no key.
  --wording W      the key's line and its question in other words: passkey (the paper's), code,
                   number
  --haystack H     what the key hides in: filler (the paper's), facts (other repeated
                   sentences), book (War and Peace, lab/book.py: real prose)
  --attention ...  longheads, full, both (full and longheads), truncated: full attention on the
                   task line and as much of the prompt's end as the trained length holds, which
                   finds only the keys that end holds: the bar with no long context at all
  --diagnose       one trial looked inside (lab/diagnose.py), with full attention for contrast
  --plot, --replot a depth x length heatmap of the trials, or of --json records already made
With one key, the paper's wording and the filler, a prompt is passkey.py's, token for token.

    python -m lab.needles --len 16384 --distractors 3
    python -m lab.needles --len 8192 --wording code --haystack facts --attention both
    python -m lab.needles --len 16384 --haystack book --attention longheads truncated \\
        --json lab/results/F.json --plot F.png
    python -m lab.needles --diagnose --len 16384 --depths 0.5 --setting paper --plot chunks.png
    python -m lab.needles --replot lab/results/passkey-full-filler.json --plot heat.png
"""
import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from convert import load
from lab.common import check_model_args, made_by, printout_head, run_main
from passkey import (FILLER, NEEDLE, NEW_TOKENS, QUESTION, SETTINGS, WHY, UsageError, answer,
                     check_memory, first_integer, progress, task_head, trial_key,
                     write_atomically)

# a key's line (the key twice) and the question for it; {what} is what the key is: "pass key",
# or with --distractors "pass key for Lisbon". "passkey" is the paper's, the demo's words
WORDINGS = {
    "passkey": (NEEDLE.replace("pass key", "{what}"), QUESTION.replace("pass key", "{what}"),
                "pass key"),
    "code": ("\nThe {what} is {key}. Write it down: the {what} is {key}.\n",
             "\nWhat is the {what}? The {what} is", "secret code"),
    "number": ("\nMy {what} is {key}. Keep it in mind, my {what} is {key}.\n",
               "\nWhat is my {what}? My {what} is", "lucky number"),
}
# --distractors: every key gets a label. Places, not people, so that none is a name in War and
# Peace; each one token for the default tokenizer, so that every question about one document has
# the same length (prompt_parts)
LABELS = ("Lisbon", "Oslo", "Cairo", "Lima", "Perth", "Tokyo", "Denver", "Dublin")
# sentences repeated to any length; "filler" is the paper's, "facts" a second one in other words
FILLERS = {
    "filler": FILLER,
    "facts": (" Rivers run down to the sea. Bread rises in a warm oven. Owls hunt at night. "
              "Ice melts in the spring sun. A kettle sings when the water boils."),
}
HAYSTACKS = (*FILLERS, "book")


# ----------------------------------------------------------------------------- the prompt

class Needle(NamedTuple):
    """A key hidden in the prompt: after `depth` of the haystack, under a label or none."""
    depth: float
    key: int
    label: str | None = None  # None: the paper's prompt, one key and no label


def needle_text(wording, needle):
    """The needle's key line and the question that asks for it, in the wording's words."""
    line, question, what = WORDINGS[wording]
    what = what if needle.label is None else f"{what} for {needle.label}"
    return line.format(what=what, key=needle.key), question.format(what=what)


def trial_needles(seed, length, depth, trial, distractors=0):
    """The keys of one trial, the asked one first, at `depth`; then `distractors` more under other
    labels, spread evenly over the haystack from it (depth + j / (distractors + 1), wrapped).

    A key and a label belong to a place, not to a trial: the trials whose keys sit at the same
    places (with 3 distractors, the depths 0, 0.25, 0.5 and 0.75) hide the same document and ask
    for different keys of it, so they share its prefill."""
    if not distractors:
        return [Needle(depth, trial_key(seed, length, depth, trial))]
    n = distractors + 1
    depths = [depth] + [round((depth + j / n) % 1.0, 6) for j in range(1, n)]
    places = sorted(depths)  # what the trials of one document share
    labels = random.Random(f"{seed}-{length}-{places}-{trial}").sample(LABELS, n)
    needle = {}
    for d, label in zip(places, labels):
        key = trial_key(seed, length, d, trial)
        while key in [other.key for other in needle.values()]:  # distinct: the later moves on
            key = key % 89999 + 10001  # stays five digits
        needle[d] = Needle(d, key, label)
    return [needle[d] for d in depths]


def prompt_parts(tok, length, needles, haystack="filler", wording="passkey"):
    """The prompt of `length` tokens with each needle's key line after its depth of the haystack
    and, at the end, the question for the first needle's key, in two parts: (what trials can
    share, the rest). With one key, the shared part is all before the key line (passkey.py's
    parts); with distractors, all before the question: the trials that ask for different keys
    of one document share it. A key line goes between whole filler sentences, or at a line break
    of the book."""
    head = task_head(tok)
    lines = [tok.continuation(needle_text(wording, n)[0]) for n in needles]
    question = tok.continuation(needle_text(wording, needles[0])[1])
    # why the longest question: the document must not depend on which of its keys is asked (a
    # question shorter than another needle's leaves the prompt that much shorter)
    longest = max(len(tok.continuation(needle_text(wording, n)[1])) for n in needles)
    room = length - len(head) - sum(map(len, lines)) - longest  # tokens of haystack
    if room < 0:
        raise UsageError(f"--len {length} is shorter than the prompt's fixed parts "
                         f"({length - room} tokens): use a larger length")
    hay, cut = haystack_tokens(tok, haystack, room)
    places = [cut(n.depth * room) for n in needles]
    ids, done = list(head), 0
    for place, i in sorted(zip(places, range(len(needles)))):  # by place, then the asked first
        ids += hay[done:place]
        if i == 0:
            split = len(ids)  # where the asked key's line starts
        ids += lines[i]
        done = place
    ids += hay[done:room] + question
    if len(needles) > 1:
        split = len(ids) - len(question)
    return ids[:split], ids[split:]


def build_prompt(tok, length, needles, haystack="filler", wording="passkey"):
    """Token ids of exactly `length` tokens with the needles' key lines and the question."""
    shared, rest = prompt_parts(tok, length, needles, haystack, wording)
    return shared + rest


def haystack_tokens(tok, haystack, room):
    """At least `room` tokens of the haystack, and where a key line may go: cut(i) is the last
    allowed place <= i (always one at 0)."""
    if haystack in FILLERS:
        filler = tok.continuation(FILLERS[haystack])
        whole = room // len(filler)  # the key line never sits in the cut-off last sentence
        return filler * (whole + 1), lambda i: min(round(i / len(filler)), whole) * len(filler)
    from lab.book import book_tokens
    ids = book_tokens(tok, room)
    line_break = lambda j: j == 0 or tok.decode(ids[j - 1:j]).endswith("\n")  # after a line
    return ids, lambda i: next(j for j in range(round(i), -1, -1) if line_break(j))


def truncated_parts(tok, parts, keep, question):
    """The `truncated` baseline's prompt from a prompt's parts: the task line and the prompt's
    last `keep` tokens, again as (shared, rest). The rest starts where it started in the whole
    prompt if the cut kept that place; else it is the question (`question`: its ids), and the
    shared part is the same for every key cut away."""
    shared, rest = parts
    ids, head = shared + rest, len(task_head(tok))
    cut = max(head, len(ids) - keep)
    rest_at = head + len(shared) - cut  # where the rest starts in the truncated prompt
    ids = ids[:head] + ids[cut:]
    split = rest_at if rest_at >= head else len(ids) - len(question)
    return ids[:split], ids[split:]


def key_digits(tok, ids, needle, wording="passkey"):
    """Positions of a needle's digit tokens in a prompt (both times its line writes the key)."""
    line = tok.continuation(needle_text(wording, needle)[0])
    start = next(i for i in range(len(ids)) if ids[i:i + len(line)] == line)
    return [start + j for j, t in enumerate(line) if tok.decode([t]).strip().isdigit()]


# ----------------------------------------------------------------------------- the trials

def trial_prompts(model, tok, length, trials, attention, args):
    """Each trial's needles and the (shared, rest) parts of its prompt, trials given as lists of
    needles (the asked first), in order of their places: so the shared part of one trial is the
    next one's, or a prefix of it, or the next one starts anew (passkey.answer)."""
    for needles in sorted(trials, key=lambda ns: (sorted(n.depth for n in ns), ns[0].depth)):
        parts = prompt_parts(tok, length, needles, args.haystack, args.wording)
        if attention == "truncated":  # the answer stays inside the trained length too
            keep = model.config.max_position_embeddings - NEW_TOKENS - len(task_head(tok))
            question = tok.continuation(needle_text(args.wording, needles[0])[1])
            parts = truncated_parts(tok, parts, keep, question)
        yield needles, parts


def prefill_work(prompts):
    """Tokens that passkey.answer runs through the model for these prompts (the progress bar's
    whole): the shared parts it does not hold yet, the rests, the new tokens."""
    held, work = [], 0
    for shared, rest in prompts:
        held = held if shared[:len(held)] == held else []
        work += max(0, len(shared) - len(held)) + len(rest) + NEW_TOKENS
        held = shared if len(shared) > len(held) else held
    return work


def sweep(args):
    """Every trial of every --len and --attention: records of what the model answered."""
    model, tok = load_model(args)
    print(header(model, args))
    runs = []  # (length, attention, [(needles, (shared, rest))]): every prompt, made up front
    for length in args.len:
        trials = [trial_needles(args.seed, length, depth, t, args.distractors)
                  for depth in args.depths for t in range(args.trials)]
        for attention in attentions(args):
            runs.append((length, attention, list(trial_prompts(model, tok, length, trials,
                                                               attention, args))))
    records = []
    with progress(model, sum(prefill_work([p for _, p in ps]) for *_, ps in runs)):
        for length, attention, prompts in runs:
            model.attention = "full" if attention == "truncated" else attention
            answers = answer(model, [parts for _, parts in prompts])
            for (needles, _), (ids, seconds) in zip(prompts, answers):
                records.append(record(tok.decode(ids), needles, seconds, length=length,
                                      attention=attention, **settings(model),
                                      haystack=args.haystack, wording=args.wording,
                                      model=model_name(args), **args.made))
                tqdm.write(trial_line(records[-1]))
                if args.json:
                    write_atomically(args.json, json.dumps(records, indent=1))
    print("\n" + summary(records))
    if args.plot:
        plot(records, args.plot)
    return records


def run_diagnosis(args):
    """--diagnose: one prompt, looked inside (lab/diagnose.py), with full attention for contrast
    on a prompt of half the trained length. The printout's first line is its command."""
    from lab.diagnose import diagnose
    model, tok = load_model(args)
    length, depth, short = args.len[0], args.depths[0], model.config.max_position_embeddings // 2
    needles = trial_needles(args.seed, length, depth, 0, args.distractors)
    prompts = [build_prompt(tok, n, needles, args.haystack, args.wording)
               for n in (length, short)]
    tensors = [torch.tensor([p], device=args.device) for p in prompts]
    others = "".join(f", {n.label}'s {n.key} at {n.depth}" for n in needles[1:])
    print(printout_head("lab.needles", args.argv))
    print(f"key {needles[0].key} at depth {depth}{others}; LongHeads {describe(model)}, "
          f"{args.haystack}, wording {args.wording}")
    digits = [[key_digits(tok, p, n, args.wording) for n in needles] for p in prompts]
    diagnose(model, tok, tensors[0], digits[0], tensors[1], digits[1], plot_file=args.plot)


# ----------------------------------------------------------------------------- records

def record(output, needles, seconds, **run):
    """One trial's JSON record: the run's fields, the asked key and label, the distractors, the
    output and its outcome (outcome())."""
    asked, *others = needles
    result = outcome(output, needles)
    return dict(**run, depth=asked.depth, key=asked.key, label=asked.label,
                distractors=[n._asdict() for n in others], output=output, outcome=result,
                correct=result == "yes", seconds=round(seconds, 2))


def outcome(output, needles):
    """"yes" when the output's first integer is the asked key, "wrong key" when it is another
    needle's (a distractor's), "no key" when it is neither, or there is none."""
    answered = first_integer(output)
    if answered == needles[0].key:
        return "yes"
    return "wrong key" if answered in {n.key for n in needles[1:]} else "no key"


def settings(model):
    """The LongHeads settings a record was made with (none for full attention)."""
    if model.attention == "full":
        return {}
    return dict(chunk_size=model.chunk_size, num_chunks=model.num_chunks)


def trial_line(r):
    """The trial's columns under the header's; "ok" is the outcome where distractors could make
    it a wrong key, else yes or no (passkey.py's)."""
    ok = f"{r['outcome']:<9}" if r["distractors"] else f"{'yes' if r['correct'] else 'no':<3}"
    return (f"{r['length']:>7} {r['depth']:>5.2f}  {r['attention']:<9}  {r['key']:>5}  "
            f"{r['output'][:24]!r:<24} {ok} {r['seconds']:>7.1f}")


def summary(records):
    """Accuracy per (attention, length), with the misses that were a distractor's key, and the
    seconds per trial with the shared work spread."""
    lines, cells = ["accuracy"], {}
    for r in records:
        cells.setdefault((r["attention"], r["length"]), []).append(r)
    for (attention, length), rs in sorted(cells.items()):
        ok, n = sum(r["correct"] for r in rs), len(rs)
        wrong = sum(r["outcome"] == "wrong key" for r in rs)
        misses = f" ({wrong} wrong key, {n - ok - wrong} no key)" if rs[0]["distractors"] else ""
        lines.append(f"  {attention:<9} {length:>7}: {ok}/{n} = {ok / n:.0%}{misses}, "
                     f"{sum(r['seconds'] for r in rs) / n:.1f} s per trial")
    return "\n".join(lines)


def header(model, args):
    """The run: the model and the prompts; the LongHeads setting and why; the columns."""
    distractors = f", {args.distractors} distractors" if args.distractors else ""
    lines = [f"model {model_name(args)} (trained at {model.config.max_position_embeddings}), "
             f"haystack {args.haystack}, wording {args.wording}{distractors}, {args.device} "
             f"{str(model.lm_head.weight.dtype)[6:]}"]
    if "longheads" in attentions(args):
        custom = args.chunk_size is not None or args.num_chunks is not None
        other = next(name for name in SETTINGS if name != args.setting)
        lines += [f"LongHeads, {'custom' if custom else args.setting} setting: "
                  f"{describe(model)}",
                  f"  why: {'set by the flags' if custom else WHY[args.setting]}",
                  f"  --setting {other}: {WHY[other].split(':')[0]}"]
    ok = 9 if args.distractors else 3
    lines.append(f"{'length':>7} {'depth':>5}  {'attention':<9}  {'key':>5}  {'output':<24} "
                 f"{'ok':<{ok}} {'seconds':>7}")
    return "\n".join(lines)


def describe(model):
    return f"chunk_size={model.chunk_size} num_chunks={model.num_chunks}"


def model_name(args):
    return args.model or "SmolLM2-135M-Instruct"


# ----------------------------------------------------------------------------- the heatmap

def replot(files, plot_file):
    """The heatmap of trials already run, from their records."""
    if not plot_file:
        raise UsageError("--replot draws to a file: add --plot F.png")
    plot([r for f in files for r in json.loads(Path(f).read_text())], plot_file)


def plot(records, file):
    """A depth x length accuracy heatmap per attention, like the paper's figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = sorted({r["attention"] for r in records})
    lengths, depths = sorted({r["length"] for r in records}), sorted({r["depth"] for r in records})
    figsize = (1.2 * len(lengths) * len(kinds) + 2, 0.5 * len(depths) + 2)
    fig, axes = plt.subplots(1, len(kinds), figsize=figsize, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        cells = [[[r["correct"] for r in records
                   if (r["attention"], r["length"], r["depth"]) == (kind, n, d)]
                  for n in lengths] for d in depths]  # (depths, lengths) lists of outcomes
        ax.imshow([[mean(c) for c in row] for row in cells], cmap="RdYlGn", vmin=0, vmax=1,
                  aspect="auto")
        for i, row in enumerate(cells):
            for j, c in enumerate(row):
                if c:  # a blank cell was not run
                    ax.text(j, i, f"{sum(c)}/{len(c)}", ha="center", va="center")
        ax.set(title=kind, xlabel="context length", ylabel="depth", xticks=range(len(lengths)),
               yticks=range(len(depths)), xticklabels=[f"{n // 1024}k" for n in lengths],
               yticklabels=[f"{d:.2f}" for d in depths])
    fig.tight_layout()
    fig.savefig(file + ".tmp.png")
    os.replace(file + ".tmp.png", file)


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- the command

def attentions(args):
    """--attention's kinds in order, "both" being full and longheads, each once."""
    kinds = [k for a in args.attention for k in (["full", "longheads"] if a == "both" else [a])]
    return list(dict.fromkeys(kinds))


def load_model(args):
    """The model of --model (or the default) and its tokenizer, with the LongHeads setting where
    a run needs it, checked against the arguments before any work: memory, the lengths."""
    kinds = ["longheads", "full"] if args.diagnose else attentions(args)
    options = dict(attention="full")
    if "longheads" in kinds:
        options = dict(SETTINGS[args.setting], attention="longheads", offload=args.offload)
        options.update({k: v for k, v in [("chunk_size", args.chunk_size),
                                          ("num_chunks", args.num_chunks)] if v is not None})
    model, tok = load(args.model, args.device, args.dtype, **options)
    for kind in kinds:
        model.attention = "full" if kind == "truncated" else kind
        if kind == "longheads" and args.offload:
            continue  # keys and values in host memory, which check_memory does not estimate
        check_memory(model, longest_prompt(args, kind, model.config.max_position_embeddings))
    for length in args.len:  # too short: raises before a trial
        build_prompt(tok, length, trial_needles(0, length, 0.0, 0, args.distractors),
                     args.haystack, args.wording)
    return model, tok


def longest_prompt(args, kind, trained):
    """The most tokens a prompt of this attention holds: truncated keeps the trained length at
    most, and --diagnose's full attention reads a prompt of half of it."""
    if kind == "truncated":
        return min(max(args.len), trained)
    return trained // 2 if args.diagnose and kind == "full" else max(args.len)


def check_args(args):
    if not all(0.0 <= d <= 1.0 for d in args.depths):
        raise UsageError(f"--depths must lie in [0, 1], got {args.depths}")
    if min(args.len) < 1 or args.trials < 1:
        raise UsageError(f"--len and --trials must be >= 1, got {min(args.len)}, {args.trials}")
    if not 0 <= args.distractors < len(LABELS):
        raise UsageError(f"--distractors must lie in [0, {len(LABELS) - 1}] (one label each), "
                         f"got {args.distractors}")
    check_model_args(args)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lab.needles",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Hugging Face Llama directory (default: SmolLM2-135M)")
    p.add_argument("--len", type=int, nargs="+", default=[4096], help="prompt lengths in tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="where the asked key sits, as fractions of the haystack")
    p.add_argument("--trials", type=int, default=1, help="keys per (length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", nargs="+", choices=["longheads", "truncated", "full", "both"],
                   default=["longheads"], help="truncated: full attention on the task line and "
                   "the prompt's last tokens, up to the trained length; both: full and longheads")
    p.add_argument("--setting", choices=SETTINGS, default="retrieval",
                   help="LongHeads' budget: retrieval (the demo's) or paper (the paper's rule); "
                   "--chunk-size and --num-chunks override it")
    p.add_argument("--chunk-size", type=int, help="tokens per chunk")
    p.add_argument("--num-chunks", type=int, help="chunks per head (the paper's rule: trained "
                   "length / chunk size)")
    p.add_argument("--haystack", choices=HAYSTACKS, default="filler",
                   help="what the key hides in: the paper's filler, other repeated sentences "
                   "(facts) or War and Peace (book)")
    p.add_argument("--wording", choices=WORDINGS, default="passkey",
                   help="the key's line and its question: the paper's (passkey) or another")
    p.add_argument("--distractors", type=int, default=0, help="hide this many more keys under "
                   "other labels; the question names the asked key's label (default 0: one key)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--offload", action="store_true", help="keep LongHeads' keys and values in "
                   "pinned CPU memory (CUDA): longer contexts")
    p.add_argument("--diagnose", action="store_true", help="look inside one trial (the first "
                   "length and depth): which heads pick the key, their attention on it, the "
                   "top-5 next tokens")
    p.add_argument("--json", help="write one record per trial to this file")
    p.add_argument("--plot", help="write a depth x length accuracy heatmap (PNG); with "
                   "--diagnose, the chunks every layer and head read")
    p.add_argument("--replot", nargs="+", metavar="JSON", help="no run: draw the heatmap of the "
                   "trials in these --json files (to --plot)")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.made = made_by("lab.needles", args.argv)
    return args


def run(args):
    if args.replot:
        return replot(args.replot, args.plot)
    check_args(args)
    return run_diagnosis(args) if args.diagnose else sweep(args)


def main(argv=None):
    return run_main("lab.needles", run, parse_args(argv))


if __name__ == "__main__":
    main()
