"""Speed and memory of LongHeads against full attention, as ratios measured in one run.

    python -m lab.bench                   # 4k, 8k, 16k: about 10 minutes on 2 CPU cores
    python -m lab.bench --lengths 8192 32768 --json bench.json
    python -m lab.bench --lengths --decode-lengths --attention-lengths 32768   # attention alone
    python -m lab.bench --lengths 8192 32768 --also 128x16   # the defaults and 128 x 16, one run
    python -m lab.bench --shape llama2-7b --device cuda --lengths 8192 32768 131072 --offload

What it measures, each in a fresh subprocess so that its peak memory is its own:
  prefill    wall time and peak memory of one prompt, full attention (SDPA) vs LongHeads, on the
             default model when it is downloaded (else a random Llama of --shape, same cost)
  decode     milliseconds per generated token after a cache of 4k and of 32k tokens, both ways
  attention  attention alone, without the linear layers: SDPA, the tiled path (tiled_attention,
             what the model runs) and the short longheads_attention, on random q, k, v and on
             the first layer's q, k, v of a real prompt (when the default model is on disk)
and the ratios that matter: t(4T) / t(T) (linear is 4, quadratic 16), longheads / full at each
length, memory(4T) / memory(T), decode(32k) / decode(4k) and longheads / full at each length,
SDPA / tiled and short / tiled.
LongHeads runs the project's defaults (longheads.py) unless --chunk-size etc. say otherwise;
--also adds settings (chunk size x chunks per head), each measured wherever LongHeads is.
The machine is shared and noisy, so targets are ratios from one run, never absolute times.
Every timing follows a short warm-up and is the median of --repeat runs (default 1: a 32k
prefill takes minutes on a CPU). On a GPU every record also has the GPU's own time, from CUDA
events around the same calls (gpu_seconds, gpu_ms_per_token; None on a CPU): a decoding step
launches hundreds of small kernels, and where the host is the bottleneck the wall time measures
the launches. --prefill-piece N feeds each prompt N tokens at a time.

    python -m lab.bench --estimate-memory   # the GPU peak on paper: llama2-7b, 131072 tokens

prints, with no measurement, the estimated GPU memory of a LongHeads prefill (default: the 7B
shape at 128k tokens, bfloat16), fed whole and in Llama.prefill's pieces (2048 tokens, what
generate and the scripts use; --prefill-piece sets another), with and
without offload, part by part: weights, keys and values, the rest of the caches, working memory
(one layer's peak, the GPU layout's code run on meta tensors: see "memory on paper" below),
and the work of a layer's last block of queries (block_flops).
On a GPU every measurement is planned so first: none starts whose estimate is over FIT of the
card; a prefill that does not fit whole runs in pieces, one that fits neither way is recorded
as skipped with the estimate's parts. --plan prints the plan, one JSON line a measurement, for
the card here or one of --gpu-memory GiB, and measures nothing. --logs DIR keeps each
measurement's whole stderr, as it comes.
"""
import argparse
import contextlib
import functools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from lab.common import command, printout_head
from longheads import CHUNK_SIZE, check_config, default_num_chunks, longheads_attention
from model import PREFILL_PIECE, KVCache, Llama, LlamaConfig
from passkey import commit, prompt_parts
from tiled import SUMMARY_TOKENS, LongHeadsCache, tiled_attention

SHAPES = {  # random-weight Llamas with the cost of real ones
    "tiny": dict(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 max_position_embeddings=4096),  # as llama2-7b
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
                    tie_word_embeddings=True),
    "llama2-7b": {},  # LlamaConfig's defaults
}
ROOT = Path(__file__).resolve().parent.parent  # the repository: measurements run from there
WARMUP_TOKENS = 512  # one short prefill first: one-time setup costs stay out of the timings
DECODE_STEPS = 8


# ----------------------------------------------------------------------------- one measurement

def load(args, mode):
    """The default model if it is on disk (never downloaded here), else random weights of --shape.
    mode: "full", "longheads", or "offload" (LongHeads with its cache in CPU memory)."""
    path = default_model(args)
    dtype = getattr(torch, args.dtype)
    opts = dict(attention="full" if mode == "full" else "longheads", chunk_size=args.chunk_size,
                num_chunks=args.num_chunks, offload=mode == "offload")
    if path is not None:
        return Llama.from_pretrained(path, device=args.device, dtype=dtype, **opts), path
    with torch.device("meta"):
        model = Llama(LlamaConfig(**SHAPES[args.shape or "smollm2"]), **opts)
    model = model.to(dtype).to_empty(device=args.device)  # dtype first: no float32 copy of a 7B
    for name, p in model.named_parameters():
        torch.nn.init.ones_(p) if "norm" in name else torch.nn.init.normal_(p, std=0.02)
    return model.eval(), None


def default_model(args):
    """The downloaded default model's directory, or None (not on disk, or --shape asks for one)."""
    from convert import CACHE
    path = CACHE / "SmolLM2-135M-Instruct"
    return path if args.shape is None and (path / "config.json").is_file() else None


