"""The fast path: LongHeads that reads only what each query picked, for prefill and decoding.

longheads.py says what LongHeads computes; this file computes the same thing faster, and is what
model.py runs. longheads_attention gathers, for a chunk of queries, the union of every chunk they
picked, scores all of it and masks what a query did not pick. Here a query reads exactly its K
chunks, and the work is laid out so that few, large torch operations do it:

  - LongHeadsCache holds one layer's keys (rotated once, to their offset in their chunk), values
    and chunk summaries, preallocated. A prefill is one call with the whole prompt, a decoding step
    one call with one token: the same code runs both (§4), so their outputs agree.
  - Queries go a block at a time (default_block_size), so the working memory is bounded whatever
    T is. Queries in the first K chunks read every key at its true position: plain causal
    attention (SDPA) over keys the cache also keeps at true positions.
  - Past them, a query reads its own chunk causally (own_chunk: a chunk's queries against its w keys
    alone), and its other K - 1 picks become (query, chunk) pairs, laid out in rows by chunk (pack),
    so that a chunk's keys are read once however many queries picked it ("pair rows"; "key rows" of
    k.view(-1, w, D) are chunks, as in longheads.attend_picks). On a CPU a chunk gets one row,
    padded to a multiple of TILE pairs; on a GPU rows are tiles of TILE pairs whose number comes
    from a bound (tile_bound), not a count, so that no step waits for the GPU (selection keeps its
    picks by a stable sort, not a boolean mask, for the same reason).
    for_device="cuda" runs the GPU's layout on a CPU, and the tests run it so, under a recorder
    of every operation that fails on any that would wait. A decoding step's pairs read their
    chunks directly (read_pairs): one query has nothing to share.
  - Each piece returns its output and its log-sum-exp (attention_lse), and merge combines a
    query's pieces into one softmax, as flash attention combines blocks of keys. A piece is
    computed a slice at a time (read_rows, own_chunk), so that its working set stays under
    PIECE_BYTES (CUDA_PIECE_BYTES on a GPU) however large the block: at the 7B shape and 128k
    tokens a block's rows gather ~3 GiB each of keys and values, which the plain piece would copy
    whole to float32 (~16 GiB a block; now under 2 GiB, test_memory.py).
  - On a GPU the pieces are the plain computation (attention_lse_plain: float32 logits, no
    tensor cores), not a fused kernel. Why: PyTorch's fused CUDA kernels that return the
    log-sum-exp are private ops (flash's takes no mask, the memory-efficient one pads the
    log-sum-exp), and no GPU has yet run this code to test one against the plain piece; the slices
    bound the plain piece's memory on any device, and the CPU runs it in every test.
  - offload=True keeps keys and values in plain CPU memory; the CPU gathers what a block reads
    into pinned staging buffers, sent without blocking. The host waits for the GPU twice a call
    (to store keys, values), once a block (to learn its rows), before each staged copy (the last).

The same property tests hold this file and longheads_attention to longheads_reference, the
per-query definition (test_longheads.py: any budget, grouped-query attention, prefill against
decoding, both layouts of the work; tests/test_cuda.py: the same on a GPU). Gradients flow
through one call on a fresh cache (tiled_attention, a model's forward without caches), and
equal the reference's; with autograd on, a cache refuses a second call, which would write over
what the first one's backward pass reads (check_grad_call).

torch.compile runs through it: the graph breaks where pack reads row lengths from the data, and
so that dynamo can break there, no generator object is alive across it (lists, not generators).

Shapes as in longheads.py (b: here the queries of a block); also m chunks up to a block's last
query, P (query, chunk) pairs of a block, s..e-1 a block's queries; in the attention helpers
N independent attentions of Q queries over S_k keys each.
"""
import math

import torch
from torch.nn.attention.bias import causal_lower_right

from longheads import (CHUNK_SIZE, apply_rope, check_args, check_config, chunk_summaries, need,
                       rope_table, select_chunks)

