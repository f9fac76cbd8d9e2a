"""Perplexity by position on a real book: does the model still predict well past its trained length?

The LongHeads paper's other headline. One long stretch of War and Peace (book.py) goes through the
model in one prefill; every position t gets the negative log-likelihood (NLL) of token t + 1, and
the NLLs are averaged in buckets of position: [0, 1k), [1k, 2k), [2k, 4k), [4k, 8k), [8k, 16k), ...
A RoPE model's NLL jumps once positions pass its trained length; an attention that extends the
context keeps the later buckets as low as the ones inside it (lower, even: more text to go on).

    python perplexity.py --len 16384                    # full attention and LongHeads, 16k
    python perplexity.py --len 8192 16384 32768 --attention full longheads window \
        --json F.json --plot F.png

Attentions: "full" (SDPA over everything), "longheads" (with --select, --chunk-size, ...), and
"window": LongHeads that reads chunk 0 and its newest chunks only (local_chunks = num_chunks - 1:
the same budget and positions), the baseline that tells whether choosing chunks earns anything.
Attention is causal, so for one start the buckets of a shorter --len are those of a longer one.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import passkey
from longheads import CHUNK_SIZE, LAYOUT, LAYOUTS, LOCAL_CHUNKS, SELECT
from model import PREFILL_PIECE

ATTENTIONS = ("full", "longheads", "window")
LOGIT_BLOCK = 1024  # positions per output-layer call: (1024, vocab) logits at a time


def bucket_edges(length):
    """[0, 1024, 2048, 4096, ..., length]: powers of two from 1k, the last edge the length."""
    edges, e = [0], 1024
    while e < length:
        edges.append(e)
        e *= 2
    return edges + [length]


def bucket_name(start, end):
    return f"[{kilo(start)}, {kilo(end)})"


def kilo(n):
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def bucket_means(nll, edges):
    """The mean of nll (T - 1,) over positions [edges[i], edges[i + 1]): one dict per bucket.
    (Position T - 1 has no next token, so the last bucket holds one position fewer.)"""
    return [dict(start=a, end=b, nll=nll[a:b].mean().item(), ppl=nll[a:b].mean().exp().item())
            for a, b in zip(edges, edges[1:])]


@torch.no_grad()
def token_nll(model, ids):
    """ids (1, T) -> (T - 1,) float32: the NLL of token t + 1 given tokens 0..t, one prefill."""
    caches = model.new_caches(1, ids.shape[1])
    # in Llama.prefill's pieces, the same computation as one call in less working memory
    h = torch.cat([model.hidden(ids[:, s:s + PREFILL_PIECE], caches)[0]  # (<= piece, C) each
                   for s in range(0, ids.shape[1], PREFILL_PIECE)])[:-1]  # (T - 1, C): the last
    targets = ids[0, 1:]  # position has no next token to predict
    return torch.cat([F.cross_entropy(model.lm_head(h[a:a + LOGIT_BLOCK]).float(),  # (b, vocab)
                                      targets[a:a + LOGIT_BLOCK], reduction="none")
                      for a in range(0, len(targets), LOGIT_BLOCK)])


def documents(tok, length, docs):
    """`docs` token sequences of `length` from consecutive stretches of the book, each starting
    as the model's tokenizer starts a text (with BOS where it adds one)."""
    from book import book_tokens
    head = tok.encode("")
    body = length - len(head)
    ids = book_tokens(tok, docs * body)
    return [head + ids[i * body:(i + 1) * body] for i in range(docs)]


def configure(model, attention, local_chunks):
    """Point the model at one attention: window is LongHeads reading only its newest chunks."""
    model.attention = "full" if attention == "full" else "longheads"
    model.local_chunks = model.num_chunks - 1 if attention == "window" else local_chunks


