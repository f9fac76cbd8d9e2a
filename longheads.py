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
rank r gets positions r*w .. r*w + w - 1, and the own chunk is always rank K - 1. RoPE only sees
distances, so keys are rotated once, to their offset in their chunk, and the query carries the
rest: against rank r it is rotated to (K - 1 - r) * w + o. DESIGN.md, in this repository, is the
specification; its sections are cited as §n.

Short names, one meaning each, here and in tiled.py:
    B batch, H query heads, Hkv key/value heads, G = H // Hkv query heads per key/value head,
    T tokens, D head dim, w chunk size (chunk_size), K chunks a query reads (num_chunks),
    F chunks whose queries read everything (full_chunks, default K), n chunks in the context
    (the last one may be partial), t a token, g a query's own chunk, o its offset in it,
    r a rank,
    S candidates scored: a table of scores (..., S) holds chunks 1..S, chunk j in column j - 1,
    b queries scored together, U slots of a union: the most chunks one head's b queries picked
    together, over all heads (a head that picked fewer fills its slots with unpicked chunks);
    tiled.py adds m, chunks up to a block's last query, and P, (query, chunk) pairs.

longheads_attention, the section to copy (math and torch only), takes a chunk of queries at a
time: per head, the union of the chunks its w queries picked (U chunks) is gathered once, every
query scores all U * w keys, and the keys of chunks it did not pick are masked. Slot 0 of the
union is always the own chunk g (every query picks it), so the causal mask applies to slot 0
alone. Masked scores are wasted work, and the code stays short and exact; tiled.py, the fast
path, reads only what each query picked. Autograd works through longheads_attention. Without
autograd its memory is linear in T; with it, what every chunk computed is kept for the backward
pass, which grows about as T^2.
The argument rules are in the section (check_options, check_qkv); after it: the paper's number
of chunks, the checks of an entry point that sees no tensors yet (check_config), and
longheads_reference, a slow per-query loop written from DESIGN.md: the test oracle.
Plain PyTorch (CPU and CUDA), written to be read; not a kernel.
"""

# ============================================================================ copy from here
# RoPE here rotates halves (dims i and i + D/2), as Hugging Face does. For interleaved pairs
# (dims 2i, 2i + 1), reorder q, k and v to halves, x.unflatten(-1, (-1, 2)).transpose(-1, -2)
# .flatten(-2), and the output back (README: "What a copier must know").
import math

import torch

CHUNK_SIZE = 256  # the defaults, the same in every entry point (RESULTS.md says why)
LAYOUT = "position"  # the paper's: the picked chunks keep their order in the text
SELECT = "summary"  # the paper's: candidates are scored by their summary key
LOCAL_CHUNKS = 2  # the own chunk and the one before it are always read (the paper's)
LAYOUTS = ("position", "score")  # the order of the picked chunks: the paper's, or best nearest
SELECTS = ("summary", "maxkey")  # how candidates are scored: the paper's, or a chunk's best key


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
        positions = torch.arange(length, device=device)
        cos, sin = rope_cos_sin(inv_freq.to(device), positions, dtype)
    if cos.shape != (length, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"rope: need ({head_dim // 2},) inverse frequencies or cos/sin tables "
                         f"of ({length} or more, {head_dim}); they make cos {tuple(cos.shape)} "
                         f"and sin {tuple(sin.shape)}")
    return cos, sin


def apply_rope(x, cos, sin):
    """Rotate x (..., D) by angles whose cos/sin (..., D) broadcast against it (rotate-half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


def chunk_summaries(q, k, v):
    """§1: q (B, Hkv, G, n, w, D), k and v (B, Hkv, 1, n, w, D), all at chunk-local positions,
    n chunks -> one summary key per chunk and query head (B, Hkv, G, n, D), float32 or wider.

    Why a mean attention *output* may query keys (the paper's heuristic; its code does the
    same): the summary is a softmax-weighted mean of the chunk's own keys, so q . summary is a
    weighted mean of q's logits against them, whatever chose the weights. The chunk query only
    chooses them, an output (values' dims) against keys, which no training relates: a choice,
    not a trained quantity. select="maxkey" does without it."""
    q, k, v = [x.to(torch.promote_types(q.dtype, torch.float32)) for x in (q, k, v)]
    scale = 1.0 / math.sqrt(q.shape[-1])
    inner = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # (B, Hkv, G, n, w, w)
    chunk_query = (inner @ v).mean(dim=-2, keepdim=True)  # (B, Hkv, G, n, 1, D)
    weights = torch.softmax(chunk_query @ k.transpose(-1, -2) * scale, dim=-1)  # (.., n, 1, w)
    return (weights @ k).squeeze(-2)  # (B, Hkv, G, n, D)


def candidate_scores(q, summaries, keys, rope_w, select=SELECT):
    """§2: how well candidates 1..S suit raw queries q (B, Hkv, G, b, D): (B, Hkv, G, b, S),
    chunk j in column j - 1 (S, as everywhere: the number of chunks scored).

    "summary": q . summary key, summaries (B, Hkv, G, S + 1, D) of chunks 0..S; unscaled, as only
    the order matters. Why the raw query, against summaries of keys rotated to their offsets
    0..w-1 in their chunk: where a candidate will sit in the view is not known before it is
    picked, so every candidate is scored alike. The raw query is the query at position 0, the
    keys sit 0..w-1 after it: distances a causal model never trained on, the same for all.
    "maxkey": the chunk's best key, keys (B, Hkv, (S + 1) * w, D) at chunk-local positions, q
    rotated to position w (rope_w: its cos and sin, each (D,)), so that the distances are 1..w."""
    S = summaries.shape[-2] - 1
    if select == "summary":
        return q.to(summaries.dtype) @ summaries[..., 1:, :].transpose(-1, -2)  # (.., b, S)
    qw = apply_rope(q, *rope_w).to(summaries.dtype)  # (B, Hkv, G, b, D)
    w = keys.shape[2] // (S + 1)
    k = keys[:, :, None, w:].to(summaries.dtype)  # (B, Hkv, 1, S * w, D): chunks 1..S
    per_key = (qw @ k.transpose(-1, -2)).unflatten(-1, (S, w))  # (B, Hkv, G, b, S, w)
    return per_key.amax(-1)  # (B, Hkv, G, b, S): the best key of each chunk


def select_chunks(scores, own, num_chunks, layout=LAYOUT, local_chunks=LOCAL_CHUNKS):
    """§2: the K chunks (..., b, K) each query reads, in rank order, given scores (..., b, S) of
    candidates 1..S and own (b,), each query's own chunk g >= K: chunk 0, the best
    K - 1 - local_chunks of chunks 1..g-local_chunks (layout "position": in chunk order; "score":
    best last), then the newest local_chunks, up to g. Columns past a query's g - local_chunks
    may be given (callers score the widest row once): they are barred. No step waits for the
    GPU."""
    top = num_chunks - 1 - local_chunks  # the chunks chosen by score
    candidate = torch.arange(1, scores.shape[-1] + 1, device=scores.device)  # (S,): their ids
    barred = candidate > own[:, None] - local_chunks  # (b, S): read anyway, or in the future
    scores = scores.masked_fill(barred, float("-inf"))
    # why not topk's indices: of equal scores (common in repeated text) the earlier must win
    # (..., b, 1); why inf when top is 0: then no candidate is kept
    kth = scores.topk(top, dim=-1).values[..., -1:] if top else float("inf")
    above, tied = scores > kth, scores == kth  # (..., b, S) each
    room = top - above.sum(-1, keepdim=True)  # (..., b, 1): places left for the tied ones
    keep = above | (tied & (tied.cumsum(-1) <= room))  # (..., b, S): exactly top per row
    # why a stable sort, not keep as a mask: the kept come first in chunk order, and the shape is
    # known in advance (a boolean mask would make the GPU report a count to the host)
    # (..., b, top); byte: a sort takes no bools on every device
    kept = keep.byte().sort(dim=-1, descending=True, stable=True).indices[..., :top]
    best = kept + 1  # (..., b, top): candidate ids, in chunk order
    if layout == "score":  # best last; of equal scores, the earlier chunk nearer the end
        newest_first = best.flip(-1)
        # (..., b, top): candidate j's score is column j - 1
        by_score = scores.gather(-1, newest_first - 1).sort(dim=-1, stable=True).indices
        best = newest_first.gather(-1, by_score)  # (..., b, top): ascending score
    back = torch.arange(local_chunks - 1, -1, -1, device=own.device)  # (local_chunks,)
    newest = (own[:, None] - back).expand(*best.shape[:-1], local_chunks)  # (.., b, local)
    return torch.cat([torch.zeros_like(newest[..., :1]), best, newest], dim=-1)  # (..., b, K)


def longheads_attention(q, k, v, *, num_chunks, chunk_size=CHUNK_SIZE, rope_theta=10000.0,
                        rope=None, layout=LAYOUT, select=SELECT, local_chunks=LOCAL_CHUNKS,
                        full_chunks=None):
    """Causal LongHeads attention: q (B, H, T, D), k, v (B, Hkv, T, D), before RoPE -> (B, H, T, D).

    K = num_chunks; full_chunks = F >= K (default K): the queries of chunks 0..F-1 read every
    chunk at its true position, as full attention does; F * chunk_size <= trained length. rope:
    None (then rope_theta), inverse frequencies (D/2,), or (cos, sin) tables of >= min(T, F * w)
    rows."""
    check_options(num_chunks, chunk_size, layout, select, local_chunks, full_chunks)
    check_qkv(q, k, v)
    B, H, T, D = q.shape
    Hkv, w, K, dev = k.shape[1], chunk_size, num_chunks, q.device
    F = full_chunks or K  # chunks whose queries read everything
    G, n = H // Hkv, -(-T // w)  # query head h reads kv head h // G; chunks, the last partial
    dt = torch.promote_types(q.dtype, torch.float32)  # work in float32 or wider
    cos, sin = rope_table(rope, rope_theta, D, min(T, F * w), dev, dt)  # (min(T, F * w), D)
    # Padding and unpicked slots, told once (other places point here). Three kinds of entries
    # name no real key: the zeros that pad the last chunk; ids below 0, which the queries of the
    # first F chunks use for "no chunk"; and the slots of a head's union that a query did not
    # pick (union_of). Four things keep them harmless: (1) table_rows below gives a RoPE row to
    # every position up to F * w - 1, which such entries may be rotated to; (2) union_of counts
    # ids below 0 as chunk 0, which every query reads anyway; (3) an unpicked slot gets rank 0,
    # a position like any other; (4) attend_picks masks unpicked slots, and its causal mask on
    # the own chunk also hides the padding, which comes after every real query; (5) the padded
    # chunk's summary is never a candidate (a candidate is two chunks behind a query), and the
    # padding queries' outputs are cut off at the end.
    table_rows = torch.arange(F * w, device=dev).clamp(max=len(cos) - 1)  # (F * w,): (1)
    cos, sin = cos[table_rows], sin[table_rows]  # (F * w, D) each
    pad = (0, 0, 0, n * w - T)  # zeros after the last token fill the last chunk
    qc = torch.nn.functional.pad(q.to(dt), pad).view(B, Hkv, G, n, w, D)
    kc, vc = (torch.nn.functional.pad(x.to(dt), pad).view(B, Hkv, 1, n, w, D) for x in (k, v))
    kc = apply_rope(kc, cos[:w], sin[:w])  # §3: keys rotated once, to their offset in the chunk
    summaries = chunk_summaries(apply_rope(qc, cos[:w], sin[:w]), kc, vc)  # (B, Hkv, G, n, D)
    out = []
    for g in range(n):  # a chunk of queries at a time
        if g < F:
            # every chunk so far is read: chunk j takes rank F - 1 - (g - j), which gives it its
            # true distance; ids below 0 name no chunk, and no slot of the union matches them
            ids = torch.arange(g + 1 - F, g + 1, device=dev).expand(B, Hkv, G, w, F)
        else:
            keys = kc[:, :, 0, :g].flatten(2, 3)  # (B, Hkv, g * w, D): "maxkey" scores by them
            rope_w = cos[w], sin[w]  # (D,) each: position w
            scores = candidate_scores(qc[..., g, :, :], summaries[..., :g, :], keys, rope_w,
                                      select)  # (B, Hkv, G, w, S = g - 1): chunks 1..g-1
            own = torch.full((w,), g, device=dev)  # (w,): every query's own chunk
            ids = select_chunks(scores, own, K, layout, local_chunks)  # (B, Hkv, G, w, K)
        out.append(attend_picks(qc[..., g, :, :], ids, g, kc, vc, cos, sin))  # (B, Hkv, G, w, D)
    out = torch.stack(out, -3)  # (B, Hkv, G, n, w, D)
    return out.view(B, H, n * w, D)[:, :, :T].to(q.dtype)  # (B, H, T, D)


def union_of(ids, g):
    """The chunks (B, Hkv, G, U) that the queries of chunk g pick together, ids (B, Hkv, G, w, K),
    newest first: slot 0 is the own chunk g. U is the most one head picks; a head that picks
    fewer fills its last slots with chunks it did not pick ("Padding and unpicked slots" in
    longheads_attention)."""
    picked = torch.zeros(*ids.shape[:3], g + 1, dtype=torch.bool, device=ids.device)
    # ids below 0 count as chunk 0, which every query picks anyway: (2) of "Padding and ..."
    picked.scatter_(-1, ids.clamp(min=0).flatten(-2), True)  # (B, Hkv, G, g + 1)
    U = int(picked.sum(-1).max())  # a wait for the GPU: fine here, the fast path has none
    picked_newest_first = picked.flip(-1)  # (B, Hkv, G, g + 1): entry i is chunk g - i
    # why a stable sort: it puts the picked chunks first and keeps them newest first
    back = picked_newest_first.sort(dim=-1, descending=True, stable=True).indices[..., :U]
    return g - back  # (B, Hkv, G, U): chunk ids


def attend_picks(q, ids, g, kc, vc, cos, sin):
    """§3 for the queries of chunk g, q (B, Hkv, G, w, D) raw, each reading the chunks ids
    (B, Hkv, G, w, K') at their ranks (K' = K, or F where g < F): every query scores the union of
    its head's picks, and what it did not pick is masked. kc, vc (B, Hkv, 1, n, w, D), keys
    rotated to chunk offsets."""
    # The README's toy example, walked through (w = 4, K = 4, one head, n = 6 chunks, g = 5):
    # suppose the queries at offsets 0..3 pick ids [0, 2, 4, 5] three times, then [0, 3, 4, 5].
    #   union, newest first: [5, 4, 3, 2, 0], U = 5
    #   rank per slot for the query at offset 2 (token 22): [3, 2, 0 (unpicked), 1, 0]
    #   pos = (K - 1 - rank) * w + 2: [2, 6, 14 (masked), 10, 14]. Chunk 2's keys, rotated to
    #     offsets 0..3, sit 10 - 0 .. 10 - 3 before the query: in the README's view chunk 2
    #     holds positions 4..7 and the query 14, the same distances.
    #   rows: chunk j of head (z, h) is row (z * Hkv + h) * n + j of kc.view(-1, w, D), so here
    #     rows = union = [5, 4, 3, 2, 0].
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


def check_options(num_chunks, chunk_size, layout=LAYOUT, select=SELECT,
                  local_chunks=LOCAL_CHUNKS, full_chunks=None):
    """One line for a setting LongHeads cannot run: the rules every entry point shares."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if not isinstance(num_chunks, int) or num_chunks < 3:
        raise ValueError(f"num_chunks must be an integer >= 3 (chunk 0, the previous and the own "
                         f"chunk are always read), got {num_chunks!r}")
    if not isinstance(local_chunks, int) or not 2 <= local_chunks <= num_chunks - 1:
        raise ValueError(f"local_chunks must lie in [2, num_chunks - 1] = [2, {num_chunks - 1}] "
                         f"(the own and previous chunk at least, chunk 0 besides), got "
                         f"{local_chunks!r}")
    if full_chunks is not None and (not isinstance(full_chunks, int) or full_chunks < num_chunks):
        raise ValueError(f"full_chunks must be None or an integer >= num_chunks ({num_chunks}), "
                         f"got {full_chunks!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if select not in SELECTS:
        raise ValueError(f"select must be one of {', '.join(SELECTS)}, got {select!r}")


def check_qkv(q, k, v):
    """One line for q, k, v that LongHeads cannot compute with."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q must be (B, H, T, D) and k, v (B, Hkv, T, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    (B, H, T, D), (_, Hkv, _, _) = q.shape, k.shape
    if k.shape != v.shape or (B, T, D) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must "
                         f"agree in batch B, tokens T and head dim D")
    if D % 2:
        raise ValueError(f"the head dim must be even (RoPE turns pairs of dims), got {D}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"the query heads ({H}) must be a multiple of the key/value heads "
                         f"({Hkv})")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