SUMMARY_TOKENS = 4096  # chunks are summarised this many tokens at a time (bounds working memory)
BLOCK_SCORES = 2**24  # default query block: about this many (query, key) scores (64 MiB float32)
BLOCK_QUERIES = 512  # ... and at most this many queries, or one chunk of them if more
CUDA_BLOCK_SCORES, CUDA_BLOCK_QUERIES = 2**28, 2048  # on a GPU: fewer, larger blocks
TILE = 32  # (query, chunk) pairs: a row is padded to a multiple of it (CPU), or is it (CUDA)
# the working set of one piece of attention (its keys and values as gathered and in float32,
# logits, output) is at most this many bytes, whatever the block: read_rows and own_chunk slice
PIECE_BYTES, CUDA_PIECE_BYTES = 2**28, 2**30
MASK_BLOCK = 1024  # queries per masked SDPA call after a cached prefix (it computes masked scores)
SDPA = torch.nn.functional.scaled_dot_product_attention
# why a private op: it is SDPA's CPU kernel, fused (no score matrix in memory), and unlike the
# public function it also returns the log-sum-exp that merging pieces needs
FUSED_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class LongHeadsCache(torch.nn.Module):
    """Keys, values and chunk summaries of one attention layer, preallocated for max_len tokens.

    Calling it with the q, k, v of new tokens (before RoPE) stores them and returns their attention
    output. Keys are stored rotated once, to their offset in their chunk; the distance to a
    chunk's rank goes into the query instead (§3).
    """

    def __init__(self, batch, num_heads, num_kv_heads, max_len, head_dim, *, num_chunks,
                 chunk_size=CHUNK_SIZE, rope=None, rope_theta=None, block_size=None,
                 dtype=torch.float32, device=None, offload=False, for_device=None):
        super().__init__()
        device = torch.device(device or "cpu")
        check_config(num_heads, num_kv_heads, chunk_size, num_chunks)
        check_cache_options(batch, max_len, block_size, device, offload, for_device, rope,
                            rope_theta)
        self.w, self.K, self.G = chunk_size, num_chunks, num_heads // num_kv_heads
        # the work laid out as for a GPU (tiles, the plain pieces, no waits) or for a CPU; the
        # device's own unless for_device says otherwise (the tests run the GPU's on the CPU)
        self.cuda_layout = (for_device or device.type) == "cuda"
        self.block_size = block_size or default_block_size(batch * num_heads, chunk_size,
                                                           num_chunks, self.cuda_layout)
        self.piece_bytes = CUDA_PIECE_BYTES if self.cuda_layout else PIECE_BYTES
        self.max_len, self.length = max_len, 0
        n = -(-max_len // chunk_size)  # chunks, the last one possibly partial
        near_end = min(num_chunks * chunk_size, max_len)  # the first K chunks' tokens end here
        self.kv = ChunkedKV(batch, num_kv_heads, n * chunk_size, head_dim, chunk_size, dtype,
                            device, offload)
        wide = torch.promote_types(dtype, torch.float32)  # summaries and scores: float32 or wider
        buffers = dict(
            summaries=torch.zeros(batch, num_kv_heads, self.G, n, head_dim, dtype=wide,
                                  device=device),
            # the raw queries of the unfinished chunk: its summary will need them
            q_tail=torch.zeros(batch, num_kv_heads, self.G, chunk_size, head_dim, dtype=dtype,
                               device=device),
            # the first K chunks' keys also at their true positions: their queries read them so
            k_true=torch.zeros(batch, num_kv_heads, near_end, head_dim, dtype=dtype,
                               device=device),
            # (K,): rank r's first position, (K - 1 - r) * w (§3)
            rank_start=(num_chunks - 1 - torch.arange(num_chunks, device=device)) * chunk_size)
        # (near_end, D) each: every position a query or a key can get
        cos, sin = rope_table(rope, rope_theta or 10000.0, head_dim, near_end, device, dtype)
        for name, x in dict(buffers, cos=cos, sin=sin).items():
            self.register_buffer(name, x, persistent=False)

    def forward(self, q, k, v):
        """q: (B, H, T, D), k and v: (B, Hkv, T, D) of the next T tokens -> (B, H, T, D)."""
        check_inputs(q, k, v, cache=self)
        check_grad_call(self.length, q, k, v)
        B, H, T, D = q.shape
        start = self.length
        qg = q.reshape(B, -1, self.G, T, D)  # (B, Hkv, G, T, D): head h reads kv head h // G
        self._store(qg, k, v)
        out = q.new_empty(B, H, T, D)
        n_near = min(T, max(0, self.K * self.w - start))  # queries in the first K chunks
        if n_near:
            out[:, :, :n_near] = attend_first_chunks(self, q[:, :, :n_near], start)
        outg = out.view(B, -1, self.G, T, D)  # (B, Hkv, G, T, D)
        for s in range(start + n_near, start + T, self.block_size):
            e = min(start + T, s + self.block_size)
            q_block = qg[..., s - start:e - start, :]  # (B, Hkv, G, e - s, D)
            outg[..., s - start:e - start, :] = attend_block(self, q_block, s, e)
        self.kv.scratch.clear()  # the working memory of one call, not of every layer's cache
        return out

    def _store(self, q, k, v):
        """Write keys (rotated) and values; summarise every chunk these tokens complete."""
        start, T, w = self.length, q.shape[-2], self.w
        o = start % w
        if o + T <= w:  # within one chunk (a decoding step): the offsets are a slice of the table
            cos, sin = self.cos[o:o + T], self.sin[o:o + T]  # (T, D) each
        else:
            offsets = torch.arange(start, start + T, device=k.device) % w  # (T,)
            cos, sin = self.cos[offsets], self.sin[offsets]  # (T, D) each
        self.kv.write(start, apply_rope(k, cos, sin), v)
        self.length = start + T
        near_end = min(start + T, self.k_true.shape[2])  # start..near_end-1: the first K chunks
        if start < near_end:
            cos, sin = self.cos[start:near_end], self.sin[start:near_end]  # true positions
            self.k_true[:, :, start:near_end] = apply_rope(k[:, :, :near_end - start], cos, sin)
        # why: a chunk's summary needs the queries of all its tokens, some of which came earlier
        tail = start % w
        if tail + T < w:  # no chunk completes (a decoding step, mostly): just keep the queries
            self.q_tail[..., tail:tail + T, :] = q
            return
        if tail:
            q = torch.cat([self.q_tail[..., :tail, :], q], dim=-2)  # (B, Hkv, G, tail + T, D)
        first, done = start // w, (start + T) // w  # chunks first..done-1 complete now
        step = max(1, SUMMARY_TOKENS // w)
        for c in range(first, done, step):
            self._summarise(q[..., (c - first) * w:(min(c + step, done) - first) * w, :], c)
        left = (start + T) % w
        # why not q[..., -left:, :]: left may be 0, and -0 takes everything
        self.q_tail[..., :left, :] = q[..., q.shape[-2] - left:, :]

    def _summarise(self, q, first):
        """Summaries of the complete chunks first, first + 1, ... whose raw queries are q."""
        B, Hkv, G, n_tok, D = q.shape
        w, n = self.w, n_tok // self.w
        q = q.reshape(B, Hkv, G, n, w, D)
        q = apply_rope(q, self.cos[:w], self.sin[:w])  # (B, Hkv, G, n, w, D)
        k, v = [x.view(B, Hkv, 1, n, w, D) for x in self.kv.span(first * w, (first + n) * w)]
        self.summaries[:, :, :, first:first + n] = chunk_summaries(q, k, v)


class ChunkedKV(torch.nn.Module):
    """Keys and values of one layer, (B, Hkv, tokens, D) each, read by token spans and by chunks,
    on the compute device, or offloaded: in plain CPU memory (no copy reads it: locking it, 64 GiB
    at 7B and 128k, buys nothing), gathered by the CPU into pinned staging buffers, sent async.
    Offloaded waits: write, twice a call; where_gathered, once a block; _stage, once a copy."""

    def __init__(self, batch, num_kv_heads, tokens, head_dim, chunk_size, dtype, device, offload):
        super().__init__()
        self.chunk_size, self.device, self.offload = chunk_size, device, offload
        self.scratch, self.sent = {}, None  # staging buffers, and the event of their last send
        shape = (batch, num_kv_heads, tokens, head_dim)
        for name in ("k", "v"):
            x = torch.zeros(shape, dtype=dtype, device="cpu" if offload else device)
            self.register_buffer(name, x, persistent=False)

    def write(self, start, k, v):
        """Store k, v (B, Hkv, T, D) as tokens start..start+T-1. Offloaded, each copy to the host
        waits for the GPU (the second finds it idle); then the CPU may read what it wrote."""
        self.k[:, :, start:start + k.shape[2]] = k
        self.v[:, :, start:start + v.shape[2]] = v

    def span(self, s, e, with_keys=True):
        """Keys (with_keys) and values of tokens s..e-1, on the compute device: (B, Hkv, e - s, D)
        each."""
        names = ("k", "v") if with_keys else ("v",)
        if not self.offload:
            return tuple([getattr(self, name)[:, :, s:e] for name in names])
        # why the staging buffer: a slice of several heads is not contiguous, and a copy to the
        # GPU from anything but contiguous pinned memory blocks
        out = []
        for name in names:
            x = getattr(self, name)[:, :, s:e]
            out.append(self._stage("span_" + name, x.shape, x).copy_(x))
        return self._send(out)

    def where_gathered(self, rows):
        """Chunk rows (n,), on the device that gathers them: offloaded, the CPU, which must know
        what to send (a block's one wait to learn what it reads); else where they are."""
        return rows.cpu() if self.offload else rows

    def chunks(self, rows):
        """Keys and values of the chunks at rows of k.view(-1, w, D): (len(rows), w, D) each;
        rows as where_gathered gives them."""
        shape = (len(rows), self.chunk_size, self.k.shape[-1])
        # (B * Hkv * n, w, D) -> (len(rows), w, D) each; why no reused buffer under autograd:
        # a backward pass needs what each gather returned, and out= has no gradient
        reuse = not records_grad(self.k)
        gathered = [torch.index_select(x.view(-1, *shape[1:]), 0, rows,
                                       out=self._stage(name, shape, x) if reuse else None)
                    for name, x in [("k", self.k), ("v", self.v)]]
        return self._send(gathered) if self.offload else tuple(gathered)

    def _send(self, tensors):
        """Pinned staging buffers to the GPU, without blocking; remembered, so that no buffer is
        refilled before its copy is done."""
        out = tuple([x.to(self.device, non_blocking=True) for x in tensors])
        self.sent = torch.cuda.Event()
        self.sent.record()
        return out

    def _stage(self, name, shape, like):
        """A buffer reused from block to block, on like's device: on the CPU, fresh large tensors
        cost page faults every time; offloaded, it is a pinned staging buffer for the GPU."""
        if self.sent is not None:
            self.sent.synchronize()  # why: the last copy to the GPU may still be reading it
            self.sent = None
        numel = math.prod(shape)
        buf = self.scratch.get(name)
        if buf is None or buf.numel() < numel:
            pinned = self.offload and like.device.type == "cpu"  # a staging buffer
            buf = self.scratch[name] = torch.empty(numel, dtype=like.dtype, device=like.device,
                                                   pin_memory=pinned)
        return buf[:numel].view(shape)


def default_block_size(query_heads, chunk_size, num_chunks, cuda_layout=False):
    """Queries per block: about BLOCK_SCORES (query, key) scores over all B * H heads, at most
    BLOCK_QUERIES queries or one chunk of them. With a small budget a block holds several chunks
    of queries, so that the fixed cost of a block (selection, layout, some 200 small operations)
    is shared by more queries. A GPU has the memory for larger blocks, and each block costs it
    some 200 kernel launches: there, CUDA_BLOCK_SCORES and CUDA_BLOCK_QUERIES."""
    budget, cap = (CUDA_BLOCK_SCORES, CUDA_BLOCK_QUERIES) if cuda_layout else (
        BLOCK_SCORES, BLOCK_QUERIES)
    per_query = query_heads * num_chunks * chunk_size  # scores of one query, every head
    return max(1, min(max(chunk_size, cap), budget // per_query))


# ----------------------------------------------------------------------------- one block

def attend_first_chunks(cache, q, s):
    """§2, g < K: queries s.. (B, H, b, D) read every chunk at true positions: causal attention
    over the first K chunks' keys, which the cache also keeps at their true positions."""
    e = s + q.shape[2]
    v = cache.kv.span(0, e, with_keys=False)[0]  # (B, Hkv, e, D)
    q = apply_rope(q, cache.cos[s:e], cache.sin[s:e])  # (B, H, b, D)
    return causal_attention(q, cache.k_true[:, :, :e], v, cuda_layout=cache.cuda_layout)


def attend_block(cache, q, s, e):
    """Queries s..e-1, all past the first K chunks, q: (B, Hkv, G, b, D) -> their outputs.

    Every query reads its own K chunks, exactly: its own chunk, causal (own_chunk), and the other
    K - 1 as (query, chunk) pairs laid out in rows by chunk (pack), one read of a chunk's keys
    per row (read_picks; in a decoding step each pair reads its chunk directly). The K partial
    softmaxes are merged.
    """
    B, Hkv, G, b, D = q.shape
    w, K, dev = cache.w, cache.K, q.device
    t = torch.arange(s, e, device=dev)  # (b,) the queries' positions in the sequence
    m = (e - 1) // w + 1  # chunks up to the block's last query
    # candidates 1..m-3: up to two before the last query's own chunk m - 1
    scores = score_candidates(cache, q, m - 3)  # (B, Hkv, G, b, S = m - 3)
    ids = select_chunks(scores, t // w, K)  # (B, Hkv, G, b, K)
    # §3: rank r is read from (K - 1 - r) * w + o, whichever chunk it is: the query moves;
    # why the tables, not q, are scaled: they are (b, K, D), the rotated queries K times more
    pos = cache.rank_start + t[:, None] % w  # (b, K)
    cos, sin = [x[pos] / math.sqrt(D) for x in (cache.cos, cache.sin)]  # (b, K, D) each
    qr = apply_rope(q[..., None, :], cos[:, :-1], sin[:, :-1])  # (B, Hkv, G, b, K - 1, D)
    out, lse = read_picks(cache, qr, ids[..., :-1], m)  # (P, D), (P,)
    own_out, own_lse = own_chunk(cache, apply_rope(q, cos[:, -1], sin[:, -1]), s, e)
    return merge(out.view(*qr.shape), lse.view(qr.shape[:-1]), own_out, own_lse).to(q.dtype)


def read_picks(cache, qr, picks, m):
    """Queries against the K - 1 chunks they picked besides their own: qr (B, Hkv, G, b, K - 1,
    D), rotated for their ranks, picks (B, Hkv, G, b, K - 1), chunk ids below m -> attention_lse's
    out (P, D) and lse (P,) of every (query, chunk) pair, in qr's order."""
    B, Hkv, G, b, _, D = qr.shape
    dev = qr.device
    heads = torch.arange(B * Hkv, device=dev).view(B, Hkv, 1, 1, 1)  # (B, Hkv, 1, 1, 1)
    if b == 1:  # a decoding step: each pair reads its own chunk, no rows
        rows = picks + heads * (cache.kv.k.shape[2] // cache.w)  # (B, Hkv, G, 1, K - 1)
        return read_pairs(cache, qr.reshape(-1, D), rows.flatten())  # rows of k.view(-1, w, D)
    # a pair's bucket: its head and chunk as one number, head-major: head * m + chunk (the
    # row formula of longheads.attend_picks, with m chunks per head)
    bucket = (picks + heads * m).flatten()  # (P,), P = B * Hkv * G * b * (K - 1)
    most = G * b  # no chunk is picked by more pairs than the group has queries
    size = min(TILE, most)
    # why whole rows on the CPU: a row per chunk reads its keys once; on CUDA, tiles of `size`
    # pairs, whose number pack bounds without asking the GPU for counts; where no chunk can have
    # more than `size` pairs, rows of `size` are whole rows, in one group
    whole = not cache.cuda_layout and most > size
    bound = most if cache.cuda_layout else None  # CUDA: the tile count from a bound, no wait
    place, row_groups = pack(bucket, size, B * Hkv * m, whole=whole, most=bound)  # (P,), rows
    n_slots = sum([len(row_bucket) * length for row_bucket, length in row_groups])
    P = len(bucket)
    # each slot's pair; P, a pair that is not there, for a slot that pads a row or a tile
    pair = torch.full((n_slots,), P, device=dev).index_copy_(0, place, torch.arange(P, device=dev))
    return read_rows(cache, qr.reshape(-1, D), pair, row_groups, m)  # (P, D), (P,)


def read_pairs(cache, q_pairs, rows):
    """Each pair against its chunk alone: q_pairs (P, D), rows (P,) of k.view(-1, w, D) ->
    attention_lse's out (P, D) and lse (P,). Why, for a decoding step: pack's layout is some 40
    operations, most of a step's kernel launches on a GPU, and it saves little there: at most G
    pairs share a chunk. A slice of pairs at a time, as read_rows."""
    D, step = q_pairs.shape[-1], rows_per_slice(cache, 1, q_pairs.shape[-1])
    rows = cache.kv.where_gathered(rows)  # offloaded: read back to the host (a wait)
    pieces = [attention_lse(q_pairs[i:i + step, None], *cache.kv.chunks(rows[i:i + step]),
                            fused=not cache.cuda_layout)  # (p, 1, D) against (p, w, D) each
              for i in range(0, len(rows), step)]
    out, lse = [torch.cat(x) if len(x) > 1 else x[0] for x in zip(*pieces)]  # (P, 1, D), (P, 1)
    return out.view(-1, D), lse.view(-1)


def score_candidates(cache, q, S):
    """§2: candidates 1..S scored for raw queries q (B, Hkv, G, b, D), q . summary, unscaled
    (only the order matters): (B, Hkv, G, b, S)."""
    summaries = cache.summaries[:, :, :, 1:S + 1]  # (B, Hkv, G, S, D), float32 or wider
    return q.to(summaries.dtype) @ summaries.transpose(-1, -2)


def read_rows(cache, q_pairs, pair, row_groups, m):
    """Each row of pairs against its chunk's keys, a slice of rows at a time. q_pairs (P, D), the
    pairs' queries; pair (slots,), each slot's pair (P: an empty slot), as pack laid them out;
    row_groups [(bucket, length)], buckets head * m + chunk. Returns attention_lse's out (P, D) and
    lse (P,) of every pair, one attention_lse call (fused on the CPU) per row length and slice.

    Why slices: the rows of a block gather ~3 GiB each of keys and values at the 7B shape and
    128k tokens (and the plain piece copies both to float32); a slice holds rows_per_slice of
    them, so the working set of this step is cache.piece_bytes, whatever the block's size. In
    so large a block the queries go from the pairs to a slice's rows and its outputs back, so
    that no array of all slots (padding included) is ever made. A CPU's block, small, moves
    them once, not once a slice: its row groups are many and short, and there each small
    operation costs a wake-up of every thread (8% of a prefill)."""
    P, D = q_pairs.shape
    chunks_per_head = cache.kv.k.shape[2] // cache.w
    wide = torch.promote_types(q_pairs.dtype, torch.float32)
    # row P takes what empty slots compute, and is dropped: no data-dependent shapes
    out = q_pairs.new_empty(P + 1, D, dtype=wide)  # (P + 1, D)
    lse = q_pairs.new_empty(P + 1, dtype=wide)  # (P + 1,)
    source = pair.clamp(max=P - 1)  # (slots,): an empty slot reads some pair's query, in vain
    at_once = not cache.cuda_layout  # a CPU's block is small: BLOCK_SCORES bounds it
    q_slots = q_pairs.index_select(0, source) if at_once else None  # (slots, D)
    # every row's chunk: its row of k.view(-1, w, D), on the device that gathers (offloaded: the
    # host, read back once for the block)
    kv_rows = cache.kv.where_gathered(torch.cat([bucket // m * chunks_per_head + bucket % m
                                                 for bucket, _ in row_groups]))  # (all rows,)
    first, first_row, done = 0, 0, []  # done: pieces (first slot, out, lse) not yet put back
    for row_bucket, length in row_groups:
        step = rows_per_slice(cache, length, D)
        for r in range(0, len(row_bucket), step):
            rows = kv_rows[first_row + r:first_row + min(r + step, len(row_bucket))]
            k_rows, v_rows = cache.kv.chunks(rows)  # (n_rows, w, D) each: one read
            lo, hi = first + r * length, first + min(r + step, len(row_bucket)) * length
            q_piece = q_slots[lo:hi] if at_once else q_pairs.index_select(0, source[lo:hi])
            piece_out, piece_lse = attention_lse(q_piece.view(-1, length, D), k_rows, v_rows,
                                                 fused=not cache.cuda_layout)
            # (n_rows, length, D), (n_rows, length) -> (n_rows * length, D), (n_rows * length,)
            done.append((lo, piece_out.view(-1, D), piece_lse.view(-1)))
            if not at_once:
                done = put_back(out, lse, pair, done)
        first += len(row_bucket) * length
        first_row += len(row_bucket)
    put_back(out, lse, pair, done)
    return out[:P], lse[:P]


def put_back(out, lse, pair, done):
    """Pieces' outputs to their pairs' rows of out (P + 1, D) and lse (P + 1,), one scatter each;
    done: [(first slot, out (n, D), lse (n,))] of consecutive slots. Returns [], none left."""
    if done:
        lo = done[0][0]
        piece_out, piece_lse = [x[0] if len(x) == 1 else torch.cat(x) for x in
                                ([d[1] for d in done], [d[2] for d in done])]
        out.index_copy_(0, pair[lo:lo + len(piece_lse)], piece_out)
        lse.index_copy_(0, pair[lo:lo + len(piece_lse)], piece_lse)
    return []


def rows_per_slice(cache, length, D):
    """Rows of `length` pairs whose working set fits cache.piece_bytes: per row, its chunk's keys
    and values as gathered and in float32 (the plain piece's copies), its logits and output."""
    w, size = cache.w, cache.kv.k.element_size()
    per_row = 2 * w * D * (size + 4) + length * (w + 2 * D) * 4
    return max(1, cache.piece_bytes // per_row)


def own_chunk(cache, q, s, e):
    """Queries s..e-1, q (B, Hkv, G, b, D) rotated for rank K - 1, read their own chunk up to
    themselves: each chunk's queries in one attention over that chunk's keys alone (<= w).
    Returns attention_lse's out (B, Hkv, G, b, D) and lse (B, Hkv, G, b)."""
    B, Hkv, G, b, D = q.shape
    w = cache.w
    lo = s // w * w  # the first chunk's first key
    n = (e - 1) // w - s // w + 1  # chunks the queries are in
    first, last, hi = s, e, e  # the positions of a chunk's queries (here all), the keys' end
    if n > 1:
        # why pad to whole chunks: then each chunk's queries read its w keys under one mask,
        # where one window of keys lo..e-1 for them all would score n times the keys needed
        padded = q.new_zeros(B, Hkv, G, n * w, D)  # a padding query reads in vain, dropped
        padded[..., s - lo:e - lo, :] = q
        q, first, last, hi = padded, lo, lo + w, lo + n * w
    Q = last - first
    # (B, Hkv, G, n * Q, D) -> (B * Hkv * n, G * Q, D): a chunk's G query heads share its keys
    q = q.reshape(B * Hkv, G, n, Q, D).transpose(1, 2).reshape(-1, G * Q, D)
    k, v = [x.reshape(B * Hkv * n, -1, D) for x in cache.kv.span(lo, hi)]  # (.., S, D) each
    # why repeat, not repeat_interleave: a chunk's G * Q queries go head by head; one query (a
    # decoding step) sees its whole chunk so far: no mask
    mask = own_mask(first, last, w, q.device).repeat(G, 1) if b > 1 else None  # (G * Q, S)
    # why slices: an attention's logits are (G * Q, S), and a block has B * Hkv * n of them
    S = k.shape[1]
    step = max(1, cache.piece_bytes // ((G * Q * (S + D) + 2 * S * D) * 4))  # float32 each
    pieces = [attention_lse(q[i:i + step], k[i:i + step], v[i:i + step], mask,
                            fused=not cache.cuda_layout) for i in range(0, len(q), step)]
    out, lse = [torch.cat(x) if len(x) > 1 else x[0] for x in zip(*pieces)]
    # (B * Hkv * n, G * Q, ...) -> (B, Hkv, G, n * Q, ...): the queries' order again
    out = out.view(B, Hkv, n, G, Q, D).transpose(2, 3).reshape(B, Hkv, G, n * Q, D)
    lse = lse.view(B, Hkv, n, G, Q).transpose(2, 3).reshape(B, Hkv, G, n * Q)
    return out[..., s - first:e - first, :], lse[..., s - first:e - first]


def own_mask(s, e, w, device):
    """Which keys lo..e-1 (lo = s // w * w) queries s..e-1 may read in their own chunk: those of
    their chunk, up to themselves. (e - s, e - lo), True where a query may look."""
    t = torch.arange(s, e, device=device)  # (b,) the queries' positions
    u = torch.arange(s // w * w, e, device=device)  # (e - lo,) the keys'
    return (u // w == t[:, None] // w) & (u <= t[:, None])


def tiled_attention(q, k, v, *, num_chunks, chunk_size=CHUNK_SIZE, rope_theta=None, rope=None,
                    block_size=None, for_device=None):
    """longheads_attention through the fast path: a LongHeadsCache used once.

    The same arguments, and block_size: queries per block (default_block_size), which bounds the
    working memory; for_device: "cuda" or "cpu", lay the work out as for that device (default:
    q's). Autograd works, as through longheads_attention.
    """
    check_args(q, k, v, num_chunks, chunk_size, rope_theta, rope)
    B, H, T, D = q.shape
    cache = LongHeadsCache(B, H, k.shape[1], T, D, chunk_size=chunk_size, num_chunks=num_chunks,
                           rope=rope, rope_theta=rope_theta, block_size=block_size, dtype=q.dtype,
                           device=q.device, for_device=for_device)
    return cache(q, k, v)


# ----------------------------------------------------------------------------- attention pieces

def causal_attention(q, k, v, cuda_layout=None):
    """Causal attention of the last T of S_k positions: q (B, H, T, D), k, v (B, Hkv, S_k, D).
    cuda_layout: compute as on a GPU (default: where q is)."""
    T, S_k = q.shape[2], k.shape[2]
    if T in (1, S_k):  # one new token sees every key; a whole sequence is SDPA's own causal case
        return SDPA(q, k, v, is_causal=T > 1, enable_gqa=True)
    on_gpu = q.is_cuda if cuda_layout is None else cuda_layout
    if on_gpu:
        # why: a lower-right causal bias runs the fused GPU kernels with no mask in memory; the
        # memory-efficient one takes no grouped heads, so keys and values go to every head
        G = q.shape[1] // k.shape[1]
        k, v = [x.repeat_interleave(G, dim=1) if G > 1 else x for x in (k, v)]  # (B, H, S_k, D)
        return SDPA(q, k, v, attn_mask=causal_lower_right(T, S_k))
    # why: after a cached prefix the mask must align bottom-right, which is_causal does not do,
    # and SDPA computes every score under an explicit mask: so blocks of queries each read the
    # keys up to their last one, and only a block's own triangle is computed in vain
    out = []
    for first in range(0, T, MASK_BLOCK):
        last = min(T, first + MASK_BLOCK)
        end = S_k - T + last  # keys up to the block's last query
        t = torch.arange(S_k - T + first, end, device=q.device)  # the block's positions
        mask = torch.arange(end, device=q.device) <= t[:, None]  # (last - first, end)
        out.append(SDPA(q[:, :, first:last], k[:, :, :end], v[:, :, :end], attn_mask=mask,
                        enable_gqa=True))
    return torch.cat(out, dim=2)  # (B, H, T, D)


def attention_lse(q, k, v, mask=None, fused=True):
    """Attention of one piece of keys, and its log-sum-exp, so that pieces merge later.

    q (N, Q, D), already scaled; k, v (N, S_k, D); mask (Q, S_k), True where a query may look, or
    None. Returns softmax(q k^T) v (N, Q, D) and logsumexp(q k^T) (N, Q), float32 or wider.
    On the CPU (and fused), one fused kernel; else, and under autograd, the plain computation,
    also its reference.
    """
    wide = torch.promote_types(q.dtype, torch.float32)
    # why not under autograd: the kernel's backward takes no gradient of the log-sum-exp, and
    # merge's weights are made of it
    if fused and q.device.type == "cpu" and FUSED_CPU is not None and not records_grad(q, k):
        bias = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(
            ~mask, float("-inf"))  # (Q, S_k): the kernel takes an additive mask of q's dtype
        # one head each: (N, 1, Q, D) against (N, 1, S_k, D)
        out, lse = FUSED_CPU(q[:, None], k[:, None], v[:, None], attn_mask=bias, scale=1.0)
        return out[:, 0].to(wide), lse[:, 0].to(wide)  # (N, Q, D), (N, Q)
    return attention_lse_plain(q, k, v, mask)


def attention_lse_plain(q, k, v, mask=None):
    """attention_lse, written out: the fallback, and what the tests hold the fused kernel to."""
    wide = torch.promote_types(q.dtype, torch.float32)
    # why wide before the product: bfloat16 logits lose ~0.1 nats at a logit spread of 4, and
    # SDPA, what LongHeads is compared with, keeps its scores in float32
    logits = q.to(wide) @ k.to(wide).transpose(-1, -2)  # (N, Q, S_k)
    if mask is not None:
        logits.masked_fill_(~mask, float("-inf"))
    if records_grad(q, k, v):
        # why not in place: logsumexp's backward reads the logits it was given
        return torch.softmax(logits, dim=-1) @ v.to(wide), torch.logsumexp(logits, dim=-1)
    # why in place: the logits are the piece's largest tensor; softmax and logsumexp would each
    # make one more of their size
    top = logits.amax(-1, keepdim=True)  # (N, Q, 1): every query sees a key, so finite
    weights = logits.sub_(top).exp_()  # (N, Q, S_k)
    total = weights.sum(-1, keepdim=True)  # (N, Q, 1)
    out = (weights @ v.to(wide)).div_(total)  # (N, Q, S_k) @ (N, S_k, D) -> (N, Q, D)
    return out, (top + total.log()).squeeze(-1)  # (N, Q, D), (N, Q)


def merge(out, lse, one, one_lse):
    """One softmax from its pieces: out (..., pieces, D), lse (..., pieces), and one more piece,
    one (..., D), one_lse (...) -> attention (..., D), each piece weighed by its share of the
    mass."""
    weight = torch.softmax(torch.cat([lse, one_lse[..., None]], -1), dim=-1)  # (..., pieces + 1)
    # why a matmul: it reads the pieces once, where `(weight * out).sum()` writes them again
    # (..., 1, pieces) @ (..., pieces, D) -> (..., D)
    return (weight[..., None, :-1] @ out).squeeze(-2) + weight[..., -1:] * one


def pack(bucket, size, num_buckets, whole=True, most=None):
    """Lay items out in rows by bucket, rows end to end, for one fused call per row length.

    bucket: (P,) integers in [0, num_buckets). whole: one row per bucket, its items padded to a
    multiple of size; else rows of size (tiles), a bucket's items filling them one after another.
    most: None, or the most items a bucket can have; then tiles are counted by a bound that needs
    no look at the buckets (on a GPU, no wait), and the tiles beyond the real ones stay empty.
    Returns place (P,): each item's index in the rows laid end to end, and the rows as groups
    [(bucket (n,), length)]: n rows of that length and buckets, in order, one group per length.
    """
    ones = torch.ones_like(bucket)  # (P,)
    count = torch.zeros(num_buckets, dtype=torch.long, device=bucket.device)
    count.index_add_(0, bucket, ones)  # (num_buckets,): items per bucket
    tiles = (count + size - 1) // size  # (num_buckets,): rows of size per bucket
    order = bucket.argsort(stable=True)  # (P,): items grouped by bucket
    rank_in_bucket = torch.empty_like(bucket)  # (P,): an item's place among its bucket's items
    first_item = count.cumsum(0) - count  # (num_buckets,)
    rank_in_bucket[order] = (torch.arange(len(bucket), device=bucket.device)
                             - first_item[bucket[order]])
    if whole:
        length = tiles * size  # (num_buckets,): each bucket's row, 0 where it has no items
        by_length = length.argsort(stable=True)  # (num_buckets,): rows of a length together
        ordered = length[by_length]
        start = torch.empty_like(length)
        start[by_length] = ordered.cumsum(0) - ordered  # (num_buckets,): where a row begins
        lengths, counts = torch.unique_consecutive(ordered, return_counts=True)  # host: shapes
        ends = counts.cumsum(0)
        row_groups = [(by_length[end - c:end], L) for L, c, end in
                      zip(lengths.tolist(), counts.tolist(), ends.tolist()) if L]
        return start[bucket] + rank_in_bucket, row_groups
    first_tile = tiles.cumsum(0) - tiles  # (num_buckets,)
    tile = first_tile[bucket] + rank_in_bucket // size  # (P,)
    slot = rank_in_bucket % size  # (P,)
    n_tiles = int(tiles.sum()) if most is None else tile_bound(len(bucket), size, num_buckets,
                                                               most)
    tile_bucket = torch.zeros(n_tiles, dtype=torch.long, device=bucket.device)
    tile_bucket.index_put_((tile,), bucket)  # (n_tiles,): empty tiles keep bucket 0
    return tile * size + slot, [(tile_bucket, size)]


def tile_bound(items, size, num_buckets, most):
    """The most tiles of size that items in num_buckets buckets of at most `most` items can
    fill: each bucket's last tile may be partial, and a bucket that fits one tile has one."""
    used = min(num_buckets, items)  # buckets that can hold an item
    if most <= size:
        return used
    return min(items, items // size + used)


# ----------------------------------------------------------------------------- argument checks

def check_cache_options(batch, max_len, block_size, device, offload, for_device, rope,
                        rope_theta):
    """One line for each of LongHeadsCache's own options that it cannot run with."""
    need(batch >= 1 and max_len >= 1, f"batch and max_len must be >= 1, got {batch}, {max_len}")
    need(block_size is None or block_size >= 1, f"block_size must be >= 1, got {block_size}")
    need(for_device in (None, "cpu", "cuda"),
         f"for_device must be None, 'cpu' or 'cuda', got {for_device!r}")
    need(not offload or device.type == "cuda", "offload keeps keys and values in CPU memory for "
         "a CUDA device; without a CUDA device there is nothing to offload: drop offload")
    need(rope is None or rope_theta is None, "give rope or rope_theta, not both")


def records_grad(*tensors):
    """Whether autograd records what is computed from these tensors now."""
    return torch.is_grad_enabled() and any([x.requires_grad for x in tensors])


def check_grad_call(length, q, k, v):
    """With autograd on, a cache (of either kind) takes one call, the whole sequence: a later call
    writes its buffers in place, under what the first call's backward pass reads."""
    if length and records_grad(q, k, v):
        raise ValueError(f"the cache holds {length} tokens, and with autograd on a cache takes "
                         f"the whole sequence in one call: feed later tokens under "
                         f"torch.no_grad(), or the whole sequence to a new cache")


def check_inputs(q, k, v, cache):
    """One line for q, k, v that do not fit each other (check_args) or the cache."""
    check_args(q, k, v, cache.K, cache.w, None, None)
    cache_B, cache_Hkv, _, cache_D = cache.kv.k.shape
    need((k.shape[0], k.shape[1], k.shape[3]) == (cache_B, cache_Hkv, cache_D)
         and q.shape[1] == cache_Hkv * cache.G, f"the cache holds B={cache_B}, "
         f"H={cache_Hkv * cache.G}, Hkv={cache_Hkv}, D={cache_D}; got q {tuple(q.shape)}, "
         f"k {tuple(k.shape)}")
    need(cache.length + q.shape[2] <= cache.max_len, f"the cache holds max_len={cache.max_len} "
         f"tokens; it has {cache.length} and got {q.shape[2]} more: make it larger")
    device = cache.summaries.device  # where it computes (offloaded, k and v stay on the CPU)
    need(q.dtype == cache.kv.k.dtype and q.device == k.device == v.device == device,
         f"q, k, v are {q.dtype} on {q.device}, {k.device}, {v.device}, but the cache is "
         f"{cache.kv.k.dtype} on {device}: make them match")