def prompt(path, model, length):
    """A passkey prompt when the tokenizer is there (real text sets what LongHeads selects)."""
    if path is None:
        gen = torch.Generator().manual_seed(0)
        return torch.randint(model.config.vocab_size, (1, length), generator=gen)
    from tokenizer import Tokenizer
    shared, rest = prompt_parts(Tokenizer(path), length, 0.5, 61128)
    return torch.tensor([shared + rest])


@torch.no_grad()
def prefill(model, ids, piece=None):
    """The next token's logits after the prompt ids (1, T), fed whole or `piece` tokens at a time
    (the same caches: each piece's activations are all a layer holds at once)."""
    caches = model.new_caches(1, ids.shape[1])
    last = model.prefill(ids, caches, piece=piece or ids.shape[1])  # (1, C)
    return model.lm_head(last)  # the next token's logits only


@torch.no_grad()
def decode_steps(model, length, steps, device):
    """ms per token after `length` cached tokens, with either attention: wall, and GPU (None off
    a GPU). The caches are filled
    with random keys, values (and LongHeads' summaries): a step costs the same whatever they
    hold, and no prefill is needed."""
    cfg = model.config
    caches = model.new_caches(1, length + steps + 2)
    gen = torch.Generator(device=device).manual_seed(0)
    Hkv, D = cfg.num_key_value_heads, cfg.head_dim
    G = cfg.num_attention_heads // Hkv  # query heads per key/value head
    for cache in caches:
        for s in range(0, length, 4096):  # what a prefill stores, without its attention
            n = min(4096, length - s)
            kv = torch.randn(2, 1, Hkv, n, D, generator=gen, device=device)  # (2, B, Hkv, n, D)
            if hasattr(cache, "summaries"):  # LongHeads: its summaries need the queries too
                q = torch.randn(1, Hkv, G, n, D, generator=gen, device=device)  # (B, Hkv, G, n, D)
                kv = kv.to(cache.kv.k.dtype)
                cache._store(q.to(kv.dtype), kv[0], kv[1])
            else:
                kv = kv.to(cache.k.dtype)
                cache.k[:, :, s:s + n], cache.v[:, :, s:s + n] = kv[0], kv[1]
                cache.length = s + n
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    step = lambda: model.lm_head(model.hidden(token, caches)[:, -1])
    times = [clock(step, device) for _ in range(steps + 2)][2:]  # the first two are warm-up
    ms = lambda i: None if times[0][i] is None else statistics.median(t[i] for t in times) * 1000
    return ms(0), ms(1)  # ms per token: wall, GPU


def attention_alone(model, path, inputs, length, chunk_size, num_chunks, device, dtype, repeat,
                    profile=False):
    """Seconds of SDPA, tiled_attention and longheads_attention, (wall, GPU or None) each:
    {"sdpa": (s, s), "tiled": ..., "short": ...}, on q, k, v of the model's head shape, either
    random or, inputs "text", the first layer's q, k, v of a passkey prompt (real text:
    neighbouring queries pick alike).
    num_chunks: the setting's, resolved (measure() applies the trained-length rule)."""
    cfg, gen = model.config, torch.Generator(device=device).manual_seed(0)
    opts = dict(chunk_size=chunk_size, num_chunks=num_chunks, rope_theta=cfg.rope_theta)
    fns = dict(sdpa=lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                   enable_gqa=True),
               tiled=lambda q, k, v: tiled_attention(q, k, v, **opts),
               short=lambda q, k, v: longheads_attention(q, k, v, **opts))
    new = lambda heads, n: torch.randn(1, heads, n, cfg.head_dim, generator=gen, device=device,
                                       dtype=dtype)  # (B, heads, T, D)
    seconds = {}
    with torch.no_grad():
        for n in (min(length, WARMUP_TOKENS * 4), length):  # a warm-up, then the measurement
            if inputs == "text":
                q, k, v = first_layer_qkv(model, prompt(path, model, n).to(device))
            else:
                q = new(cfg.num_attention_heads, n)
                k, v = new(cfg.num_key_value_heads, n), new(cfg.num_key_value_heads, n)
            seconds = {name: timed(lambda: f(q, k, v), device, repeat) for name, f in fns.items()}
        if profile:  # where the tiled path's time goes, operator by operator, to stderr
            with torch.profiler.profile() as prof:
                fns["tiled"](q, k, v)
            # on a GPU, by the GPU's time: the CPU's is mostly launching kernels there
            order = "self_device_time_total" if is_cuda(device) else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=order, row_limit=12),
                  file=sys.stderr)
    return seconds


def first_layer_qkv(model, ids):
    """The first layer's q (B, H, T, D), k and v (B, Hkv, T, D) for ids (B, T), before RoPE."""
    layer = model.model.layers[0]
    return layer.self_attn.qkv(layer.input_layernorm(model.model.embed_tokens(ids)))


def timed(fn, device, repeat=1):
    """The median wall seconds of `repeat` calls, and their median GPU seconds (None off a GPU)."""
    times = [clock(fn, device) for _ in range(repeat)]
    gpu = None if times[0][1] is None else statistics.median(t[1] for t in times)
    return statistics.median(t[0] for t in times), gpu


