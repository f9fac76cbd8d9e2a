"""Perplexity by position on a real book: does the model still predict well past its trained length?

The LongHeads paper's other headline. One long stretch of War and Peace (lab/book.py) goes through
the model in one prefill; every position t gets the negative log-likelihood (NLL) of token t + 1,
and the NLLs are averaged in buckets of position: [0, 1k), [1k, 2k), [2k, 4k), [4k, 8k), ...
A RoPE model's NLL jumps once positions pass its trained length; an attention that extends the
context keeps the later buckets as low as the ones inside it (lower, even: more text to go on).

    python -m lab.perplexity --len 16384                  # full attention and LongHeads, 16k
    python -m lab.perplexity --len 8192 16384 32768 --attention full longheads window \\
        --json F.json --plot F.png
    python -m lab.perplexity --replot lab/results/perplexity-16384.json --plot F.png

Attentions: "full" (SDPA over everything), "longheads" (--chunk-size, --num-chunks; by default
the paper's rule), and "window": LongHeads' budget and positions with no chunk chosen by its
content. Every query reads chunk 0 and the newest K - 1 chunks (its own up to itself), laid side
by side as LongHeads lays out its picks (WindowCache): the baseline that tells whether choosing
chunks earns anything. Attention is causal, so for one start the buckets of a shorter --len are
those of a longer one.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from convert import default_model, load
from lab.common import check_model_args, made_by, run_main
from longheads import CHUNK_SIZE, apply_rope, rope_cos_sin
from model import PREFILL_PIECE, read_json
from passkey import UsageError, check_memory, progress, write_atomically

ATTENTIONS = ("full", "longheads", "window")
LOGIT_BLOCK = 1024  # positions per output-layer call: (1024, vocab) logits at a time
# the options of records made before they were removed from the library, as their defaults
OLD_OPTIONS = dict(layout="position", select="summary", local_chunks=2, select_layers=None,
                   full_chunks=None)


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


# ----------------------------------------------------------------------------- the window

class WindowCache(torch.nn.Module):
    """One layer's keys and values for the window, called as model.py's caches are: q (B, H, T,
    D), k, v (B, Hkv, T, D) before RoPE -> (B, H, T, D).

    A query in chunk g reads chunk 0 and chunks g - K + 2 .. g (its own up to itself), at the
    positions LongHeads gives the picks [0, g - K + 2, ..., g] (longheads.reference_query): the
    window keeps its distances to the query and chunk 0 sits right before it. While g < K that
    is every token at its true position, as full attention reads it."""

    def __init__(self, batch, num_kv_heads, max_len, head_dim, *, chunk_size, num_chunks,
                 inv_freq, dtype, device):
        super().__init__()
        self.w, self.K, self.length = chunk_size, num_chunks, 0
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.register_buffer("k", torch.zeros(batch, num_kv_heads, max_len, head_dim, dtype=dtype,
                                              device=device), persistent=False)
        self.register_buffer("v", torch.zeros_like(self.k), persistent=False)

    def forward(self, q, k, v):
        s, e = self.length, self.length + q.shape[2]
        # keys before RoPE: where a key sits depends on the query that reads it
        self.k[:, :, s:e], self.v[:, :, s:e] = k, v
        self.length = e
        out = torch.empty_like(q)
        a = s
        while a < e:  # the queries of one chunk at a time: they read the same keys
            b = min(e, (a // self.w + 1) * self.w)
            out[:, :, a - s:b - s] = self.attend(q[:, :, a - s:b - s], a, b)
            a = b
        return out

    def attend(self, q, a, b):
        """Queries a..b-1 of one chunk g, q (B, H, b - a, D), against chunk 0 and the window."""
        w, dev, dt = self.w, q.device, torch.promote_types(q.dtype, torch.float32)
        shift = max(0, (a // w - self.K + 1) * w)  # how far back the window's positions move
        keys = torch.cat([torch.arange(min(w, b)), torch.arange(shift + w, b)]).to(dev)  # (n,)
        cos, sin = rope_cos_sin(self.inv_freq, torch.where(keys < w, keys, keys - shift), dt)
        k = apply_rope(self.k[:, :, keys], cos, sin)  # (B, Hkv, n, D)
        t = torch.arange(a, b, device=dev)  # (b - a,): the queries' tokens
        cos, sin = rope_cos_sin(self.inv_freq, t - shift, dt)
        causal = keys <= t[:, None]  # (b - a, n)
        return F.scaled_dot_product_attention(apply_rope(q, cos, sin), k, self.v[:, :, keys],
                                              attn_mask=causal, enable_gqa=True)


def window_caches(model, max_len):
    """One WindowCache per layer, with the model's chunk size and chunks per head."""
    cfg, weight = model.config, model.lm_head.weight
    seen = min(max_len, model.chunk_size * model.num_chunks)  # the furthest position a query sees
    return torch.nn.ModuleList([
        WindowCache(1, cfg.num_key_value_heads, max_len, cfg.head_dim, chunk_size=model.chunk_size,
                    num_chunks=model.num_chunks, inv_freq=cfg.inv_freq(seen), dtype=weight.dtype,
                    device=weight.device) for _ in range(cfg.num_hidden_layers)])


def new_caches(model, attention, length):
    """Empty caches of one prefill of `length` tokens with this attention."""
    if attention == "window":
        return window_caches(model, length)
    model.attention = attention
    return model.new_caches(1, length)


# ----------------------------------------------------------------------------- the run

