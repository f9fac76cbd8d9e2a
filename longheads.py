"""LongHeads attention: every head reads a long context through a window it was trained on.

LongHeads (Lu et al., "LongHeads: Multi-Head Attention is Secretly a Long Context Processor",
arXiv 2402.10685) lets a RoPE model trained on L tokens read far more, with no training. The
context is cut into chunks of w tokens. Every head, for every query, picks K chunks (K * w <= L):
chunk 0, the previous chunk, its own chunk, and the K - 3 chunks whose summary key scores highest
against the query. The picked chunks are laid side by side, in text order, with fresh contiguous
positions, so no query ever sees a distance the model was not trained on. Different heads pick
different chunks, so together they cover the whole context, and a query reads K * w keys, not T.

Words used throughout: chunk g holds tokens g*w .. g*w + w - 1; a query in chunk g sits at
offset o = t - g*w. A picked chunk's *rank* is its place, 0..K-1, in the query's laid-out view:
rank r gets positions r*w .. r*w + w - 1, and the own chunk is always rank K - 1. RoPE only sees
distances, so keys are rotated once, to their offset in their chunk, and the query carries the
rest: against rank r it is rotated to (K - 1 - r) * w + o. DESIGN.md, in this repository, is the
specification; its sections are cited as §n.

The file reads from the plainest statement down:
1. longheads_reference: the method one query at a time, a dozen lines per step. Slow: the test
   oracle, and the place to start reading.
2. The section to copy (math and torch only): longheads_attention computes the same thing a
   chunk of queries at a time. Per head, the union of the chunks its w queries picked is
   gathered once, every query scores all of it, and the keys of chunks it did not pick are
   masked: wasted work, but short and exact. tiled.py, the fast path the model runs, reads only
   what each query picked. Autograd works through it; without autograd its memory is linear in
   T, with it about T^2 (every chunk's work is kept for the backward pass).

Short names, one meaning each, here and in tiled.py:
    B batch, H query heads, Hkv key/value heads, G = H // Hkv query heads per key/value head,
    T tokens, D head dim, w chunk size (chunk_size), K chunks a query reads (num_chunks),
    n chunks in the context (the last one may be partial), t a token, g a query's own chunk,
    o its offset in it, r a rank,
    S candidates scored: a table of scores (..., S) holds chunks 1..S, chunk j in column j - 1,
    b queries scored together, U slots of a union: the most chunks one head's b queries picked
    together, over all heads (a head that picked fewer fills its slots with unpicked chunks);
    tiled.py adds m, chunks up to a block's last query, and P, (query, chunk) pairs.
"""
import math

import torch


# ----------------------------------------------------------------------------- one query at a time