def clock(fn, device):
    """One call's wall seconds, and on a GPU the seconds between two CUDA events around it: the
    GPU's own time, which a wall time hides when the host is the bottleneck (else None)."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if is_cuda(device) else []
    sync(device)
    start = time.perf_counter()
    events and events[0].record()
    fn()
    events and events[1].record()
    sync(device)
    wall = time.perf_counter() - start
    return wall, events[0].elapsed_time(events[1]) / 1000 if events else None


def warmup_tokens(attention, length, chunk_size, num_chunks):
    """The warm-up prefill's length: WARMUP_TOKENS, and for LongHeads past its budget by a chunk,
    so that the warm-up reaches the blocks that select (attend_block), whose one-time costs
    (kernels loaded, buffers grown) would otherwise fall into the timed run."""
    if attention == "full":
        return min(length, WARMUP_TOKENS)
    return min(length, max(WARMUP_TOKENS, chunk_size * (num_chunks + 1)))


def is_cuda(device):
    return str(device).startswith("cuda")


def sync(device):
    if is_cuda(device):
        torch.cuda.synchronize()


def peak_bytes(device):
    if is_cuda(device):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(args):
    """Child process: one measurement, printed as one JSON line."""
    kind, attention, length = args.one
    length = int(length)
    model, path = load(args, attention)
    trained = model.config.max_position_embeddings
    num_chunks = args.num_chunks or default_num_chunks(trained, args.chunk_size)
    setting = {} if attention == "full" else dict(setting=f"{args.chunk_size}x{num_chunks}")
    if setting and args.chunk_size * num_chunks > trained:  # as Llama refuses it
        sys.exit(f"{setting['setting']}: chunk size x chunks = {args.chunk_size * num_chunks} "
                 f"exceeds the model's trained length {trained}")
    if kind == "prefill":
        warm = warmup_tokens(attention, length, args.chunk_size, num_chunks)
        prefill(model, prompt(path, model, warm).to(args.device))
        ids = prompt(path, model, length).to(args.device)
        base = peak_bytes(args.device)
        if is_cuda(args.device):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        seconds, gpu = timed(lambda: prefill(model, ids, args.prefill_piece), args.device,
                             args.repeat)
        peak = peak_bytes(args.device)
        result = dict(seconds=seconds, gpu_seconds=gpu, peak_bytes=peak, work_bytes=peak - base)
        if args.prefill_piece:
            result["prefill_piece"] = args.prefill_piece
    elif kind == "decode":
        ms, gpu_ms = decode_steps(model, length, DECODE_STEPS, args.device)
        result = dict(ms_per_token=ms, gpu_ms_per_token=gpu_ms)
    else:
        seconds = attention_alone(model, path, attention, length, args.chunk_size,
                                  num_chunks, args.device, getattr(torch, args.dtype),
                                  args.repeat, args.profile)
        # seconds: (wall, GPU) each -> sdpa_seconds, sdpa_gpu_seconds, ...
        result = {f"{name}_{which}seconds": s[i] for name, s in seconds.items()
                  for i, which in enumerate(["", "gpu_"])}
    name = str(path or args.shape or "smollm2")
    print(json.dumps(dict(kind=kind, attention=attention, length=length, model=name, **setting,
                          **result)))


# ----------------------------------------------------------------------------- memory on paper
# The GPU layout's shapes never depend on data (it never waits for the GPU), so on meta tensors,
# which hold shapes and no values, the same code makes every tensor a GPU would, in no time and
# no memory. LiveBytes counts them. Not counted: a kernel's own temporaries (cuBLAS workspaces,
# SDPA's), the caching allocator's rounding and fragmentation (reserved above allocated), the
# CUDA context (some 0.5 GB, outside torch's allocator): hence a margin under the 24 GB target.

class LiveBytes(TorchDispatchMode):
    """The most bytes held at once (peak) by tensors made inside it, counted by storage: a view
    adds nothing, nor does a tensor made before it (weights, a cache's buffers, inputs)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0  # a storage's address -> (a weak reference to it, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # why purge first: a storage made now may reuse the address of one freed since
        self.live = {key: x for key, x in self.live.items() if not x[0].expired()}
        given = {x.untyped_storage()._cdata for x in tree_leaves((args, kwargs))
                 if isinstance(x, torch.Tensor)}  # an output on one of these is a view, in place
        for x in tree_leaves(out):
            key = x.untyped_storage()._cdata if isinstance(x, torch.Tensor) else None
            if key is not None and key not in given and key not in self.live:
                storage = x.untyped_storage()
                self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def block_working_bytes(H, Hkv, D, chunk_size, num_chunks, length, dtype=torch.bfloat16,
                        device="meta"):
    """Peak bytes of the last block of a prompt of `length` tokens in the GPU layout (the block
    GPU default_block_size makes), storing included: (bytes, the block's queries)."""
    cache, q, k = last_block(H, Hkv, D, chunk_size, num_chunks, length, dtype, device)
    with LiveBytes() as live, torch.no_grad():
        cache(q, k, k)
    return live.peak, q.shape[2]


def block_flops(H, Hkv, D, chunk_size, num_chunks, length, dtype=torch.bfloat16):
    """The floating-point operations of the matrix products (scores, weighted sums) in the last
    block of a prompt of `length` tokens, the GPU layout on meta tensors, storing included:
    (the block's, its own chunk's part)."""
    import tiled
    cache, q, k = last_block(H, Hkv, D, chunk_size, num_chunks, length, dtype, "meta")
    own, real = [], tiled.own_chunk

    def counted(*args):  # the own chunk's part, counted apart
        with FlopCounterMode(display=False) as inner:
            out = real(*args)
        own.append(inner.get_total_flops())
        return out
    with FlopCounterMode(display=False) as total, torch.no_grad(), \
            mock.patch.object(tiled, "own_chunk", counted):
        cache(q, k, k)
    return total.get_total_flops(), sum(own)


def last_block(H, Hkv, D, chunk_size, num_chunks, length, dtype, device):
    """A cache in the GPU layout that holds all but the last block of a prompt of `length` tokens,
    as if stored (what they hold is moot), and that block's q (1, H, b, D) and k (1, Hkv, b, D)."""
    cache = LongHeadsCache(1, H, Hkv, length, D, chunk_size=chunk_size, num_chunks=num_chunks,
                           dtype=dtype, device=device, for_device="cuda")
    b = min(cache.block_size, length - chunk_size * num_chunks)
    cache.length = length - b
    q = torch.zeros(1, H, b, D, dtype=dtype, device=device)  # (B, H, b, D)
    k = torch.zeros(1, Hkv, b, D, dtype=dtype, device=device)  # (B, Hkv, b, D), and v
    return cache, q, k


def estimate_memory(shape, length, piece, chunk_size, num_chunks, dtype=torch.bfloat16,
                    attention="longheads"):
    """The GPU's bytes for a prefill of `length` tokens fed `piece` tokens at a time (piece 1:
    a decoding step after length - 1 tokens), by part: {"weights", "kv" (keys and values:
    offload keeps LongHeads' in host memory), "cache" (the rest of the caches: summaries, the
    first chunks' keys at true positions, RoPE tables), "working" (one layer's peak on the last
    piece: activations and attention), "copies" (what offload copies to the GPU that would
    otherwise be read in place)}. attention: "longheads" or "full"."""
    cfg = LlamaConfig(**SHAPES[shape])
    with torch.device("meta"):
        model = Llama(cfg, attention=attention, chunk_size=chunk_size, num_chunks=num_chunks)
    model = model.to(dtype)
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if attention == "full":
        cache = KVCache(1, H, Hkv, length, D, inv_freq=cfg.inv_freq(length), dtype=dtype,
                        device="meta")
        kv = cache.k.nbytes + cache.v.nbytes
    else:
        cache = LongHeadsCache(1, H, Hkv, length, D, chunk_size=chunk_size,
                               num_chunks=num_chunks, rope=cfg.inv_freq(chunk_size * num_chunks),
                               dtype=dtype, device="meta", for_device="cuda")
        kv = cache.kv.k.nbytes + cache.kv.v.nbytes
    layers = cfg.num_hidden_layers
    rest = sum(x.nbytes for x in cache.buffers()) - kv
    cache.length = length - piece  # the last piece: the most keys to read
    x = torch.zeros(1, piece, cfg.hidden_size, dtype=dtype, device="meta")  # (B, piece, C)
    with LiveBytes() as live, torch.no_grad(), flash_on_paper():
        model.model.layers[0](x, cache)
    # offloaded, a block's own-chunk window and a summary's span of keys and values come to the
    # GPU as copies, one at a time: (B, Hkv, tokens, D) each of k and v
    window = max(getattr(cache, "block_size", 0) + chunk_size, SUMMARY_TOKENS)
    copies = 2 * Hkv * window * D * x.element_size()
    return dict(weights=sum(p.nbytes for p in model.parameters()), kv=layers * kv,
                cache=layers * rest, working=live.peak + x.nbytes, copies=copies)


def flash_on_paper():
    """causal_attention as a GPU's fused kernels hold it (flash, memory-efficient): the output,
    no score matrix. On meta tensors SDPA takes its plain path, which makes every score (281 GB
    for 32 heads at 32k tokens). Llama-2-7B has a key/value head per query head, so the copies
    of keys that grouped heads need there are not made either."""
    import model as model_module
    import tiled
    stand_in = lambda q, k, v, cuda_layout=None: torch.empty_like(q)  # (B, H, T, D)
    stack = contextlib.ExitStack()
    for module in (model_module, tiled):  # full attention calls it, and LongHeads' first chunks
        stack.enter_context(mock.patch.object(module, "causal_attention", stand_in))
    return stack


def memory_table(args):
    """The estimate of the GPU's peak, as lines that show the arithmetic (GB: 10^9 bytes)."""
    shape, length = args.shape or "llama2-7b", args.estimate_length
    cfg, dtype = LlamaConfig(**SHAPES[shape]), getattr(torch, args.dtype)
    num_chunks = args.num_chunks or default_num_chunks(cfg.max_position_embeddings,
                                                        args.chunk_size)
    gb = lambda x: f"{x / 1e9:6.2f} GB"
    size = torch.finfo(dtype).bits // 8
    lines = [f"GPU memory on paper: {shape}, {length} tokens, LongHeads {args.chunk_size}x"
             f"{num_chunks}, {args.dtype}, the GPU layout run on meta tensors"]
    for piece in [length, args.prefill_piece or PREFILL_PIECE]:  # whole, and as generate feeds it
        m = estimate_memory(shape, length, piece, args.chunk_size, num_chunks, dtype)
        params = m["weights"] // size
        kv = (f"{cfg.num_hidden_layers} layers x 2 x {cfg.num_key_value_heads} heads x {length}"
              f" tokens x {cfg.head_dim} x {size} bytes")
        full = m["weights"] + m["kv"] + m["cache"] + m["working"]
        offload = m["weights"] + m["cache"] + m["working"] + m["copies"]
        lines += [f"prefill {'whole' if piece == length else f'in pieces of {piece}'}:",
                  f"  weights        {gb(m['weights'])}  {params / 1e9:.2f}e9 parameters x "
                  f"{size} bytes",
                  f"  keys, values   {gb(m['kv'])}  {kv} (host memory if offloaded)",
                  f"  rest of cache  {gb(m['cache'])}  summaries, first chunks' keys, RoPE tables",
                  f"  working memory {gb(m['working'])}  one layer's peak on the last piece",
                  f"  offload copies {gb(m['copies'])}  a block's window of keys and values",
                  f"  peak: {gb(full)} = weights + keys, values + rest + working; offloaded "
                  f"{gb(offload)} = weights + rest + working + copies"]
    total, own = block_flops(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                             args.chunk_size, num_chunks, length, dtype)
    lines += [f"work of a layer's last block of queries (matrix products, block_flops): "
              f"{total / 1e9:.1f}e9 floating-point operations, its own chunk's {own / 1e9:.1f}e9"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- what fits the card
FIT = 0.9  # of the card's memory a plan may fill on paper: the rest is what the paper misses

def card_bytes(args):
    """The GPU's memory in bytes: --gpu-memory (GiB), else the CUDA device's; None on a CPU."""
    if args.gpu_memory:
        return int(args.gpu_memory * 2**30)
    if is_cuda(args.device) and torch.cuda.is_available():
        return device_memory(args.device)
    return None


@functools.cache
def device_memory(device):
    """The CUDA device's memory in bytes, asked of a child process. Why not here: asking makes a
    CUDA context, which would hold some 0.5 GB of the card while the measurements run."""
    ask = f"import torch; print(torch.cuda.get_device_properties({device!r}).total_memory)"
    return int(subprocess.run([sys.executable, "-c", ask], capture_output=True, text=True,
                              check=True).stdout)


def paper_bytes(args, kind, attention, length, setting, piece):
    """One measurement's GPU peak on paper, and its parts (estimate_memory's; attention alone:
    attention_bytes'). piece: the prefill's piece, None for whole."""
    chunk_size, num_chunks = setting
    shape = args.shape or "smollm2"
    cfg, dtype = LlamaConfig(**SHAPES[shape]), getattr(torch, args.dtype)
    num_chunks = num_chunks or default_num_chunks(cfg.max_position_embeddings, chunk_size)
    if kind == "attention":
        parts = attention_bytes(cfg, length, chunk_size, num_chunks, dtype)
        return sum(parts.values()), parts
    if kind == "decode":  # a step after the caches hold the length and the steps before it
        length, piece = length + DECODE_STEPS + 2, 1
    m = estimate_memory(shape, length, piece or length, chunk_size, num_chunks, dtype,
                        "full" if attention == "full" else "longheads")
    offloaded = attention == "offload"
    parts = dict(weights=m["weights"], kv=0 if offloaded else m["kv"], cache=m["cache"],
                 working=m["working"], copies=m["copies"] if offloaded else 0)
    return sum(parts.values()), parts


def attention_bytes(cfg, T, w, K, dtype):
    """Attention alone's GPU peak on paper, by part: its inputs q, k, v and SDPA's output, and
    the larger of what the other two ways hold: the tiled path's cache and one block's working
    memory, or the short path's bound read off longheads_attention (float32: three copies each
    of q, k, v padded and rotated, its output twice, and one chunk of queries against a union
    of at most every chunk: H x n x w x (3 D + 2 w) numbers)."""
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    size, n = torch.finfo(dtype).bits // 8, -(-T // w)
    cache = LongHeadsCache(1, H, Hkv, T, D, chunk_size=w, num_chunks=K, dtype=dtype,
                           device="meta", for_device="cuda")
    block = block_working_bytes(H, Hkv, D, w, K, T, dtype)[0] if T > w * K else 0
    tiled_way = sum(x.nbytes for x in cache.buffers()) + block
    short = 4 * n * w * (3 * (H + 2 * Hkv) * D + 2 * H * D + H * (3 * D + 2 * w))
    return dict(inputs=(2 * H + 2 * Hkv) * T * D * size, working=max(tiled_way, short))


def plan(args, kind, attention, length, setting):
    """Whether one measurement fits the card, on paper: {"piece": the prefill's piece (None:
    whole), "estimate_bytes", "fit_bytes", "skip": why it does not run, or None}. A prefill that
    does not fit whole is tried in Llama.prefill's pieces. Without a card (a CPU) it runs as
    asked."""
    card = card_bytes(args)
    if card is None:
        return dict(piece=args.prefill_piece, skip=None)
    fit = int(FIT * card)
    pieces = [args.prefill_piece]
    if kind == "prefill" and (args.prefill_piece or length) > PREFILL_PIECE:
        pieces.append(PREFILL_PIECE)
    for piece in pieces:
        total, parts = paper_bytes(args, kind, attention, length, setting, piece)
        if total <= fit:
            return dict(piece=piece, estimate_bytes=total, fit_bytes=fit, skip=None)
    how = f"in pieces of {piece}" if piece else "whole"
    named = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in parts.items() if v)
    return dict(piece=piece, estimate_bytes=total, fit_bytes=fit,
                skip=f"{total / 1e9:.1f} GB on paper {how} ({named} GB; lab.bench "
                     f"--estimate-memory) > {fit / 1e9:.1f} GB, {FIT:.0%} of the card's "
                     f"{card / 2**30:.0f} GiB")


def plan_line(args, kind, attention, length, setting=None):
    """--plan: one measurement's plan as one JSON line, nothing run."""
    setting = setting or (args.chunk_size, args.num_chunks)
    fits = plan(args, kind, attention, length, setting)
    named = {} if attention in ("full", "random", "text") else dict(setting="%dx%s" % setting)
    print(json.dumps(dict(kind=kind, attention=attention, length=length, **named, **fits)))
    return fits


# ----------------------------------------------------------------------------- the run

def child(args, kind, attention, length, setting=None):
    """One measurement in a fresh process; a failure (e.g. out of memory, its time is up) is
    recorded, not fatal. setting: (chunk size, chunks per head or None) for LongHeads, else
    --chunk-size's. The record goes to --records the moment it exists."""
    setting = setting or (args.chunk_size, args.num_chunks)
    fits = plan(args, kind, attention, length, setting)
    argv = [sys.executable, "-m", "lab.bench", "--one", kind, attention, str(length)]
    argv += passthrough(args, setting, fits["piece"])
    record = dict(kind=kind, attention=attention, length=length)
    if fits.get("estimate_bytes"):
        record.update(estimate_bytes=fits["estimate_bytes"])
    limit = time_for_one(args)
    if fits["skip"]:
        record.update(error=f"skipped: {fits['skip']}")
    elif limit is not None and limit <= 0:
        record.update(error="skipped: --deadline reached")
    else:
        named = [] if attention == "full" else ["x".join(str(x) for x in setting if x)]
        record = run_child(args, argv, limit, record, "-".join([kind, attention, str(length)]
                                                                  + named))
    if "error" in record:
        print(f"  {kind} {attention} {length}: {failure(record)}", file=sys.stderr)
    else:
        numbers = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float))
        label = " ".join(x for x in (kind, attention, record.get("setting"), str(length)) if x)
        print(f"  {label}: {numbers}", file=sys.stderr)
    if args.records:  # one JSON line, on disk before the next measurement starts
        with open(args.records, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return record


def run_child(args, argv, limit, record, name):
    """Run one measurement's process. Its whole stderr goes, as it comes, to the file name.log
    under --logs (else it is kept in memory). Returns the record it printed, or its failure:
    the line that names the error (the last lines of a CUDA error are advice), and the log."""
    path = Path(args.logs) / f"{name}.log" if args.logs else None
    where = f" ({path})" if path else ""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "w") if path else subprocess.PIPE
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=log, text=True, timeout=limit,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(record, error=f"timed out after {limit:.0f} s{where}")
    finally:
        if path:
            log.close()
    stderr = path.read_text() if path else done.stderr
    if done.returncode != 0:
        return dict(record, error=(error_line(stderr) or f"exit code {done.returncode}") + where)
    if args.profile:
        print(stderr, file=sys.stderr)
    planned = {k: v for k, v in record.items() if k == "estimate_bytes"}  # the parent's own
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), **planned)