@torch.no_grad()
def token_nll(model, ids, caches):
    """ids (1, T) -> (T - 1,) float32: the NLL of token t + 1 given tokens 0..t, one prefill."""
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
    from lab.book import book_tokens
    head = tok.encode("")
    body = length - len(head)
    ids = book_tokens(tok, docs * body)
    return [head + ids[i * body:(i + 1) * body] for i in range(docs)]


def settings(model, attention):
    """The LongHeads settings a record was made with (the window's budget is LongHeads')."""
    return {} if attention == "full" else dict(chunk_size=model.chunk_size,
                                               num_chunks=model.num_chunks)


def evaluate(model, tok, args):
    """One record per (length, document, attention), printed as a table as they come."""
    records = []
    for length in args.len:
        edges = bucket_edges(length)
        names = [bucket_name(a, b) for a, b in zip(edges, edges[1:])]
        print(f"\n{length} tokens, mean NLL (nats) by position\n{'doc':>3} {'attention':<10}"
              + "".join(f"{n:>11}" for n in names) + f"{'seconds':>9}", flush=True)
        for doc, ids in enumerate(documents(tok, length, args.docs)):
            for attention in args.attention:
                start = time.perf_counter()
                with progress(model, length, f"{length} tokens, {attention}"):
                    caches = new_caches(model, attention, length)
                    nll = token_nll(model, torch.tensor([ids], device=args.device), caches)
                seconds = time.perf_counter() - start
                buckets = bucket_means(nll.cpu(), edges)
                records.append(dict(length=length, doc=doc, attention=attention,
                                    **settings(model, attention), buckets=buckets,
                                    seconds=round(seconds, 1), model=args.model_name,
                                    **args.made))
                tqdm.write(f"{doc:>3} {attention:<10}" + "".join(f"{b['nll']:>11.3f}"
                                                                 for b in buckets)
                           + f"{seconds:>9.0f}")
                if args.json:
                    write_atomically(args.json, json.dumps(records, indent=1))
    return records


# ----------------------------------------------------------------------------- the figure

def label(record):
    """A line's name: the attention, and any LongHeads setting that is not the default (a record
    made before the library dropped an option may name it)."""
    defaults = dict(chunk_size=CHUNK_SIZE, **OLD_OPTIONS)
    if record["attention"] == "window" and "local_chunks" in record:  # an old window record
        defaults["local_chunks"] = record["num_chunks"] - 1
    changed = [f"{k}={'-'.join(map(str, record[k])) if k == 'select_layers' else record[k]}"
               for k, v in defaults.items() if record.get(k, v) != v]  # select_layers: [a, b]
    if record.get("chunk_size", CHUNK_SIZE) != CHUNK_SIZE:  # then the number of chunks differs too
        changed.append(f"num_chunks={record['num_chunks']}")
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


# ----------------------------------------------------------------------------- the command

def load_model(args):
    """The model of --model (or the default) and its tokenizer, with LongHeads' budget where an
    attention needs it, checked against the longest --len's memory before any work."""
    options = dict(attention="full")
    if {"longheads", "window"} & set(args.attention):
        options = dict(attention="longheads" if "longheads" in args.attention else "full",
                       chunk_size=args.chunk_size, num_chunks=args.num_chunks,
                       offload=args.offload)
    model, tok = load(args.model, args.device, args.dtype, **options)
    for attention in args.attention:
        model.attention = "longheads" if attention == "longheads" else "full"  # window: as full
        if not (attention == "longheads" and args.offload):  # offloaded: in host memory
            check_memory(model, max(args.len))
    return model, tok


def trained_length(args):
    """The model's trained length, from its config alone (--replot loads no model)."""
    path = Path(args.model) if args.model else default_model()
    return read_json(path / "config.json")["max_position_embeddings"]


def check_args(args):
    if min(args.len) < 2:
        raise UsageError(f"--len must be >= 2 (one token predicts the next), got {min(args.len)}")
    if args.docs < 1:
        raise UsageError(f"--docs must be >= 1, got {args.docs}")
    check_model_args(args)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lab.perplexity",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Hugging Face Llama directory (default: SmolLM2-135M)")
    p.add_argument("--len", type=int, nargs="+", default=[16384], help="tokens per prefill")
    p.add_argument("--docs", type=int, default=1,
                   help="documents (consecutive stretches of the book)")
    p.add_argument("--attention", nargs="+", choices=ATTENTIONS, default=["full", "longheads"])
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE)
    p.add_argument("--num-chunks", type=int,
                   help="chunks per head (default: trained length / chunk size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--offload", action="store_true",
                   help="LongHeads' keys and values in CPU memory (CUDA)")
    p.add_argument("--json", help="write one record per (length, document, attention) to this file")
    p.add_argument("--plot", help="write perplexity against position (PNG; needs matplotlib)")
    p.add_argument("--replot", nargs="+", metavar="JSON", help="no run: plot the records of these "
                   "--json files together (to --plot)")
    args = p.parse_args(argv)
    args.made = made_by("lab.perplexity", argv)
    args.model_name = args.model or "SmolLM2-135M-Instruct"
    return args


def run(args):
    check_args(args)
    if args.replot:
        records = [r for f in args.replot for r in json.loads(Path(f).read_text())]
        if not args.plot:
            raise UsageError("--replot draws to a file: add --plot F.png")
        return plot(records, args.plot, trained_length(args))
    model, tok = load_model(args)  # it refuses a budget past the trained length
    records = evaluate(model, tok, args)
    if args.plot:
        plot(records, args.plot, model.config.max_position_embeddings)
    return records


def main(argv=None):
    return run_main("lab.perplexity", run, parse_args(argv),
                    interrupted="--json holds the records finished so far")


if __name__ == "__main__":
    main()