# ============================================================================ copy to here


def default_num_chunks(trained_length, chunk_size=CHUNK_SIZE):
    """The paper's rule: as many chunks as the trained length holds, K * w <= L (at least 3)."""
    return max(3, trained_length // chunk_size)


def check_config(num_heads, num_kv_heads, chunk_size, num_chunks, layout=LAYOUT, select=SELECT,
                 local_chunks=LOCAL_CHUNKS, full_chunks=None):
    """check_options, and the heads: for an entry point that sees no tensors yet."""
    check_options(num_chunks, chunk_size, layout, select, local_chunks, full_chunks)
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"the query heads ({num_heads}) must be a multiple of the key/value "
                         f"heads ({num_kv_heads})")


# ----------------------------------------------------------------------------- the slow reference

def longheads_reference(q, k, v, *, num_chunks, chunk_size=CHUNK_SIZE, rope_theta=10000.0,
                        rope=None, layout=LAYOUT, select=SELECT, local_chunks=LOCAL_CHUNKS,
                        full_chunks=None):
    """The definition, one query at a time: select chunks, lay them out, rotate, attend.

    Written straight from DESIGN.md §1-§3, with nothing shared with longheads_attention or the
    fast path but the RoPE helpers. Slow: a test oracle and a tutorial.
    """
    B, H, T, D = q.shape
    w, K, G = chunk_size, num_chunks, H // k.shape[1]
    F = full_chunks or K
    cos, sin = rope_table(rope, rope_theta, D, min(F * w, T), q.device, q.dtype)
    out = torch.zeros_like(q)
    for z in range(B):
        for h in range(H):
            qh, kh, vh = q[z, h], k[z, h // G], v[z, h // G]  # (T, D)
            summaries = [reference_summary(qh[j * w:(j + 1) * w], kh[j * w:(j + 1) * w],
                                           vh[j * w:(j + 1) * w], cos, sin) for j in range(T // w)]
            for t in range(T):
                scores = {j: reference_score(qh[t], j, summaries, kh, w, cos, sin, select)
                          for j in range(1, t // w - 1)}
                chunks = reference_selection(scores, t // w, K, layout, local_chunks, F)
                out[z, h, t] = reference_query(qh[t], kh, vh, t, chunks, w, cos, sin)
    return out


def reference_summary(q, k, v, cos, sin):
    """§1 for one chunk and head: q, k, v (w, D) -> summary key (D,)."""
    w, D = q.shape
    qt, kt = apply_rope(q, cos[:w], sin[:w]), apply_rope(k, cos[:w], sin[:w])
    out = torch.softmax(qt @ kt.T / math.sqrt(D), dim=-1) @ v  # (w, D), no causal mask
    chunk_query = out.mean(dim=0)  # (D,)
    return torch.softmax(kt @ chunk_query / math.sqrt(D), dim=0) @ kt  # (D,)


def reference_score(q, j, summaries, k, w, cos, sin, select="summary"):
    """§2: how well candidate chunk j suits raw query q (D,); k: the head's raw keys (T, D)."""
    q, k = q.detach(), k.detach()  # a score only chooses: no gradient flows through it
    if select == "summary":
        return float(q @ summaries[j].detach())
    keys = apply_rope(k[j * w:(j + 1) * w], cos[:w], sin[:w])  # (w, D) at chunk-local positions
    return float((keys @ apply_rope(q, cos[w], sin[w])).max())  # the query just after the chunk


def reference_selection(scores, g, K, layout=LAYOUT, local_chunks=LOCAL_CHUNKS, full_chunks=None):
    """§2 for one query in chunk g, scores {candidate: score}: the chunks it reads, in order (all
    of them in the first full_chunks chunks, by default K)."""
    if g < (full_chunks or K):
        return list(range(g + 1))
    candidates = [j for j in scores if j <= g - local_chunks]  # the newest are read anyway
    best = sorted(candidates, key=scores.get, reverse=True)[:K - 1 - local_chunks]
    newest = list(range(g - local_chunks + 1, g + 1))
    return [0, *(sorted(best) if layout == "position" else best[::-1]), *newest]


def reference_query(q, k, v, t, chunks, w, cos, sin):
    """§3 for query t reading chunks (K' = len(chunks): K, or g + 1 in the first F chunks): the
    chunk of rank r gets positions r*w.., the query (K' - 1)*w + t mod w."""
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