def evaluate(model, tok, args):
    """One record per (length, document, attention), printed as a table as they come."""
    records = []
    for length in args.len:
        edges = bucket_edges(length)
        names = [bucket_name(a, b) for a, b in zip(edges, edges[1:])]
        print(f"\n{length} tokens, mean NLL (nats) by position\n{'doc':>3} {'attention':<10}"
              + "".join(f"{n:>11}" for n in names) + f"{'seconds':>9}")
        for doc, ids in enumerate(documents(tok, length, args.docs)):
            for attention in args.attention:
                configure(model, attention, args.local_chunks)
                start = time.perf_counter()
                with passkey.Progress(model, length, f"{length} tokens, {attention}"):
                    nll = token_nll(model, torch.tensor([ids], device=args.device))
                seconds = time.perf_counter() - start
                buckets = bucket_means(nll.cpu(), edges)
                records.append(dict(length=length, doc=doc, attention=attention,
                                    **passkey.settings(model),
                                    buckets=buckets, seconds=round(seconds, 1),
                                    command=args.command))
                print(f"{doc:>3} {attention:<10}" + "".join(f"{b['nll']:>11.3f}" for b in buckets)
                      + f"{seconds:>9.0f}", flush=True)
                if args.json:
                    passkey.write_atomically(args.json, json.dumps(records, indent=1))
    return records


def label(record):
    """A line's name: the attention, and any LongHeads setting that is not the default."""
    defaults = dict(chunk_size=CHUNK_SIZE, layout=LAYOUT, select=SELECT, local_chunks=LOCAL_CHUNKS,
                    select_layers=None, full_chunks=None)
    if record["attention"] == "window":
        defaults["local_chunks"] = record["num_chunks"] - 1
    changed = [f"{k}={'-'.join(map(str, record[k])) if k == 'select_layers' else record[k]}"
               for k, v in defaults.items() if record.get(k, v) != v]  # select_layers: [a, b]
    return " ".join([record["attention"], *changed])


def plot(records, file, trained):
    """Perplexity against position, one line per attention and setting (the mean over
    documents), for the longest length; the trained length marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    length = max(r["length"] for r in records)
    longest = [r for r in records if r["length"] == length]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in dict.fromkeys(map(label, longest)):
        rs = [r for r in longest if label(r) == name]
        mids = [(b["start"] + b["end"]) / 2 for b in rs[0]["buckets"]]
        nll = torch.tensor([[b["nll"] for b in r["buckets"]] for r in rs]).mean(0)  # (buckets,)
        ax.plot(mids, nll.exp(), marker="o", label=name)
    ax.axvline(trained, color="gray", linestyle="--", label="trained length")
    docs = len({r["doc"] for r in longest})
    ax.set(xscale="log", xlabel="position (tokens)", ylabel="perplexity (bucket mean)",
           title=f"War and Peace, {length} tokens, {docs} document(s)")
    ax.legend()
    fig.tight_layout()
    tmp = f"{file}.tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, file)


def check_args(args):
    if min(args.len) < 2:
        raise passkey.UsageError(f"--len must be >= 2 (one token predicts the next), "
                                 f"got {min(args.len)}")
    if args.docs < 1:
        raise passkey.UsageError(f"--docs must be >= 1, got {args.docs}")
    passkey.check_model_args(args)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Hugging Face Llama directory (default: SmolLM2-135M)")
    p.add_argument("--len", type=int, nargs="+", default=[16384], help="tokens per prefill")
    p.add_argument("--docs", type=int, default=1,
                   help="documents (consecutive stretches of the book)")
    p.add_argument("--attention", nargs="+", choices=ATTENTIONS, default=["full", "longheads"])
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE)
    p.add_argument("--num-chunks", type=int,
                   help="chunks per head (default: trained length / chunk size)")
    p.add_argument("--layout", choices=LAYOUTS, default=LAYOUT)
    passkey.add_longheads_args(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--offload", action="store_true",
                   help="LongHeads' keys and values in CPU memory")
    p.add_argument("--json", help="write one record per (length, document, attention) to this file")
    p.add_argument("--plot", help="write perplexity against position (PNG; needs matplotlib)")
    p.add_argument("--replot", nargs="+", metavar="JSON", help="no run: plot the records of these "
                   "--json files together (to --plot)")
    args = p.parse_args(argv)
    args.command = " ".join(["python perplexity.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        model, tok, dtype = passkey.load_model(args)  # it refuses a budget past the trained length
        kinds = ["full" if a == "full" else "longheads" for a in args.attention]
        passkey.check_memory(model, args, kinds, dtype)
        if args.replot:
            records = [r for f in args.replot for r in json.loads(Path(f).read_text())]
        else:
            records = evaluate(model, tok, args)
        if args.plot:
            plot(records, args.plot, model.config.max_position_embeddings)
    except (passkey.UsageError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"perplexity.py: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\nperplexity.py: interrupted (--json holds the records finished so far)",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