# a traceback's last line: the exception's name, then its message
ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*:")


def error_line(stderr):
    """The line of a failed process's stderr that names its error: the last exception line of
    a traceback ("torch.OutOfMemoryError: CUDA out of memory ..."), else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    named = [line for line in lines if ERROR_LINE.match(line)]
    return (named or lines or [""])[-1]



def time_for_one(args):
    """Seconds the next measurement may take: --timeout, and no further than --deadline."""
    if args.deadline is None:
        return args.timeout  # None: no limit
    left = args.deadline - (time.perf_counter() - args.started)
    return left if args.timeout is None else min(args.timeout, left)


def passthrough(args, setting, piece):
    chunk_size, num_chunks = setting
    out = ["--device", args.device, "--dtype", args.dtype, "--repeat", str(args.repeat),
           "--chunk-size", str(chunk_size)]
    out += ["--num-chunks", str(num_chunks)] if num_chunks else []
    out += ["--prefill-piece", str(piece)] if piece else []
    out += ["--profile"] if args.profile else []
    return out + (["--shape", args.shape] if args.shape else [])


def run(args, plan_only=False):
    """Every measurement: full attention once per length, LongHeads once per setting; or with
    plan_only, each one's plan printed (plan_line), nothing run."""
    one = plan_line if plan_only else child  # what each measurement gets
    settings, records = [(args.chunk_size, args.num_chunks)] + args.also, []
    for length in args.lengths:
        if not (args.full_max and length > args.full_max):
            records.append(one(args, "prefill", "full", length))
        offload = args.offload and not (args.offload_max and length > args.offload_max)
        for setting in settings:
            for attention in ["longheads"] + ["offload"] * offload:
                records.append(one(args, "prefill", attention, length, setting))
    for length in args.decode_lengths:
        records.append(one(args, "decode", "full", length))
        records += [one(args, "decode", "longheads", length, s) for s in settings]
    on_disk = default_model(args) is not None
    for length in args.attention_lengths:
        for inputs in ["random"] + ["text"] * on_disk:  # real text needs the tokenizer
            records += [one(args, "attention", inputs, length, s) for s in settings]
    return records


