"""LongHeads attention: every head reads a long context through a window it was trained on.

LongHeads (Lu et al., "LongHeads: Multi-Head Attention is Secretly a Long Context Processor",
arXiv 2402.10685) lets a RoPE model trained on L tokens read far more, with no training. The
context is cut into chunks of w tokens. Every head, for every query, picks K chunks (K * w <= L):
chunk 0, the previous chunk, its own chunk, and the K - 3 chunks whose summary key scores highest
against the query. The picked chunks are laid side by side with fresh, contiguous positions, so
no query ever sees a distance the model was not trained on. Different heads pick different
chunks, so together they cover the whole context, and a query reads K * w keys, not T.

Words used throughout: chunk g holds tokens g*w .. g*w + w - 1; a query in chunk g sits at
offset o = t - g*w. A picked chunk's *rank* is its place, 0..K-1, in the query's laid-out view:
rank r gets positions r*w .. r*w + w - 1, and the own chunk is always rank K - 1. DESIGN.md, in
this repository, is the specification; its sections are cited as §n.

This file, top to bottom:
  - the function to copy: longheads_attention and the helpers it calls (RoPE, §1 summaries,
    §2 scores and selection), needing only math and torch; short, vectorized, autograd-friendly
  - LongHeadsCache: the fast tiled path that model.py runs, for prefill and decoding alike (§4)
  - longheads_reference: a slow per-query loop written straight from DESIGN.md, the test oracle

Shapes: B batch, H query heads, Hkv key/value heads, G = H // Hkv heads per group, T tokens,
D head dim, w chunk size, n chunks, K chunks per query, b queries in a block, U chunks a block
reads, P (query, chunk) pairs. Plain PyTorch (CPU and CUDA), written to be read; not a kernel.
"""

# ============================================================================ copy from here
import math

import torch

CHUNK_SIZE = 256  # the defaults, the same in every entry point (RESULTS.md says why)
LAYOUT, SELECT = "position", "summary"  # the paper's: picked chunks in their order, by summary
LOCAL_CHUNKS = 2  # the own chunk and the one before it are always read (the paper's)


