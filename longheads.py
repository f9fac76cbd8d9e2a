"""LongHeads attention: every head reads a long context through a window it was trained on.

LongHeads (Lu et al., "LongHeads: Multi-Head Attention is Secretly a Long Context Processor",
arXiv 2402.10685) lets a RoPE model trained on L tokens read far more, with no training. The
context is cut into chunks of w tokens. Every head, for every query, picks at most K chunks
(K * w <= L): chunk 0, the previous chunk, its own chunk, and the K - 3 chunks whose summary key
scores highest against the query. The picked chunks are laid side by side with fresh, contiguous
positions, so no query ever sees a distance the model was not trained on. Different heads pick
different chunks, so together they cover the whole context, and a query costs O(K * w), not O(T).

This file is the whole method (the specification is DESIGN.md; its sections are cited below):
  - RoPE helpers (Hugging Face "rotate-half" layout)
  - chunk_summaries    §1  one summary key per complete chunk and query head
  - candidate_scores   §2  how well each chunk suits a query (select="summary", the paper's;
                             or "maxkey", a chunk's best single key)
  - select_chunks      §2  which chunks a query attends to (chunk 0, the best candidates, the
                             local_chunks newest), and their order (layout="position", the
                             paper's; "score", a variant: the best candidate nearest the query)
  - LongHeadsCache     §3-§4  keys, values and summaries; prefill and decoding are one code path
  - longheads_attention      the function to copy into a model (a cache used once)
  - longheads_reference      a slow per-query loop written straight from the specification

Shapes: B batch, H query heads, Hkv key/value heads, G = H // Hkv heads per group, T tokens,
D head dim, w chunk size, n chunks, b queries in a block, P (query, chunk) pairs.
What this is not: a kernel. It is plain PyTorch (CPU and CUDA), written to be read.
"""
import math

import torch
import torch.nn.functional as F

SUMMARY_TOKENS = 4096  # chunks are summarised this many tokens at a time (bounds working memory)
BLOCK_SCORES = 2**24  # default query block: about this many (query, key) scores (64 MiB in float32)
TILE = 64  # (query, chunk) pairs that share one read of a chunk's keys
MASK_BLOCK = 1024  # queries per masked SDPA call after a cached prefix (it also computes masked scores)
LAYOUTS = ("position", "score")  # the order of the picked chunks: the paper's, or best nearest (§3)
SELECTS = ("summary", "maxkey")  # how candidates are scored: the paper's, or a variant (§2)

# The defaults, the same in every entry point (the study in RESULTS.md chose them): chunks of 256
# tokens, as many as the trained length holds (the paper's budget: nothing changes inside it).
CHUNK_SIZE = 256
SELECT = "summary"
LAYOUT = "position"
LOCAL_CHUNKS = 2  # the own chunk and the one before it are always read (the paper's)


def default_num_chunks(trained_length, chunk_size=CHUNK_SIZE):
    """The paper's rule: as many chunks as the trained length holds, K * w <= L (at least 3)."""
    return max(3, trained_length // chunk_size)


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(head_dim, theta=10000.0):
    """Inverse frequencies of RoPE, computed exactly as Hugging Face does: (D/2,) float32."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)


def rope_cos_sin(inv_freq, positions, dtype=torch.float32):
    """cos and sin tables for integer positions: each (len(positions), D), in dtype."""
    # why float64: position * frequency loses digits in float32 far out; the remapped positions
    # of LongHeads must give exactly the angles that true positions give
    freqs = positions.double()[:, None] * inv_freq.double()[None, :]  # (P, D/2)
    angles = torch.cat([freqs, freqs], dim=-1)  # (P, D): rotate-half pairs dim i with i + D/2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """Rotate x (..., D) by the angles whose cos/sin broadcast against it."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def rope_table(rope, rope_theta, head_dim, length, device, dtype=torch.float32):
    """(cos, sin), each (length, D), from inverse frequencies, from given tables, or from theta."""
    dtype = torch.promote_types(dtype, torch.float32)
    if isinstance(rope, (tuple, list)):
        cos, sin = rope
        if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] < length or cos.shape[1] != head_dim:
            raise ValueError(f"rope: cos/sin tables must both be (P, {head_dim}) with P >= {length}, "
                             f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
        return cos[:length].to(device, dtype), sin[:length].to(device, dtype)
    inv_freq = rope_inv_freq(head_dim, rope_theta) if rope is None else rope
    if inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"rope: inverse frequencies must have shape ({head_dim // 2},), "
                         f"got {tuple(inv_freq.shape)}")
    return rope_cos_sin(inv_freq.to(device), torch.arange(length, device=device), dtype)