def parse_setting(text):
    """--also's "WxK" -> (chunk size, chunks per head)."""
    try:
        w, k = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write a setting as WxK, e.g. 128x16")
    return w, k


def ratios(records):
    """The ratios the targets are stated in, from the records of one run."""
    ok = [r for r in records if "error" not in r]
    pre = {(label(r), r["length"]): r for r in ok if r["kind"] == "prefill"}
    out = {}
    for attention in sorted({a for a, _ in pre}):
        lengths = sorted(t for a, t in pre if a == attention)
        pairs = [(t, 4 * t) for t in lengths if 4 * t in lengths]
        if pairs:
            t, t4 = pairs[-1]
            a, b = pre[attention, t4], pre[attention, t]
            out[f"{attention} t({t4})/t({t})"] = a["seconds"] / b["seconds"]
            out[f"{attention} mem({t4})/mem({t})"] = a["work_bytes"] / max(1, b["work_bytes"])
    for (a, t), r in sorted(pre.items()):
        if a != "full" and ("full", t) in pre:
            out[f"{a}/full time at {t}"] = r["seconds"] / pre["full", t]["seconds"]
    dec = {(label(r), r["length"]): r["ms_per_token"] for r in ok if r["kind"] == "decode"}
    for attention in sorted({a for a, _ in dec}):
        lengths = sorted(t for a, t in dec if a == attention)
        if len(lengths) >= 2:
            lo, hi = lengths[0], lengths[-1]
            out[f"{attention} decode ms/token {hi}/{lo}"] = dec[attention, hi] / dec[attention, lo]
    for (a, t), ms in sorted(dec.items()):
        if a != "full" and ("full", t) in dec:
            out[f"decode {a}/full at {t}"] = ms / dec["full", t]
    for r in ok:
        if r["kind"] == "attention":
            t, T, at = r["tiled_seconds"], r["length"], f"{r['setting']} at {r['length']}"
            for other in ["sdpa", "short"]:
                out[f"attention alone {other}/tiled ({r['attention']} q, k, v) {at}"] = (
                    r[f"{other}_seconds"] / t)
            w, k = (int(x) for x in r["setting"].split("x"))
            out[f"scores full/longheads {at}"] = T / (2 * k * w)  # T^2 / 2 against T * K * w
    return out