def rope_inv_freq(head_dim, theta=10000.0):
    """RoPE's inverse frequencies, exactly as Hugging Face computes them: (D/2,) float32."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)


def rope_cos_sin(inv_freq, positions, dtype=torch.float32):
    """cos and sin tables for integer positions: each (len(positions), D), in dtype."""
    # why float64: float32 loses digits far out, and remapped positions must give exact angles
    angles = (positions.double()[:, None] * inv_freq.double()).repeat(1, 2)  # (P, D): i, i + D/2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate x (..., D) by angles whose cos/sin (..., D) broadcast against it (rotate-half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


def chunk_summaries(q, k, v):
    """§1: q (B, Hkv, G, n, w, D), k and v (B, Hkv, 1, n, w, D), all at chunk-local positions
    -> one summary key per chunk and query head (B, Hkv, G, n, D), in float32 or wider."""
    q, k, v = (x.to(torch.promote_types(q.dtype, torch.float32)) for x in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1])
    inner = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # (B, Hkv, G, n, w, w)
    s = (inner @ v).mean(dim=-2, keepdim=True)  # (B, Hkv, G, n, 1, D): the chunk's "query"
    weights = torch.softmax(s @ k.transpose(-1, -2) * scale, dim=-1)  # (B, Hkv, G, n, 1, w)
    return (weights @ k).squeeze(-2)  # (B, Hkv, G, n, D)


def candidate_scores(q, summaries, keys, rope_w, select=SELECT):
    """§2: scores (B, Hkv, G, b, n - 1) of candidates 1..n-1 for raw queries q (B, Hkv, G, b, D).
    "summary": q . summary key (summaries (B, Hkv, G, n, D)); q is raw, as a candidate's place is
    not known yet. "maxkey": the chunk's best key (keys (B, Hkv, n * w, D) at chunk-local
    positions), q at position w, so distances are 1..w (rope_w: its cos, sin)."""
    n = summaries.shape[-2]
    if select == "summary":
        return q.to(summaries.dtype) @ summaries[..., 1:, :].transpose(-1, -2)  # (..., b, n - 1)
    qw = apply_rope(q, *rope_w).to(summaries.dtype)  # (B, Hkv, G, b, D)
    k = keys[:, :, None, keys.shape[2] // n:].to(summaries.dtype)  # (B, Hkv, 1, (n - 1) * w, D)
    return (qw @ k.transpose(-1, -2)).unflatten(-1, (n - 1, -1)).amax(-1)  # (..., b, n - 1)


def select_chunks(scores, chunks, num_chunks, layout=LAYOUT, local_chunks=LOCAL_CHUNKS):
    """§2: the K chunks (..., b, K) each query reads, in rank order, given scores (..., b, n - 1)
    and chunks (b,), each query's chunk g >= K: chunk 0, the best K - 1 - local_chunks of chunks
    1..g-local_chunks (layout "position": in chunk order; "score": best last), the newest to g."""
    candidate = torch.arange(1, scores.shape[-1] + 1, device=scores.device)  # (n - 1,)
    barred = candidate > chunks[:, None] - local_chunks  # (b, n - 1): newest or not yet there
    scores, top = scores.masked_fill(barred, float("-inf")), num_chunks - 1 - local_chunks
    # why not topk's indices: of equal scores (common in repeated text) the earlier must win
    kth = scores.topk(top, dim=-1).values[..., -1:] if top else float("inf")  # (..., b, 1)
    above, tied = scores > kth, scores == kth  # (..., b, n - 1) each
    keep = above | tied & (tied.cumsum(-1) <= top - above.sum(-1, keepdim=True))  # top per row
    best = candidate.expand(keep.shape)[keep].view(*keep.shape[:-1], top)  # in chunk order
    if layout == "score":  # best last; of equal scores, the earlier chunk nearer the end
        best = best.flip(-1).gather(-1, scores.gather(-1, best.flip(-1) - 1).sort(stable=True)[1])
    newest = chunks[:, None] - torch.arange(local_chunks - 1, -1, -1, device=chunks.device)
    newest = newest.expand(*best.shape[:-1], local_chunks)  # (..., b, local_chunks)
    return torch.cat([torch.zeros_like(newest[..., :1]), best, newest], dim=-1)


def longheads_attention(q, k, v, *, num_chunks, chunk_size=CHUNK_SIZE, rope_theta=10000.0,
                        rope=None, layout=LAYOUT, select=SELECT, local_chunks=LOCAL_CHUNKS):
    """Causal LongHeads attention: q (B, H, T, D), k, v (B, Hkv, T, D), before RoPE -> (B, H, T, D).

    K = num_chunks, K * chunk_size <= trained length; rope: None (rope_theta), inverse frequencies
    (D/2,) or (cos, sin) of >= min(T, K * w) rows. Memory is linear in T; autograd works."""
    B, H, T, D = q.shape
    Hkv, w, K, dev = k.shape[1], chunk_size, num_chunks, q.device
    G, n = H // Hkv, -(-T // w)  # query head h reads kv head h // G; chunks, the last partial
    if (k.shape != v.shape or k.shape[2] != T or H % Hkv or not 2 <= local_chunks < K
            or layout not in ("position", "score") or select not in ("summary", "maxkey")):
        raise ValueError(f"need k, v (B, Hkv, T, D), H % Hkv == 0, 2 <= local_chunks < K; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, K = {K}, local_chunks = "
                         f"{local_chunks}, layout {layout!r}, select {select!r}")
    dt = torch.promote_types(q.dtype, torch.float32)  # work in float32 or wider
    cos, sin = rope if isinstance(rope, tuple) else rope_cos_sin(
        rope_inv_freq(D, rope_theta) if rope is None else rope, torch.arange(K * w), dt)
    cos, sin = cos[:K * w].to(dev, dt), sin[:K * w].to(dev, dt)  # (K * w, D): every position
    pad = lambda x: torch.cat([x.to(dt), x.new_zeros(*x.shape[:2], n * w - T, D, dtype=dt)], 2)
    qc = pad(q).view(B, Hkv, G, n, w, D)  # zero-padded to n * w tokens, cut into chunks
    kc, vc = (pad(x).view(B, Hkv, 1, n, w, D) for x in (k, v))
    kc = apply_rope(kc, cos[:w], sin[:w])  # §3: keys rotated once, to their offset in the chunk
    summaries = chunk_summaries(apply_rope(qc, cos[:w], sin[:w]), kc, vc)  # (B, Hkv, G, n, D)
    first_row = torch.arange(B * Hkv, device=dev).view(B, Hkv, 1, 1) * n  # in kc.view(-1, w, D)
    o, out = torch.arange(w, device=dev), []  # offsets in a chunk; outputs chunk by chunk
    for g in range(n):
        if g < K:  # chunks 0..g all fit, the own one at rank K - 1: true distances (< 0: empty)
            ids = torch.arange(g + 1 - K, g + 1, device=dev).expand(B, Hkv, G, w, K)
        else:
            scores = candidate_scores(qc[..., g, :, :], summaries[..., :g, :],  # keys: maxkey's
                                      kc[:, :, 0, :g].flatten(2, 3), (cos[w], sin[w]), select)
            ids = select_chunks(scores, torch.full((w,), g, device=dev), K, layout, local_chunks)
        read = torch.zeros(B, Hkv, G, g + 1, dtype=torch.bool, device=dev)  # picked by any query
        read.scatter_(-1, ids.clamp(min=0).flatten(-2), True)  # ids: (B, Hkv, G, w, K)
        U = int(read.sum(-1).max())  # the most chunks one head's block reads
        # why flip and a stable sort: read chunks come first, newest first, so slot 0 is the own
        # chunk g; a head that reads fewer than U fills its last slots with unread chunks
        union = g - read.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :U]
        match = ids[..., None, :, :] == union[..., None, None]  # (B, Hkv, G, U, w, K)
        pos = (K - 1 - match.int().argmax(-1)) * w + o  # (B, Hkv, G, U, w); unpicked: masked
        # why clamp: pads and unpicked slots (dropped, masked) may point past short tables, and
        # tables of min(T, K * w) rows hold every position a real query reads
        pos = pos.clamp(max=len(cos) - 1)
        qr = apply_rope(qc[..., g, None, :, :] / math.sqrt(D), cos[pos], sin[pos])  # (.., U, w, D)
        rows = (union + first_row).flatten()  # (B * Hkv * G * U,)
        ku, vu = (x.reshape(-1, w, D)[rows].view(B, Hkv, G, U, w, D) for x in (kc, vc))
        logits = qr @ ku.transpose(-1, -2)  # (B, Hkv, G, U, w, w): query offset x key offset
        logits.masked_fill_(~match.any(-1)[..., None], float("-inf"))  # not the query's chunk
        logits[..., 0, :, :].masked_fill_(o[:, None] < o, float("-inf"))  # own chunk: causal
        # why detach: the shift cancels out of the softmax, and detached, logits can change in place
        p = logits.sub_(logits.detach().amax((-3, -1), keepdim=True)).exp_()  # over U * w keys
        out.append((p @ vu).sum(-3) / p.sum((-3, -1))[..., None])  # (B, Hkv, G, w, D)
    return torch.stack(out, -3).view(B, H, n * w, D)[:, :, :T].to(q.dtype)  # (B, H, T, D)


# ============================================================================ copy to here


LAYOUTS = ("position", "score")  # the order of the picked chunks: the paper's, or best nearest
SELECTS = ("summary", "maxkey")  # how candidates are scored: the paper's, or a chunk's best key
SUMMARY_TOKENS = 4096  # chunks are summarised this many tokens at a time (bounds working memory)
BLOCK_SCORES = 2**24  # default query block: about this many (query, key) scores (64 MiB float32)
BLOCK_QUERIES = 512  # ... and at most this many queries, or one chunk of them if more
TILE = 32  # (query, chunk) pairs: a row is padded to a multiple of it (CPU), or is it (CUDA)
MASK_BLOCK = 1024  # queries per masked SDPA call after a cached prefix (it computes masked scores)
SDPA = torch.nn.functional.scaled_dot_product_attention


def default_num_chunks(trained_length, chunk_size=CHUNK_SIZE):
    """The paper's rule: as many chunks as the trained length holds, K * w <= L (at least 3)."""
    return max(3, trained_length // chunk_size)


def rope_table(rope, rope_theta, head_dim, length, device, dtype=torch.float32):
    """(cos, sin), each (length, D), from inverse frequencies, from given tables, or from theta."""
    dtype = torch.promote_types(dtype, torch.float32)
    if isinstance(rope, (tuple, list)):
        cos, sin = rope
        if (cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] < length
                or cos.shape[1] != head_dim):
            raise ValueError(f"rope: cos/sin tables must both be (P, {head_dim}) with P >= "
                             f"{length}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
        return cos[:length].to(device, dtype), sin[:length].to(device, dtype)
    inv_freq = rope_inv_freq(head_dim, rope_theta) if rope is None else rope
    if inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"rope: inverse frequencies must have shape ({head_dim // 2},), "
                         f"got {tuple(inv_freq.shape)}")
    return rope_cos_sin(inv_freq.to(device), torch.arange(length, device=device), dtype)