def causal_attention(q, k, v):
    """Ordinary causal attention of the last T of S positions: q (B, H, T, D), k and v (B, Hkv, S, D)."""
    T, S = q.shape[2], k.shape[2]
    if T in (1, S):  # one new token sees every key; a whole sequence is SDPA's own causal case
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
    # why: after a cached prefix the mask must align bottom-right, which is_causal does not do, and
    # SDPA computes every score under an explicit mask: so blocks of queries each read the keys up
    # to their last one, and only a block's own triangle is computed in vain
    out = []
    for a in range(0, T, MASK_BLOCK):
        b = min(T, a + MASK_BLOCK)
        e = S - T + b  # keys up to the block's last query
        mask = torch.arange(e, device=q.device) <= torch.arange(S - T + a, e, device=q.device)[:, None]  # (b - a, e)
        out.append(F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, :e], v[:, :, :e], attn_mask=mask, enable_gqa=True))
    return torch.cat(out, dim=2)  # (B, H, T, D)


# ----------------------------------------------------------------------------- §1 and §2

def chunk_summaries(q, k, v):
    """§1: one summary key per chunk and query head, computed in float32 (or wider).

    q: (B, Hkv, G, n, w, D) queries at chunk-local positions; k, v: (B, Hkv, 1, n, w, D), keys at
    chunk-local positions. Returns (B, Hkv, G, n, D).
    """
    wide = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(wide), k.to(wide), v.to(wide)
    scale = 1.0 / math.sqrt(q.shape[-1])
    inner = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # (B, Hkv, G, n, w, w), no mask
    s = (inner @ v).mean(dim=-2, keepdim=True)  # (B, Hkv, G, n, 1, D): the chunk's "query"
    weights = torch.softmax(s @ k.transpose(-1, -2) * scale, dim=-1)  # (B, Hkv, G, n, 1, w)
    return (weights @ k).squeeze(-2)  # (B, Hkv, G, n, D)