def failure(r):
    """A record's error as a table says it: a skip is not a failure."""
    return r["error"] if r["error"].startswith("skipped") else "failed: " + r["error"]


def label(r):
    """A record's attention: "full", or LongHeads and its setting, "longheads 256x32"."""
    return f"{r['attention']} {r['setting']}" if "setting" in r else r["attention"]


def table(records, ratio):
    lines = ["| measurement | attention | tokens | result |", "|---|---|---|---|"]
    for r in records:
        if "error" in r:
            result = failure(r)
        elif r["kind"] == "prefill":
            gib = lambda x: f"{x / 2**30:.2f} GiB"
            gpu = f" (GPU {r['gpu_seconds']:.2f} s)" if r.get("gpu_seconds") is not None else ""
            result = (f"{r['seconds']:.2f} s{gpu}, peak {gib(r['peak_bytes'])} "
                      f"(+{gib(r['work_bytes'])})")
        elif r["kind"] == "decode":
            gpu = r.get("gpu_ms_per_token")
            result = f"{r['ms_per_token']:.1f} ms/token" + (f" (GPU {gpu:.1f})" if gpu else "")
        else:
            result = (f"SDPA {r['sdpa_seconds']:.2f} s, tiled {r['tiled_seconds']:.2f} s, "
                      f"short {r['short_seconds']:.2f} s")
        lines.append(f"| {r['kind']} | {label(r)} | {r['length']} | {result} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in ratio.items()]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[4096, 8192, 16384],
                   help="prefill lengths (none: skip the prefills)")
    p.add_argument("--decode-lengths", type=int, nargs="*", default=[4096, 32768])
    p.add_argument("--attention-lengths", type=int, nargs="*", default=[32768])
    p.add_argument("--full-max", type=int, help="skip full attention above this length")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape "
                   "(default: the downloaded default model, else smollm2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE,
                   help="LongHeads chunk size in the model")
    p.add_argument("--num-chunks", type=int, help="LongHeads chunks per head in the model "
                   "(default: the project's, trained length / chunk size)")
    p.add_argument("--also", type=parse_setting, nargs="*", default=[], metavar="WxK",
                   help="more LongHeads settings, chunk size x chunks per head (e.g. 128x16), "
                        "measured in the same run wherever LongHeads is")
    p.add_argument("--offload", action="store_true",
                   help="also LongHeads with its keys and values in pinned CPU memory (CUDA)")
    p.add_argument("--offload-max", type=int, help="--offload only up to this length (its "
                   "CPU-side gathers are slow: a GPU check times it where it is quick)")
    p.add_argument("--profile", action="store_true",
                   help="print torch.profiler's top operators of the tiled path (attention alone)")
    p.add_argument("--repeat", type=int, default=1,
                   help="timed runs per measurement; the median is kept")
    p.add_argument("--json", help="write the records and ratios to this file, at the end")
    p.add_argument("--records", help="append each record to this file as one JSON line, as "
                   "soon as it exists (a run cut short keeps what it finished)")
    p.add_argument("--timeout", type=float, help="seconds one measurement may take; past it, "
                   "it is recorded as timed out")
    p.add_argument("--deadline", type=float, help="seconds the whole run may take: no "
                   "measurement runs past it, those left are recorded as skipped")
    p.add_argument("--prefill-piece", type=int, help="feed prefill prompts this many tokens "
                   "at a time (default: whole)")
    p.add_argument("--estimate-memory", action="store_true", help="print the estimated GPU "
                   "peak of a LongHeads prefill of --estimate-length tokens (default shape "
                   "llama2-7b), with and without offload, and exit: no measurement")
    p.add_argument("--estimate-length", type=int, default=131072)
    p.add_argument("--plan", action="store_true", help="print each measurement's GPU memory "
                   "on paper and whether it runs (whole, in pieces, skipped), one JSON line "
                   "each, and exit: nothing is measured")
    p.add_argument("--gpu-memory", type=float, metavar="GIB", help="the card's memory, for "
                   "the plan (default: the CUDA device's); a measurement whose estimate is "
                   f"over {FIT:.0%} of it runs in pieces, or is recorded as skipped")
    p.add_argument("--logs", help="write each measurement's stderr to a file in this folder, "
                   "as it comes")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # internal: one measurement
    args = p.parse_args(argv)
    on_gpu = args.device.startswith("cuda") or args.estimate_memory  # an estimate is for a GPU
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    check_args(p, args)
    return args