def causal_attention(q, k, v):
    """Causal attention of the last T of S positions: q (B, H, T, D), k, v (B, Hkv, S, D)."""
    T, S = q.shape[2], k.shape[2]
    if T in (1, S):  # one new token sees every key; a whole sequence is SDPA's own causal case
        return SDPA(q, k, v, is_causal=T > 1, enable_gqa=True)
    # why: after a cached prefix the mask must align bottom-right, which is_causal does not do,
    # and SDPA computes every score under an explicit mask: so blocks of queries each read the
    # keys up to their last one, and only a block's own triangle is computed in vain
    out = []
    for a in range(0, T, MASK_BLOCK):
        b = min(T, a + MASK_BLOCK)
        e = S - T + b  # keys up to the block's last query
        t = torch.arange(S - T + a, e, device=q.device)  # the block's positions
        mask = torch.arange(e, device=q.device) <= t[:, None]  # (b - a, e)
        out.append(SDPA(q[:, :, a:b], k[:, :, :e], v[:, :, :e], attn_mask=mask, enable_gqa=True))
    return torch.cat(out, dim=2)  # (B, H, T, D)


# ============================================================================ the fast path

class LongHeadsCache(torch.nn.Module):
    """Keys, values and chunk summaries of one attention layer, preallocated for max_len tokens.

    Calling it with the q, k, v of new tokens (before RoPE) stores them and returns their attention
    output. A prefill is one call with the whole prompt, a decoding step one call with one token:
    the same code runs both, so their outputs agree (§4). Keys are stored rotated once, to their
    offset in their chunk; the distance to a chunk's rank goes into the query instead (§3).
    Inference only: it writes its buffers in place, and nothing here supports autograd.
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
        self.w, self.K, self.groups = chunk_size, num_chunks, num_heads // num_kv_heads
        self.layout, self.select, self.local_chunks = layout, select, local_chunks
        # a block's working memory: its (query, key) scores, and its own-chunk window b x (b + w);
        # with a small budget a block holds several chunks of queries, so that the fixed cost of
        # a block (selection, layout, some 200 small operations) is shared by more queries
        per_query = batch * num_heads * num_chunks * chunk_size
        most = max(chunk_size, BLOCK_QUERIES)
        self.block_size = block_size or max(1, min(most, BLOCK_SCORES // per_query))
        self.max_len, self.length, self.scratch = max_len, 0, {}
        n = -(-max_len // chunk_size)  # chunks, the last one possibly partial
        # offload: keys and values live in pinned CPU memory; only what a block reads moves over
        store = dict(device="cpu", pin_memory=True) if offload else dict(device=device)
        kv_shape = (batch, num_kv_heads, n * chunk_size, head_dim)
        wide = torch.promote_types(dtype, torch.float32)  # summaries and scores: float32 or wider
        buffers = dict(
            k=torch.zeros(kv_shape, dtype=dtype, **store),  # rotated to their offset in the chunk
            v=torch.zeros(kv_shape, dtype=dtype, **store),
            summaries=torch.zeros(batch, num_kv_heads, self.groups, n, head_dim, dtype=wide,
                                  device=device),
            # the raw queries of the unfinished chunk: its summary will need them
            q_tail=torch.zeros(batch, num_kv_heads, self.groups, chunk_size, head_dim,
                               dtype=dtype, device=device))
        # (P, D) each: every position a query or a key can get
        cos, sin = rope_table(rope, rope_theta, head_dim, min(num_chunks * chunk_size, max_len),
                              device, dtype)
        for name, x in dict(buffers, cos=cos, sin=sin).items():
            self.register_buffer(name, x, persistent=False)

    def forward(self, q, k, v):
        """q: (B, H, T, D), k and v: (B, Hkv, T, D) of the next T tokens -> (B, H, T, D)."""
        check_inputs(q, k, v, cache=self)
        B, H, T, D = q.shape
        start = self.length
        qg = q.reshape(B, -1, self.groups, T, D)  # (B, Hkv, G, T, D): head h reads kv head h // G
        self._store(qg, k, v)
        out = q.new_empty(B, H, T, D)
        near = min(T, max(0, self.K * self.w - start))  # queries in the first K chunks
        if near:
            out[:, :, :near] = self._attend_all(q[:, :, :near], start)
        outg = out.view(B, -1, self.groups, T, D)  # (B, Hkv, G, T, D)
        for s in range(start + near, start + T, self.block_size):
            e = min(start + T, s + self.block_size)
            outg[..., s - start:e - start, :] = self._attend(qg[..., s - start:e - start, :], s, e)
        self.scratch.clear()  # the working memory of one call, not of every layer's cache
        return out

    def _attend_all(self, q, s):
        """§2, g < K: queries s.. (B, H, b, D) read every chunk at true positions: causal."""
        e = s + q.shape[2]
        chunk_start = torch.arange(e, device=q.device) // self.w * self.w  # (e,)
        # RoPE composes: a key rotated to its offset in the chunk, then by its chunk's start, is
        # the key at its true position
        k, v = self._span(0, e)
        k = apply_rope(k, self.cos[chunk_start], self.sin[chunk_start])  # (B, Hkv, e, D)
        q = apply_rope(q, self.cos[s:e], self.sin[s:e])  # (B, H, b, D)
        return causal_attention(q, k, v)

    def _store(self, q, k, v):
        """Write keys (rotated) and values; summarise every chunk these tokens complete."""
        start, T, w = self.length, q.shape[-2], self.w
        offsets = torch.arange(start, start + T, device=k.device) % w
        self.k[:, :, start:start + T] = apply_rope(k, self.cos[offsets], self.sin[offsets])
        self.v[:, :, start:start + T] = v
        self.length = start + T
        # why: a chunk's summary needs the queries of all its tokens, some of which came earlier
        tail = start % w
        if tail:
            q = torch.cat([self.q_tail[..., :tail, :], q], dim=-2)  # (B, Hkv, G, tail + T, D)
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
        q = q.reshape(B, Hkv, G, n, w, D)
        q = apply_rope(q, self.cos[:w], self.sin[:w])  # (B, Hkv, G, n, w, D)
        k, v = (x.view(B, Hkv, 1, n, w, D) for x in self._span(first * w, (first + n) * w))
        self.summaries[:, :, :, first:first + n] = chunk_summaries(q, k, v)

    def _span(self, s, e):
        """Keys and values of tokens s..e-1, where the queries are: (B, Hkv, e - s, D) each."""
        device = self.summaries.device
        return tuple(x[:, :, s:e].to(device, non_blocking=True) for x in (self.k, self.v))

    def _chunks(self, rows):
        """Keys and values of the chunks at rows of k.view(-1, w, D): (len(rows), w, D) each."""
        device, shape = self.summaries.device, (len(rows), self.w, self.k.shape[-1])
        if self.k.device != device:  # offloaded: the CPU gathers the chunks, then they move over
            rows = rows.cpu()  # why: the CPU must know what to send; offloading's one wait a block
        gathered = [torch.index_select(x.view(-1, *shape[1:]), 0, rows,
                                       out=self._scratch(name, shape, x))
                    for name, x in [("k", self.k), ("v", self.v)]]
        return tuple(x.to(device, non_blocking=True) for x in gathered)

    def _scratch(self, name, shape, like):
        """A buffer reused from block to block, on like's device: on the CPU, fresh large tensors
        cost page faults every time; offloaded, it is the pinned staging area for the GPU."""
        numel = math.prod(shape)
        buf = self.scratch.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.scratch[name] = torch.empty(numel, dtype=like.dtype, device=like.device,
                                                   pin_memory=like.is_pinned())
        return buf[:numel].view(shape)

    def scores(self, q, n):
        """candidate_scores of chunks 1..n-1 for raw queries q (B, Hkv, G, b, D)."""
        if self.local_chunks == self.K - 1:  # a window: no candidates to score
            return q.new_zeros(*q.shape[:-1], n - 1)
        keys = self.k[:, :, :n * self.w].to(q.device) if self.select == "maxkey" else None
        rope_w = self.cos[self.w], self.sin[self.w]
        return candidate_scores(q, self.summaries[:, :, :, :n], keys, rope_w, self.select)

    def _attend(self, q, s, e):
        """Queries s..e-1, all past the first K chunks, q: (B, Hkv, G, b, D) -> their outputs.

        Every query reads its own K chunks, exactly: its own chunk (causal) from one window of
        keys shared by the block, and the other K - 1 as (query, chunk) pairs laid out in rows by
        chunk (pack), one read of a chunk's keys per row. The K partial softmaxes are merged.
        """
        B, Hkv, G, b, D = q.shape
        w, K, dev = self.w, self.K, q.device
        t = torch.arange(s, e, device=dev)  # (b,) the queries' positions in the sequence
        m = (e - 1) // w + 1  # chunks up to the block's last query
        scores = self.scores(q, m - 2)  # (B, Hkv, G, b, m - 3): candidates end 2 before the own
        ids = select_chunks(scores, t // w, K, self.layout, self.local_chunks)  # (B, Hkv, G, b, K)
        # §3: rank r is read from (K - 1 - r) * w + o, whichever chunk it is: the query moves;
        # why the tables, not q, are scaled: they are (b, K, D), the rotated queries K times more
        pos = (K - 1 - torch.arange(K, device=dev)) * w + t[:, None] % w  # (b, K)
        cos, sin = (x[pos] / math.sqrt(D) for x in (self.cos, self.sin))  # (b, K, D) each
        qr = apply_rope(q[..., None, :], cos[:, :-1], sin[:, :-1])  # (B, Hkv, G, b, K - 1, D)
        # a pair's key: its head and chunk as one number, head-major: head * m + chunk
        heads = torch.arange(B * Hkv, device=dev).view(B, Hkv, 1, 1, 1) * m  # (B, Hkv, 1, 1, 1)
        pair_key = (ids[..., :-1] + heads).flatten()  # (P,), P = B * Hkv * G * b * (K - 1)
        size = min(TILE, G * b)  # no chunk is picked by more pairs than the group has queries
        # why whole rows on the CPU: a row per chunk reads its keys once; on CUDA, rows of `size`
        # are what pack can lay out without waiting for the GPU; and where no chunk can have more
        # than `size` pairs (a decoding step), rows of `size` are whole rows, in one group
        whole = not q.is_cuda and G * b > size
        place, groups = pack(pair_key, size, B * Hkv * m, whole=whole)  # (P,), rows
        slots = sum(len(key) * length for key, length in groups)
        q_rows = qr.new_zeros(slots, D).index_copy_(0, place, qr.reshape(-1, D))  # (slots, D)
        out, lse = self._read_rows(q_rows, groups, m)  # (slots, D), (slots,)
        # back from the rows to (query, rank): (B, Hkv, G, b, K - 1, D) and (..., K - 1)
        out, lse = out.index_select(0, place), lse.index_select(0, place)
        own_out, own_lse = self._own_chunk(apply_rope(q, cos[:, -1], sin[:, -1]), s, e)
        return merge(out.view(*qr.shape), lse.view(qr.shape[:-1]), own_out, own_lse).to(q.dtype)

    def _read_rows(self, q_rows, groups, m):
        """Each row of pairs against its chunk's keys: q_rows (slots, D) as pack laid them out,
        groups [(key, length)], keys head * m + chunk -> attention_lse's out (slots, D) and lse
        (slots,), one fused call per row length."""
        n, D = self.k.shape[2] // self.w, q_rows.shape[-1]  # n: chunks the cache holds, per head
        out, lse, first = [], [], 0
        for key, length in groups:
            rows = key // m * n + key % m  # (n_rows,): rows of k.view(-1, w, D)
            k_rows, v_rows = self._chunks(rows)  # (n_rows, w, D) each: one read of a chunk
            last = first + len(key) * length
            o, l = attention_lse(q_rows[first:last].view(-1, length, D), k_rows, v_rows)
            out.append(o.view(-1, D))  # (n_rows * length, D)
            lse.append(l.view(-1))  # (n_rows * length,)
            first = last
        return torch.cat(out), torch.cat(lse)

    def _own_chunk(self, q, s, e):
        """Queries s..e-1, q (B, Hkv, G, b, D) rotated for rank K - 1, read their own chunk up to
        themselves, all from one window of keys: from the first query's chunk start to e.
        Returns attention_lse's out (B, Hkv, G, b, D) and lse (B, Hkv, G, b)."""
        B, Hkv, G, b, D = q.shape
        lo = s // self.w * self.w  # the window's first key
        t, u = torch.arange(s, e, device=q.device), torch.arange(lo, e, device=q.device)
        k, v = self._span(lo, e)  # (B, Hkv, e - lo, D) each
        mine = (u // self.w == t[:, None] // self.w) & (u <= t[:, None])  # (b, e - lo)
        # the G query heads of a key/value head share its keys: one (G * b)-query problem each
        out, lse = attention_lse(q.reshape(B * Hkv, G * b, D), k.flatten(0, 1), v.flatten(0, 1),
                                 mine.repeat(G, 1))  # (B * Hkv, G * b, D), (B * Hkv, G * b)
        return out.view(B, Hkv, G, b, D), lse.view(B, Hkv, G, b)


def tiled_attention(q, k, v, *, num_chunks, chunk_size=CHUNK_SIZE, rope_theta=10000.0,
                    rope=None, block_size=None, layout=LAYOUT, select=SELECT,
                    local_chunks=LOCAL_CHUNKS):
    """longheads_attention through the fast tiled path: a LongHeadsCache used once.

    The same arguments, and block_size: queries per block (default: at most chunk_size, and
    about BLOCK_SCORES scores); it bounds the working memory. Inference only (no autograd).
    """
    check_inputs(q, k, v)
    B, H, T, D = q.shape
    cache = LongHeadsCache(B, H, k.shape[1], T, D, chunk_size=chunk_size, num_chunks=num_chunks,
                           rope=rope, rope_theta=rope_theta, block_size=block_size, dtype=q.dtype,
                           device=q.device, layout=layout, select=select,
                           local_chunks=local_chunks)
    return cache(q, k, v)


# why a private op: it is SDPA's CPU kernel, fused (no score matrix in memory), and unlike the
# public function it also returns the log-sum-exp that merging pieces needs
FUSED_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attention_lse(q, k, v, mask=None):
    """Attention of one piece of keys, and its log-sum-exp, so that pieces merge later.

    q (N, L, D), already scaled; k, v (N, S, D); mask (L, S), True where a query may look, or
    None. Returns softmax(q k^T) v (N, L, D) and logsumexp(q k^T) (N, L), float32 or wider.
    On the CPU, one fused kernel; elsewhere the plain computation, which is also its reference.
    """
    wide = torch.promote_types(q.dtype, torch.float32)
    if q.device.type == "cpu" and FUSED_CPU is not None:
        bias = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(
            ~mask, float("-inf"))  # (L, S): the kernel takes an additive mask of q's dtype
        out, lse = FUSED_CPU(q[:, None], k[:, None], v[:, None], attn_mask=bias, scale=1.0)
        return out[:, 0].to(wide), lse[:, 0].to(wide)  # (N, L, D), (N, L)
    return attention_lse_plain(q, k, v, mask)


def attention_lse_plain(q, k, v, mask=None):
    """attention_lse, written out: the fallback, and what the tests hold the fused kernel to."""
    wide = torch.promote_types(q.dtype, torch.float32)
    logits = (q @ k.transpose(-1, -2)).to(wide)  # (N, L, S)
    if mask is not None:
        logits.masked_fill_(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # (N, L)
    return (logits.sub_(lse[..., None]).exp_() @ v.to(wide)), lse  # (N, L, D), (N, L)


def merge(out, lse, one, one_lse):
    """One softmax from its pieces: m pieces out (..., m, D), lse (..., m), and one more, one
    (..., D), one_lse (...), -> attention (..., D), each piece weighed by its share of the mass."""
    weight = torch.softmax(torch.cat([lse, one_lse[..., None]], -1), dim=-1)  # (..., m + 1)
    # why a matmul: it reads the pieces once, where `(weight * out).sum()` writes them again
    return (weight[..., None, :-1] @ out).squeeze(-2) + weight[..., -1:] * one


def pack(key, size, num_keys, whole=True):
    """Lay items out in rows by key, rows end to end, for one fused kernel call per row length.

    key: (P,) integers in [0, num_keys). whole: one row per key, its items padded to a multiple
    of size; else rows of size (tiles), a key's items filling them one after another.
    Returns place (P,): each item's index in the rows laid end to end, and the rows as groups
    [(key (n,), length)]: n rows of that length and keys, in order, one group per length.
    """
    ones = torch.ones_like(key)
    count = torch.zeros(num_keys, dtype=torch.long, device=key.device).index_add_(0, key, ones)
    tiles = (count + size - 1) // size  # (num_keys,): rows of size per key
    order = key.argsort(stable=True)  # (P,): items grouped by key
    place = torch.empty_like(key)  # (P,): an item's place among the items of its key
    first_item = count.cumsum(0) - count  # (num_keys,)
    place[order] = torch.arange(len(key), device=key.device) - first_item[key[order]]
    if whole:
        length = tiles * size  # (num_keys,): each key's row, 0 where a key has no items
        by_length = length.argsort(stable=True)  # (num_keys,): rows of a length together
        ordered = length[by_length]
        start = torch.empty_like(length)
        start[by_length] = ordered.cumsum(0) - ordered  # (num_keys,): where a key's row begins
        lengths, counts = torch.unique_consecutive(ordered, return_counts=True)  # host: shapes
        ends = counts.cumsum(0)
        groups = [(by_length[end - c:end], L) for L, c, end in
                  zip(lengths.tolist(), counts.tolist(), ends.tolist()) if L]
        return start[key] + place, groups
    first_tile = tiles.cumsum(0) - tiles  # (num_keys,)
    tile, slot = first_tile[key] + place // size, place % size  # (P,) each
    full, bound = len(key) // size, len(key) // size + min(num_keys, len(key))
    # why: on CUDA the exact count is a host-device sync; the bound needs none but computes empty
    # tiles, so it is taken where they are at most as many as the full ones (on the CPU, never)
    n_tiles = bound if key.is_cuda and bound <= 2 * full + 1 else int(tiles.sum())
    tile_key = torch.zeros(n_tiles, dtype=torch.long, device=key.device)
    tile_key.index_put_((tile,), key)  # (n_tiles,): empty tiles keep key 0
    return tile * size + slot, [(tile_key, size)]


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
    B, H, T, D = q.shape
    if (B, T, D) != (k.shape[0], k.shape[2], k.shape[3]) or D % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, T and an "
                         f"even D")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if cache is not None:
        B, Hkv, n_tok, D = cache.k.shape
        if (k.shape[0], k.shape[1], k.shape[3]) != (B, Hkv, D) or q.shape[1] != Hkv * cache.groups:
            raise ValueError(f"the cache holds B={B}, H={Hkv * cache.groups}, Hkv={Hkv}, D={D}; "
                             f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
        if cache.length + q.shape[2] > cache.max_len:
            raise ValueError(f"the cache holds max_len={cache.max_len} tokens; it has "
                             f"{cache.length} and got {q.shape[2]} more: make it larger")
        device = cache.summaries.device  # where it computes (offloaded, k and v stay on the CPU)
        if q.dtype != cache.k.dtype or not q.device == k.device == v.device == device:
            raise ValueError(f"q, k, v are {q.dtype} on {q.device}, {k.device}, {v.device}, but "
                             f"the cache is {cache.k.dtype} on {device}: make them match")


# ----------------------------------------------------------------------------- the slow reference

def longheads_reference(q, k, v, *, num_chunks, chunk_size=CHUNK_SIZE, rope_theta=10000.0,
                        rope=None, layout=LAYOUT, select=SELECT, local_chunks=LOCAL_CHUNKS):
    """The definition, one query at a time: select chunks, lay them out, rotate, attend.

    Written straight from DESIGN.md §1-§3, with nothing shared with the fast path but the RoPE
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