def longheads_reference(q, k, v, *, num_chunks, chunk_size=256, rope_theta=10000.0, rope=None):
    """The definition, one query at a time: summarise chunks, select, lay out, attend.

    q (B, H, T, D), k, v (B, Hkv, T, D) before RoPE -> (B, H, T, D). Written straight from
    DESIGN.md §1-§3, sharing nothing with longheads_attention or the fast path but the RoPE
    helpers.
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
                g = t // w
                scores = {j: float(qh[t].detach() @ summaries[j].detach()) for j in range(1, g - 1)}
                chunks = reference_selection(scores, g, K)
                out[z, h, t] = reference_query(qh[t], kh, vh, t, chunks, w, cos, sin)
    return out


def reference_summary(q, k, v, cos, sin):
    """§1 for one chunk and head: q, k, v (w, D) -> summary key (D,)."""
    w, D = q.shape
    qt, kt = apply_rope(q, cos[:w], sin[:w]), apply_rope(k, cos[:w], sin[:w])
    out = torch.softmax(qt @ kt.T / math.sqrt(D), dim=-1) @ v  # (w, D), no causal mask
    chunk_query = out.mean(dim=0)  # (D,)
    return torch.softmax(kt @ chunk_query / math.sqrt(D), dim=0) @ kt  # (D,)


def reference_selection(scores, g, K):
    """§2 for one query in chunk g, scores {candidate: score} of chunks 1..g-2: the chunks it
    reads, in text order (all of them while g < K). Of equal scores the earlier chunk wins."""
    if g < K:
        return list(range(g + 1))
    best = sorted(scores, key=scores.get, reverse=True)[:K - 3]  # stable: earlier wins ties
    return [0, *sorted(best), g - 1, g]


def reference_query(q, k, v, t, chunks, w, cos, sin):
    """§3 for query t reading chunks (K' = len(chunks): K, or g + 1 while g < K): the chunk of
    rank r gets positions r*w.., the query (K' - 1)*w + t mod w."""
    keys, values, positions = [], [], []
    for r, j in enumerate(chunks):
        u = torch.arange(j * w, min((j + 1) * w, t + 1))  # causal in the own chunk, self included
        keys.append(k[u]), values.append(v[u]), positions.append(r * w + u - j * w)
    k_pos = torch.cat(positions)  # (n_keys,)
    q_pos = (len(chunks) - 1) * w + t % w
    kr = apply_rope(torch.cat(keys), cos[k_pos], sin[k_pos])  # (n_keys, D)
    qr = apply_rope(q, cos[q_pos], sin[q_pos])  # (D,)
    att = torch.softmax(kr @ qr / math.sqrt(q.shape[-1]), dim=0)  # (n_keys,)
    return att @ torch.cat(values)


# ============================================================================ copy from here
# RoPE here rotates halves (dims i, i + D/2), as Hugging Face does; for interleaved pairs, see
# the README's "Use it in your model". The section imports what it needs: it runs as pasted.
import math  # noqa: E402, F811
import torch  # noqa: E402

CHUNK_SIZE = 256  # the paper's chunk size, the default of every entry point


def rope_inv_freq(head_dim, theta=10000.0):
    """RoPE's inverse frequencies, exactly as Hugging Face computes them: (D/2,) float32."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)


def rope_cos_sin(inv_freq, positions, dtype=torch.float32):
    """cos and sin tables for integer positions: each (len(positions), D), in dtype."""
    # why float64: float32 loses digits far out, and remapped positions must give exact angles
    angles = positions.double()[:, None] * inv_freq.double()  # (len(positions), D/2)
    angles = angles.repeat(1, 2)  # (len(positions), D): angle i serves dims i and i + D/2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_table(rope, rope_theta, head_dim, length, device, dtype=torch.float32):
    """(cos, sin), each (length, D), float32 or wider, from RoPE in one of three forms: None (then
    rope_theta), inverse frequencies (D/2,), or (cos, sin) tables of at least length rows."""
    dtype = torch.promote_types(dtype, torch.float32)
    if isinstance(rope, (tuple, list)):  # tables, as Hugging Face's models pass them
        cos, sin = (x[:length].to(device, dtype) for x in rope)
    else:
        inv_freq = rope_inv_freq(head_dim, rope_theta) if rope is None else rope  # (D/2,)
        cos, sin = rope_cos_sin(inv_freq.to(device), torch.arange(length, device=device), dtype)
    need(cos.shape == sin.shape == (length, head_dim), f"rope: need ({head_dim // 2},) inverse "
         f"frequencies or cos/sin tables of ({length} or more, {head_dim}), got cos "
         f"{tuple(cos.shape)} and sin {tuple(sin.shape)}")
    return cos, sin


def apply_rope(x, cos, sin):
    """Rotate x (..., D) by angles whose cos/sin (..., D) broadcast against it (rotate-half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


def chunk_summaries(q, k, v):
    """§1: q (B, Hkv, G, n, w, D), k and v (B, Hkv, 1, n, w, D), all at chunk-local positions,
    n chunks -> one summary key per chunk and query head (B, Hkv, G, n, D), float32 or wider.
    Why a mean attention *output* may query keys (the paper's heuristic): q . summary is a
    weighted mean of q's logits against the chunk's keys, whatever chose the weights."""
    q, k, v = [x.to(torch.promote_types(q.dtype, torch.float32)) for x in (q, k, v)]
    scale = 1.0 / math.sqrt(q.shape[-1])
    inner = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # (B, Hkv, G, n, w, w)
    chunk_query = (inner @ v).mean(dim=-2, keepdim=True)  # (B, Hkv, G, n, 1, D)
    weights = torch.softmax(chunk_query @ k.transpose(-1, -2) * scale, dim=-1)  # (.., n, 1, w)
    return (weights @ k).squeeze(-2)  # (B, Hkv, G, n, D)


def select_chunks(scores, own, num_chunks):
    """§2: the K chunks (..., b, K) each query reads, in rank order, given scores (..., b, S) of
    candidates 1..S (q . summary, raw queries: see DESIGN.md §2 for why raw) and own (b,), each
    query's own chunk g >= K: chunk 0, the best K - 3 of chunks 1..g-2 in text order, g - 1, g.
    Columns past a query's g - 2 may be given (callers score the widest row once): they are
    barred. No step waits for the GPU."""
    top = num_chunks - 3  # the chunks chosen by score
    candidate = torch.arange(1, scores.shape[-1] + 1, device=scores.device)  # (S,): their ids
    barred = candidate > own[:, None] - 2  # (b, S): read anyway, or in the future
    scores = scores.masked_fill(barred, float("-inf"))
    # why not topk's indices: of equal scores (common in repeated text) the earlier must win
    kth = scores.topk(top, dim=-1).values[..., -1:] if top else float("inf")  # (..., b, 1)
    above, tied = scores > kth, scores == kth  # (..., b, S) each
    room = top - above.sum(-1, keepdim=True)  # (..., b, 1): places left for the tied ones
    keep = above | (tied & (tied.cumsum(-1) <= room))  # (..., b, S): exactly top per row
    # why a stable sort, not keep as a mask: the kept come first in chunk order, and the shape is
    # known in advance (a mask makes the GPU report a count); byte: not every device sorts bools
    best = keep.byte().sort(dim=-1, descending=True, stable=True).indices[..., :top] + 1
    newest = torch.stack([own - 1, own], -1).expand(*best.shape[:-1], 2)  # (..., b, 2): g-1, g
    return torch.cat([torch.zeros_like(newest[..., :1]), best, newest], dim=-1)  # (..., b, K)


def longheads_attention(q, k, v, *, num_chunks, chunk_size=CHUNK_SIZE, rope_theta=None,
                        rope=None):
    """Causal LongHeads attention: q (B, H, T, D), k, v (B, Hkv, T, D), before RoPE -> (B, H, T, D).

    K = num_chunks, w = chunk_size, K * w <= the trained length. RoPE: rope_theta (default
    10000), or rope, inverse frequencies (D/2,) or (cos, sin) tables of >= min(T, K * w) rows."""
    check_args(q, k, v, num_chunks, chunk_size, rope_theta, rope)
    B, H, T, D = q.shape
    Hkv, w, K, dev = k.shape[1], chunk_size, num_chunks, q.device
    G, n = H // Hkv, -(-T // w)  # query head h reads kv head h // G; chunks, the last partial
    dt = torch.promote_types(q.dtype, torch.float32)  # work in float32 or wider
    cos, sin = rope_table(rope, rope_theta or 10000.0, D, min(T, K * w), dev, dt)
    # Padding and unpicked slots name no real key: the zeros that pad the last chunk, ids below 0
    # (the first K chunks' "no chunk"), and union slots a query did not pick (union_of). They
    # are harmless because (1) table_rows gives every position up to K * w - 1 a RoPE row;
    # (2) union_of counts ids below 0 as chunk 0, read anyway; (3) an unpicked slot gets rank 0;
    # (4) attend_picks masks unpicked slots, and the own chunk's causal mask hides the padding,
    # which comes after every real query; (5) the padded chunk is never a candidate (candidates
    # are two chunks behind a query), and the padding queries' outputs are cut off at the end.
    table_rows = torch.arange(K * w, device=dev).clamp(max=len(cos) - 1)  # (K * w,): (1)
    cos, sin = cos[table_rows], sin[table_rows]  # (K * w, D) each
    pad = (0, 0, 0, n * w - T)  # zeros after the last token fill the last chunk
    qc = torch.nn.functional.pad(q.to(dt), pad).view(B, Hkv, G, n, w, D)
    kc, vc = (torch.nn.functional.pad(x.to(dt), pad).view(B, Hkv, 1, n, w, D) for x in (k, v))
    kc = apply_rope(kc, cos[:w], sin[:w])  # §3: keys rotated once, to their offset in the chunk
    summaries = chunk_summaries(apply_rope(qc, cos[:w], sin[:w]), kc, vc)  # (B, Hkv, G, n, D)
    out = []
    for g in range(n):  # a chunk of queries at a time
        if g < K:
            # every chunk so far is read: chunk j takes rank K - 1 - (g - j), which gives it its
            # true distance; ids below 0 name no chunk, and no slot of the union matches them
            ids = torch.arange(g + 1 - K, g + 1, device=dev).expand(B, Hkv, G, w, K)
        else:
            # (B, Hkv, G, w, S = g - 1): candidates 1..g-1, unscaled (only the order matters)
            scores = qc[..., g, :, :] @ summaries[..., 1:g, :].transpose(-1, -2)
            ids = select_chunks(scores, torch.full((w,), g, device=dev), K)  # (B, Hkv, G, w, K)
        out.append(attend_picks(qc[..., g, :, :], ids, g, kc, vc, cos, sin))  # (B, Hkv, G, w, D)
    out = torch.stack(out, -3)  # (B, Hkv, G, n, w, D)
    return out.view(B, H, n * w, D)[:, :, :T].to(q.dtype)  # (B, H, T, D)


def union_of(ids, g):
    """The chunks (B, Hkv, G, U) that the queries of chunk g pick together, ids (B, Hkv, G, w, K),
    newest first: slot 0 is the own chunk g. U is the most one head picks; a head that picks
    fewer fills its last slots with chunks it did not pick ("Padding and unpicked slots")."""
    picked = torch.zeros(*ids.shape[:3], g + 1, dtype=torch.bool, device=ids.device)
    # ids below 0 count as chunk 0, which every query picks anyway: (2) of "Padding and ..."
    picked.scatter_(-1, ids.clamp(min=0).flatten(-2), True)  # (B, Hkv, G, g + 1)
    U = int(picked.sum(-1).max())  # a wait for the GPU: fine here, the fast path has none
    # flip: entry i is chunk g - i; why a stable sort: the picked come first, newest first
    back = picked.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :U]
    return g - back  # (B, Hkv, G, U): chunk ids


def attend_picks(q, ids, g, kc, vc, cos, sin):
    """§3 for the queries of chunk g, q (B, Hkv, G, w, D) raw, each reading the chunks ids
    (B, Hkv, G, w, K) at their ranks: every query scores the union of its head's picks, and what
    it did not pick is masked. kc, vc (B, Hkv, 1, n, w, D), keys rotated to chunk offsets."""
    # The README's toy example, walked through (w = 4, K = 4, one head, n = 6 chunks, g = 5):
    # suppose the queries at offsets 0..3 pick ids [0, 2, 4, 5] three times, then [0, 3, 4, 5].
    #   union, newest first: [5, 4, 3, 2, 0], U = 5
    #   rank per slot for the query at offset 2 (token 22): [3, 2, 0 (unpicked), 1, 0]
    #   pos = (K - 1 - rank) * w + 2: [2, 6, 14 (masked), 10, 14]. Chunk 2's keys, rotated to
    #     offsets 0..3, sit 10 - 0 .. 10 - 3 before the query: in the README's view chunk 2
    #     holds positions 4..7 and the query 14, the same distances.
    (B, Hkv, G, w, K), D = ids.shape, q.shape[-1]
    union = union_of(ids, g)  # (B, Hkv, G, U)
    match = ids[..., None, :, :] == union[..., None, None]  # (B, Hkv, G, U, w, K)
    rank = match.int().argmax(-1)  # (B, Hkv, G, U, w): the slot's rank; 0 if unpicked (3)
    offset = torch.arange(w, device=q.device)  # (w,): a query's offset in chunk g
    pos = (K - 1 - rank) * w + offset  # (B, Hkv, G, U, w): the query's position per slot
    q = q[..., None, :, :] / math.sqrt(D)  # (B, Hkv, G, 1, w, D)
    qr = apply_rope(q, cos[pos], sin[pos])  # (B, Hkv, G, U, w, D)
    head_first = torch.arange(B * Hkv, device=q.device).view(B, Hkv, 1, 1) * kc.shape[3]
    rows = (union + head_first).flatten()  # (B * Hkv * G * U,): rows of kc.view(-1, w, D)
    # why whole rows, not take_along_dim: copying rows is several times faster
    ku, vu = (x.reshape(-1, w, D)[rows].view(B, Hkv, G, -1, w, D) for x in (kc, vc))
    logits = qr @ ku.transpose(-1, -2)  # (B, Hkv, G, U, w, w): query offset x key offset
    unpicked = ~match.any(-1)  # (B, Hkv, G, U, w): masked, (4)
    logits.masked_fill_(unpicked[..., None], float("-inf"))
    future = offset[:, None] < offset  # (w, w)
    logits[..., 0, :, :].masked_fill_(future, float("-inf"))  # slot 0, the own chunk: causal
    # why detach: the shift cancels out of the softmax, and detached, logits can change in place
    shift = logits.detach().amax((-3, -1), keepdim=True)  # (.., 1, w, 1): over U * w keys
    p = logits.sub_(shift).exp_()  # (B, Hkv, G, U, w, w)
    return (p @ vu).sum(-3) / p.sum((-3, -1))[..., None]  # (B, Hkv, G, w, D)


def need(ok, message):
    """Every argument rule is one line: need(rule, what to do)."""
    if not ok:
        raise ValueError(message)


def check_budget(num_chunks, chunk_size):
    positive = isinstance(chunk_size, int) and chunk_size >= 1
    need(positive, f"chunk_size must be a positive integer, got {chunk_size!r}")
    need(isinstance(num_chunks, int) and num_chunks >= 3, f"num_chunks must be an integer >= 3 "
         f"(chunk 0, the previous and the own chunk are always read), got {num_chunks!r}")


def check_args(q, k, v, num_chunks, chunk_size, rope_theta, rope):
    """One line for arguments LongHeads cannot compute with."""
    check_budget(num_chunks, chunk_size)
    need(rope is None or rope_theta is None, "give rope or rope_theta, not both")
    need(q.dim() == k.dim() == v.dim() == 4, f"q must be (B, H, T, D) and k, v (B, Hkv, T, D), "
         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    (B, H, T, D), (_, Hkv, _, _) = q.shape, k.shape
    need(k.shape == v.shape and (B, T, D) == (k.shape[0], k.shape[2], k.shape[3]),
         f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must agree in batch B, "
         f"tokens T and head dim D")
    need(T >= 1, "q, k, v hold no tokens (T = 0): give at least one")
    need(D % 2 == 0, f"the head dim must be even (RoPE turns pairs of dims), got {D}")
    need(Hkv >= 1 and H % Hkv == 0,
         f"the query heads ({H}) must be a multiple of the key/value heads ({Hkv})")
    need(q.dtype == k.dtype == v.dtype and q.dtype.is_floating_point,
         f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    need(q.device == k.device == v.device,
         f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


# ============================================================================ copy to here


def default_num_chunks(trained_length, chunk_size=CHUNK_SIZE):
    """The paper's rule: as many chunks as the trained length holds, K * w <= L (at least 3)."""
    return max(3, trained_length // chunk_size)


def check_config(num_heads, num_kv_heads, chunk_size, num_chunks):
    """The budget and the heads, for an entry point that sees no tensors yet."""
    check_budget(num_chunks, chunk_size)
    need(num_kv_heads >= 1 and num_heads % num_kv_heads == 0, f"the query heads ({num_heads}) "
         f"must be a multiple of the key/value heads ({num_kv_heads})")