def candidate_scores(q, summaries, keys, rope_w, select="summary"):
    """§2: how well each candidate chunk 1..n-1 suits each query: (..., b, n - 1), higher better.

    q: (B, Hkv, G, b, D) raw queries; summaries: (B, Hkv, G, n, D); keys: (B, Hkv, n * w, D) at
    chunk-local positions (read by "maxkey" only); rope_w: (cos, sin) of position w, each (D,).
    select "summary" (the paper's): the query against the chunk's summary key. "maxkey": the
    chunk's best single key, the query placed just after the chunk (distances 1..w).
    """
    n = summaries.shape[-2]
    if select == "summary":
        candidates = summaries[..., 1:, :].transpose(-1, -2)  # (B, Hkv, G, D, n - 1)
        return q.to(summaries.dtype) @ candidates  # (B, Hkv, G, b, n - 1)
    qw = apply_rope(q, *rope_w).to(summaries.dtype)  # (B, Hkv, G, b, D)
    k = keys[:, :, None, keys.shape[2] // n:].to(summaries.dtype)  # (B, Hkv, 1, (n - 1) * w, D)
    return (qw @ k.transpose(-1, -2)).unflatten(-1, (n - 1, -1)).amax(-1)  # (B, Hkv, G, b, n - 1)


def select_chunks(scores, chunks, num_chunks, layout=LAYOUT, local_chunks=LOCAL_CHUNKS):
    """§2: the chunks that queries past the first num_chunks chunks attend to, in layout order.

    scores: (..., b, n - 1) of candidates 1..n-1 (candidate_scores); chunks: (b,) the chunk g each
    query sits in, all >= num_chunks, n >= max(chunks) - 1. Returns (..., b, num_chunks): chunk
    0, the best K' = num_chunks - 1 - local_chunks candidates among chunks 1..g-local_chunks, and
    the local_chunks newest chunks g-local_chunks+1..g (the paper: 2, the previous and the own
    chunk; num_chunks - 1: no candidates, a sliding window that keeps chunk 0). The candidates
    come in their original order (layout "position", the paper's), or by rising score (layout
    "score", a variant: the best candidate sits next to the newest chunks, nearest the query).
    (Queries in the first num_chunks chunks read every chunk: ordinary causal attention.)
    """
    candidate = torch.arange(1, scores.shape[-1] + 1, device=scores.device)  # (n - 1,)
    future = candidate > chunks[:, None] - local_chunks  # (b, n - 1): newest or not yet there
    # why a stable sort, not topk: equal scores are common (repeated text, or one token's key
    # in two chunks), and the earlier chunk must win every time, as in the reference
    ranked = scores.masked_fill(future, float("-inf")).sort(dim=-1, descending=True, stable=True)
    top = ranked.indices[..., :num_chunks - 1 - local_chunks] + 1  # (..., b, K'), best first
    top = top.sort(dim=-1).values if layout == "position" else top.flip(-1)
    back = torch.arange(local_chunks - 1, -1, -1, device=chunks.device)  # (local_chunks,)
    newest = chunks[:, None] - back  # (b, local_chunks): g - local_chunks + 1 .. g
    newest = newest.expand(*top.shape[:-1], local_chunks)  # (..., b, local_chunks)
    return torch.cat([torch.zeros_like(newest[..., :1]), top, newest], dim=-1)


# ----------------------------------------------------------------------------- §3, §4: the cache

class LongHeadsCache(torch.nn.Module):
    """Keys, values and chunk summaries of one attention layer, preallocated for max_len tokens.

    Calling it with the q, k, v of new tokens (before RoPE) stores them and returns their attention
    output. A prefill is one call with the whole prompt, a decoding step one call with one token:
    the same code runs both, so their outputs agree (DESIGN §4).
    Keys are stored rotated once at their chunk-local offset; the distance to the chunk's remapped
    position goes into the query instead (§3), so stored keys never need re-rotating.
    """

    def __init__(self, batch, num_heads, num_kv_heads, max_len, head_dim, *, num_chunks,
                 chunk_size=CHUNK_SIZE, rope=None, rope_theta=10000.0, block_size=None,
                 dtype=torch.float32, device=None, offload=False, layout=LAYOUT, select=SELECT,
                 local_chunks=LOCAL_CHUNKS):
        super().__init__()
        check_config(num_heads, num_kv_heads, chunk_size, num_chunks, block_size, layout, select,
                     local_chunks)
        if offload and torch.device(device or "cpu").type != "cuda":
            raise ValueError("offload keeps keys and values in CPU memory for a CUDA device; "
                             "without a CUDA device there is nothing to offload: drop offload")
        # offload: keys and values live in pinned CPU memory; only what a block reads moves over
        store = dict(device="cpu", pin_memory=True) if offload else dict(device=device)
        self.w, self.K, self.groups, self.layout = chunk_size, num_chunks, num_heads // num_kv_heads, layout
        self.select, self.local_chunks = select, local_chunks
        # a block's working memory: its (query, key) scores, and its own-chunk window of b x (b + w)
        self.block_size = block_size or max(1, min(chunk_size, BLOCK_SCORES // (batch * num_heads * num_chunks * chunk_size)))
        self.max_len, self.length, self.scratch = max_len, 0, {}
        n = -(-max_len // chunk_size)  # chunks, the last one possibly partial
        self.register_buffer("k", torch.zeros(batch, num_kv_heads, n * chunk_size, head_dim, dtype=dtype, **store), persistent=False)
        self.register_buffer("v", torch.zeros(self.k.shape, dtype=dtype, **store), persistent=False)
        wide = torch.promote_types(dtype, torch.float32)  # summaries and their scores: float32 or wider
        self.register_buffer("summaries", torch.zeros(batch, num_kv_heads, self.groups, n, head_dim, dtype=wide, device=device), persistent=False)
        self.register_buffer("q_tail", torch.zeros(batch, num_kv_heads, self.groups, chunk_size, head_dim, dtype=dtype, device=device), persistent=False)
        cos, sin = rope_table(rope, rope_theta, head_dim, min(num_chunks * chunk_size, max_len), device, dtype)
        self.register_buffer("cos", cos, persistent=False)  # (P, D): every position a query or key can get
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, q, k, v):
        """q: (B, H, T, D), k and v: (B, Hkv, T, D) of the next T tokens -> (B, H, T, D)."""
        check_inputs(q, k, v, cache=self)
        B, H, T, D = q.shape
        start = self.length
        qg = q.reshape(B, -1, self.groups, T, D)  # (B, Hkv, G, T, D): query head h reads kv head h // G
        self._store(qg, k, v)
        out = q.new_empty(B, H, T, D)
        near = min(T, max(0, self.K * self.w - start))  # queries in the first K chunks
        if near:
            out[:, :, :near] = self._attend_all(q[:, :, :near], start)
        outg = out.view(B, -1, self.groups, T, D)
        for s in range(start + near, start + T, self.block_size):
            e = min(start + T, s + self.block_size)
            outg[..., s - start:e - start, :] = self._attend(qg[..., s - start:e - start, :], s, e)
        self.scratch.clear()  # the working memory of one call, not of every layer's cache
        return out

    def _attend_all(self, q, s):
        """§2, g < K: queries s.. (B, H, b, D) read every chunk at its true position: causal attention."""
        e = s + q.shape[2]
        chunk_start = torch.arange(e, device=q.device) // self.w * self.w  # (e,)
        # RoPE composes: a key rotated to its chunk-local offset, then by its chunk's start, is
        # the key at its true position
        k, v = self._span(0, e)
        k = apply_rope(k, self.cos[chunk_start], self.sin[chunk_start])  # (B, Hkv, e, D)
        q = apply_rope(q, self.cos[s:e], self.sin[s:e])
        return causal_attention(q, k, v)

    def _store(self, q, k, v):
        """Write local-RoPE keys and values; summarise every chunk these tokens complete."""
        start, T, w = self.length, q.shape[-2], self.w
        offsets = torch.arange(start, start + T, device=k.device) % w
        self.k[:, :, start:start + T] = apply_rope(k, self.cos[offsets], self.sin[offsets])
        self.v[:, :, start:start + T] = v
        self.length = start + T
        # why: a chunk's summary needs the queries of all its tokens, some of which came earlier
        tail = start % w
        q = q if tail == 0 else torch.cat([self.q_tail[..., :tail, :], q], dim=-2)  # (B, Hkv, G, tail + T, D)
        first, done = start // w, (start + T) // w  # chunks first..done-1 complete now
        step = max(1, SUMMARY_TOKENS // w)
        for c in range(first, done, step):
            self._summarise(q[..., (c - first) * w:(min(c + step, done) - first) * w, :], c)
        left = (start + T) % w
        self.q_tail[..., :left, :] = q[..., q.shape[-2] - left:, :]

    def _summarise(self, q, first):
        """Summaries of the complete chunks first, first + 1, ... whose raw queries are q."""
        B, Hkv, G, n_tok, D = q.shape
        w, n = self.w, n_tok // self.w
        q = apply_rope(q.reshape(B, Hkv, G, n, w, D), self.cos[:w], self.sin[:w])  # (B, Hkv, G, n, w, D)
        k, v = (x.view(B, Hkv, 1, n, w, D) for x in self._span(first * w, (first + n) * w))
        self.summaries[:, :, :, first:first + n] = chunk_summaries(q, k, v)

    def _span(self, s, e):
        """Keys and values of tokens s..e-1 where the queries are: (B, Hkv, e - s, D) each."""
        device = self.summaries.device
        return (self.k[:, :, s:e].to(device, non_blocking=True), self.v[:, :, s:e].to(device, non_blocking=True))

    def _chunks(self, ids):
        """Keys and values of chunks ids (flat indices into k.view(-1, w, D)): (len(ids), w, D) each."""
        device, shape = self.summaries.device, (len(ids), self.w, self.k.shape[-1])
        if self.k.device != device:  # offloaded: the CPU gathers the chunks, then they move over
            ids = ids.cpu()  # why: the CPU must know what to send; the one wait per block offloading costs
        return tuple(torch.index_select(x.view(-1, *shape[1:]), 0, ids, out=self._scratch(name, shape, x)).to(device, non_blocking=True)
                     for name, x in [("k", self.k), ("v", self.v)])

    def _scratch(self, name, shape, like):
        """A buffer reused from block to block, on like's device: on the CPU, fresh large tensors
        cost page faults every time; offloaded, it is the pinned staging area for the GPU."""
        n = math.prod(shape)
        buf = self.scratch.get(name)
        if buf is None or buf.numel() < n:
            buf = self.scratch[name] = torch.empty(n, dtype=like.dtype, device=like.device, pin_memory=like.is_pinned())
        return buf[:n].view(shape)

    def _attend(self, q, s, e):
        """Queries s..e-1, all past the first K chunks, q: (B, Hkv, G, b, D) -> their outputs.

        Every query reads its own K chunks, exactly: its own chunk (causal) from one window of
        keys shared by the block, and the other K - 1 through tiles: (query, chunk) pairs grouped
        by chunk, TILE queries per read of a chunk's keys. The K partial softmaxes are merged.
        """
        B, Hkv, G, b, D = q.shape
        w, K, dev = self.w, self.K, q.device
        t = torch.arange(s, e, device=dev)
        scores = self.scores(q, (e - 1) // w - 1)  # (B, Hkv, G, b, n - 1)
        ids = select_chunks(scores, t // w, K, self.layout, self.local_chunks)  # (B, Hkv, G, b, K)
        # §3: rank r is read from (K - 1 - r) * w + o, whichever chunk it is: the query moves
        pos = (K - 1 - torch.arange(K, device=dev)) * w + t[:, None] % w  # (b, K)
        qr = apply_rope(q[..., None, :], self.cos[pos], self.sin[pos]) / math.sqrt(D)  # (B, Hkv, G, b, K, D)
        n, m = self.k.shape[2] // w, (e - 1) // w + 1  # chunks in the cache, chunks up to the block's end
        heads = torch.arange(B * Hkv, device=dev).view(B, Hkv, 1, 1, 1)  # (B, Hkv) as one index
        size = min(TILE, G * b)  # no chunk is picked by more pairs than the group has queries
        tile, slot, tile_key = pack((ids[..., :-1] + m * heads).flatten(), size, B * Hkv * m)  # (P,), (P,), (n_tiles,)
        tile_chunk = tile_key // m * n + tile_key % m  # rows of k.view(-1, w, D)
        n_tiles = len(tile_chunk)
        qt = qr.new_zeros(n_tiles, size, D).index_put_((tile, slot), qr[..., :-1, :].flatten(0, -2))
        kt, vt = self._chunks(tile_chunk)  # (n_tiles, w, D) each: one read of a chunk per tile
        logits = torch.bmm(qt, kt.transpose(1, 2), out=self._scratch("p", (n_tiles, size, w), qt))  # (n_tiles, size, w)
        top, mass, out = (x[tile, slot].view(B, Hkv, G, b, K - 1, *x.shape[2:])  # back to (query, rank)
                          for x in partial_softmax(logits, vt))
        own_top, own_mass, own_out = self._own_chunk(qr[..., -1, :], s, e)  # rank K - 1
        top, mass = torch.cat([top, own_top[..., None]], -1), torch.cat([mass, own_mass[..., None]], -1)
        return merge(top, mass, torch.cat([out, own_out[..., None, :]], -2)).to(q.dtype)  # (B, Hkv, G, b, D)

    def scores(self, q, n):
        """candidate_scores of chunks 1..n-1 for raw queries q (B, Hkv, G, b, D)."""
        if self.local_chunks == self.K - 1:  # a window: no candidates to score
            return q.new_zeros(*q.shape[:-1], n - 1)
        keys = self.k[:, :, :n * self.w].to(q.device) if self.select == "maxkey" else None
        rope_w = self.cos[self.w], self.sin[self.w]
        return candidate_scores(q, self.summaries[:, :, :, :n], keys, rope_w, self.select)

    def _own_chunk(self, q, s, e):
        """Queries s..e-1, rotated for rank K - 1, read their own chunk up to themselves.

        The keys from the first query's chunk start to e form one window that every query of
        the block reads; a mask keeps each query to its own chunk. Returns partial_softmax parts.
        """
        lo = s // self.w * self.w
        t, u = torch.arange(s, e, device=q.device), torch.arange(lo, e, device=q.device)
        k, v = self._span(lo, e)
        logits = q @ k[:, :, None].transpose(-1, -2)  # (B, Hkv, G, b, e - lo)
        mine = (u // self.w == t[:, None] // self.w) & (u <= t[:, None])  # (b, e - lo)
        return partial_softmax(logits.masked_fill_(~mine, float("-inf")), v[:, :, None])


def partial_softmax(logits, v):
    """Softmax attention in pieces that merge later: logits (..., n), v (..., n, D).

    Returns the row maxima (...), the mass sum(exp(logits - max)) (...), and the unnormalised
    output exp(logits - max) @ v (..., D). Works in place on logits.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # softmax in float32+
    top = logits.amax(dim=-1, keepdim=True)
    p = logits.sub_(top).exp_()
    return top.squeeze(-1), p.sum(-1), p.to(v.dtype) @ v


def merge(top, mass, out):
    """Merge m partial softmaxes: top, mass (..., m), out (..., m, D) -> attention output (..., D)."""
    scale = torch.exp(top - top.amax(dim=-1, keepdim=True))  # rescale each to the largest maximum
    return (scale[..., None] * out).sum(-2) / (scale * mass).sum(-1)[..., None]


def pack(key, size, num_keys):
    """Group equal keys into tiles of `size`: the tile and slot of every item, and each tile's key.

    key: (P,) integers in [0, num_keys). Items with the same key fill tiles one after another;
    only a key's last tile can be partly empty. Returns tile (P,), slot (P,), tile_key (n_tiles,).
    """
    count = torch.zeros(num_keys, dtype=torch.long, device=key.device).index_add_(0, key, torch.ones_like(key))
    tiles = (count + size - 1) // size  # (num_keys,)
    first_tile, first_item = tiles.cumsum(0) - tiles, count.cumsum(0) - count
    order = key.argsort(stable=True)
    rank = torch.empty_like(key)
    rank[order] = torch.arange(len(key), device=key.device) - first_item[key[order]]  # place within its key
    tile, slot = first_tile[key] + rank // size, rank % size
    full, bound = len(key) // size, len(key) // size + min(num_keys, len(key))  # each key: one partial tile
    # why: on CUDA the exact count is a host-device sync; the bound needs none but computes empty
    # tiles, so it is taken where they are at most as many as the full ones (on the CPU, never)
    n_tiles = bound if key.is_cuda and bound <= 2 * full + 1 else int(tiles.sum())
    tile_key = torch.zeros(n_tiles, dtype=torch.long, device=key.device).index_put_((tile,), key)
    return tile, slot, tile_key


# ----------------------------------------------------------------------------- the function to copy

def longheads_attention(q, k, v, *, num_chunks, chunk_size=CHUNK_SIZE, rope_theta=10000.0,
                        rope=None, block_size=None, layout=LAYOUT, select=SELECT,
                        local_chunks=LOCAL_CHUNKS):
    """Causal LongHeads attention over a whole sequence.

    q: (B, H, T, D), k and v: (B, Hkv, T, D), all before RoPE; H a multiple of Hkv (GQA).
    num_chunks: K, chunks per head; the default rule is default_num_chunks(trained length).
    rope: None (RoPE with base rope_theta), inverse frequencies (D/2,), or a (cos, sin) pair of
    (P, D) tables, for scaled RoPE. block_size: queries per block (default: at most chunk_size,
    and about BLOCK_SCORES scores); it bounds the working memory. layout: the order of the
    picked chunks, "position" (the paper's) or "score" (select_chunks). select: how candidate
    chunks are scored, "summary" (the paper's) or "maxkey" (candidate_scores). local_chunks:
    how many of the newest chunks are always read (select_chunks; 2 is the paper's).
    Returns (B, H, T, D).
    With num_chunks * chunk_size >= T this is ordinary causal attention with RoPE at true positions.
    """
    check_inputs(q, k, v)
    B, H, T, D = q.shape
    cache = LongHeadsCache(B, H, k.shape[1], T, D, chunk_size=chunk_size, num_chunks=num_chunks,
                           rope=rope, rope_theta=rope_theta, block_size=block_size, dtype=q.dtype,
                           device=q.device, layout=layout, select=select,
                           local_chunks=local_chunks)
    return cache(q, k, v)


# ----------------------------------------------------------------------------- argument checks

def check_config(num_heads, num_kv_heads, chunk_size, num_chunks, block_size=None, layout=LAYOUT,
                 select=SELECT, local_chunks=LOCAL_CHUNKS):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if select not in SELECTS:
        raise ValueError(f"select must be one of {', '.join(SELECTS)}, got {select!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if num_chunks < 3:
        raise ValueError(f"num_chunks must be >= 3 (chunk 0, the previous and the own chunk are "
                         f"always read), got {num_chunks}")
    if not 2 <= local_chunks <= num_chunks - 1:
        raise ValueError(f"local_chunks must lie in [2, num_chunks - 1] (the own and previous "
                         f"chunk at least, chunk 0 besides), got {local_chunks}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"the query heads ({num_heads}) must be a multiple of the key/value "
                         f"heads ({num_kv_heads})")


def check_inputs(q, k, v, cache=None):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q must be (B, H, T, D) and k, v (B, Hkv, T, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]) or q.shape[3] % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, T and an "
                         f"even D")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if cache is not None:
        B, Hkv, n_tok, D = cache.k.shape
        if (k.shape[0], k.shape[1], k.shape[3]) != (B, Hkv, D) or q.shape[1] != Hkv * cache.groups:
            raise ValueError(f"the cache holds B={B}, H={Hkv * cache.groups}, Hkv={Hkv}, D={D}; "
                             f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
        if cache.length + q.shape[2] > cache.max_len:
            raise ValueError(f"the cache holds max_len={cache.max_len} tokens; it has "
                             f"{cache.length} and got {q.shape[2]} more: make it larger")
        if q.dtype != cache.k.dtype or q.device != cache.k.device or k.device != q.device or v.device != q.device:
            raise ValueError(f"q, k, v are {q.dtype} on {q.device}, {k.device}, {v.device}, but the "
                             f"cache is {cache.k.dtype} on {cache.k.device}: make them match")


# ----------------------------------------------------------------------------- the slow reference

def longheads_reference(q, k, v, *, num_chunks, chunk_size=CHUNK_SIZE, rope_theta=10000.0,
                        rope=None, layout=LAYOUT, select=SELECT, local_chunks=LOCAL_CHUNKS):
    """The definition, one query at a time: select chunks, lay them out, rotate, attend.

    Written straight from DESIGN §1-§3, with nothing shared with the fast path but the RoPE
    helpers. Slow: a test oracle and a tutorial.
    """
    B, H, T, D = q.shape
    w, K, G = chunk_size, num_chunks, H // k.shape[1]
    cos, sin = rope_table(rope, rope_theta, D, min(K * w, T), q.device, q.dtype)
    out = torch.zeros_like(q)
    for z in range(B):
        for h in range(H):
            qh, kh, vh = q[z, h], k[z, h // G], v[z, h // G]  # (T, D)
            summaries = [reference_summary(qh[j * w:(j + 1) * w], kh[j * w:(j + 1) * w],
                                           vh[j * w:(j + 1) * w], cos, sin) for j in range(T // w)]
            for t in range(T):
                scores = {j: reference_score(qh[t], j, summaries, kh, w, cos, sin, select)
                          for j in range(1, t // w - 1)}
                chunks = reference_selection(scores, t // w, K, layout, local_chunks)
                out[z, h, t] = reference_query(qh[t], kh, vh, t, chunks, w, cos, sin)
    return out


def reference_summary(q, k, v, cos, sin):
    """§1 for one chunk and head: q, k, v (w, D) -> summary key (D,)."""
    w, D = q.shape
    qt, kt = apply_rope(q, cos[:w], sin[:w]), apply_rope(k, cos[:w], sin[:w])
    o = torch.softmax(qt @ kt.T / math.sqrt(D), dim=-1) @ v  # (w, D), no causal mask
    s = o.mean(dim=0)  # (D,)
    return torch.softmax(kt @ s / math.sqrt(D), dim=0) @ kt  # (D,)


def reference_score(q, j, summaries, k, w, cos, sin, select="summary"):
    """§2: how well candidate chunk j suits raw query q (D,); k: the head's raw keys (T, D)."""
    if select == "summary":
        return float(q @ summaries[j])
    keys = apply_rope(k[j * w:(j + 1) * w], cos[:w], sin[:w])  # (w, D) at chunk-local positions
    return float((keys @ apply_rope(q, cos[w], sin[w])).max())  # the query just after the chunk


def reference_selection(scores, g, K, layout=LAYOUT, local_chunks=LOCAL_CHUNKS):
    """§2 for one query in chunk g, scores {candidate: score}: the chunks it reads, in order."""
    if g < K:
        return list(range(g + 1))
    candidates = [j for j in scores if j <= g - local_chunks]  # the newest are read anyway
    best = sorted(candidates, key=scores.get, reverse=True)[:K - 1 - local_chunks]
    newest = list(range(g - local_chunks + 1, g + 1))
    return [0, *(sorted(best) if layout == "position" else best[::-1]), *newest]


def reference_query(q, k, v, t, chunks, w, cos, sin):
    """§3 for query t: chunk of rank r gets positions r*w.., the query (K'-1)*w + t mod w."""
    keys, values, positions = [], [], []
    for r, j in enumerate(chunks):
        u = torch.arange(j * w, min((j + 1) * w, t + 1))  # causal in the own chunk, self included
        keys.append(k[u]), values.append(v[u]), positions.append(r * w + u - j * w)
    pos = torch.cat(positions)
    q_pos = (len(chunks) - 1) * w + t % w
    kr = apply_rope(torch.cat(keys), cos[pos], sin[pos])  # (n_keys, D)
    qr = apply_rope(q, cos[q_pos], sin[q_pos])  # (D,)
    att = torch.softmax(kr @ qr / math.sqrt(q.shape[-1]), dim=0)  # (n_keys,)
    return att @ torch.cat(values)