def check_args(p, args):
    """Refuse what cannot run, with one line (argparse exits 2)."""
    lengths = args.lengths + args.decode_lengths + args.attention_lengths
    if min(lengths, default=1) < 1 or args.repeat < 1:
        p.error("lengths and --repeat must be positive")
    if any(x is not None and x <= 0 for x in (args.timeout, args.deadline)):
        p.error("--timeout and --deadline must be positive seconds")
    if args.device.startswith("cuda") and not torch.cuda.is_available() and not args.plan:
        p.error("--device cuda: no CUDA device is available here; use --device cpu, or --plan")
    if args.plan and is_cuda(args.device) and not (args.gpu_memory or torch.cuda.is_available()):
        p.error("--plan for a GPU not here: give the card's memory, --gpu-memory GIB")
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        p.error("--gpu-memory must be positive GiB")
    if args.offload and not args.device.startswith("cuda"):
        p.error("--offload moves LongHeads' cache from a GPU to CPU memory: it needs --device cuda")
    for chunk_size, num_chunks in [(args.chunk_size, args.num_chunks)] + args.also:
        try:  # what can be checked before the model says its trained length
            check_config(1, 1, chunk_size, num_chunks or 3)
        except ValueError as e:
            p.error(str(e))


def main(argv=None):
    args = parse_args(argv)
    if args.estimate_memory:  # a printout: its first line names the command and the commit
        return print(printout_head("lab.bench", argv) + "\n" + memory_table(args))
    if args.one:
        return measure(args)
    if args.plan:
        return run(args, plan_only=True)
    start = args.started = time.perf_counter()
    records = run(args)
    ran = [r for r in records if not r.get("error", "").startswith("skipped")]
    if ran and all("error" in r for r in ran):  # a skip, planned, is not a failure
        sys.exit("lab.bench: every measurement that ran failed (the lines above say why)")
    ratio = ratios(records)
    print(table(records, ratio))
    print(f"\n{time.perf_counter() - start:.0f} s in all, device {args.device}, {args.dtype}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    if args.json:
        tmp = Path(args.json + ".tmp")
        made = dict(command=command("lab.bench", argv), commit=commit())  # what a record names
        tmp.write_text(json.dumps(dict(records=records, ratios=ratio, args=vars(args), **made),
                                  indent=1))
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
