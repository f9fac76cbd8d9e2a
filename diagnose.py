"""Look inside LongHeads on one passkey prompt: does the answering query find the key, and use it?

    python passkey.py --diagnose --len 32768 --depths 0.5

One prompt, one prefill. The final query is the one whose next token is the answer. For it, in
every layer, over the query heads:
  picked   how many heads' selections hold a chunk of the key line
  rank     the key chunk's rank among the candidates by their score (the select rule; 1 = best,
           median over heads; "-" when the key sits in a chunk every query reads anyway)
  mass     the attention the final query puts on the key's digits (mean and best head)
the chunks that fill the scored slots most often over all layers and heads (are the winners
the same few filler chunks everywhere?), and the model's top-5 next tokens. Then the same for
full attention on the same key at a length where full attention still works (half the trained
length), for contrast.
"""
import math

import torch

from longheads import LongHeadsCache, apply_rope, rope_cos_sin, select_chunks


@torch.no_grad()
def diagnose(model, tok, ids, key_tokens, contrast_ids, contrast_key_tokens):
    """Print the table for one prompt (LongHeads) and for a shorter one (full attention)."""
    for name, prompt, where in [("longheads", ids, key_tokens), ("full", contrast_ids, contrast_key_tokens)]:
        model.attention = name
        rows, slots, top5 = inspect(model, prompt, where)
        print(f"\n{name} attention, {prompt.shape[1]} tokens, key digits at {where[0]}..{where[-1]}")
        print(f"{'layer':>5}  {'picked':>7}  {'rank':>5}  {'mass mean':>9}  {'mass best':>9}")
        for layer, (picked, rank, mass) in enumerate(rows):
            print(f"{layer:>5}  {picked:>7}  {rank:>5}  {mass.mean():>9.3f}  {mass.max():>9.3f}")
        if slots:
            print(scored_slots(slots, where, model.chunk_size))
        print("next token: " + ", ".join(f"{tok.decode([i])!r} {v:.2f}" for v, i in zip(*top5)))


def inspect(model, ids, key_tokens):
    """One prefill; per layer (picked, rank, mass per head) for the final query; the top-5 logits."""
    finals, hooks = {}, []
    caches = model.new_caches(1, ids.shape[1])
    for i, cache in enumerate(caches):  # keep each layer's last query of the prefill
        hooks.append(cache.register_forward_pre_hook(lambda m, a, i=i: finals.__setitem__(i, a[0][0, :, -1])))
    try:
        logits = model.lm_head(model.hidden(ids, caches)[:, -1])[0]  # (vocab,)
    finally:
        for h in hooks:
            h.remove()
    t, rows, slots = ids.shape[1] - 1, [], []
    for i, cache in enumerate(caches):
        weights = final_weights(cache, finals[i], t)  # (H, t + 1)
        picked, rank = key_chunk_rank(cache, finals[i], t, key_tokens)
        rows.append((picked, rank, weights[:, key_tokens].sum(-1)))
        if isinstance(cache, LongHeadsCache) and t // cache.w >= cache.K:
            chunks = selection(cache, finals[i], t)  # (H, K)
            slots.append(chunks[(chunks > 0) & (chunks < t // cache.w - 1)])  # the scored ones
    top = logits.float().topk(5)
    return rows, slots, (top.values.tolist(), top.indices.tolist())


def scored_slots(slots, key_tokens, w, shown=8):
    """One line: how many distinct chunks fill the final query's scored slots, the most frequent."""
    counts = torch.cat(slots).bincount()  # (chunks,): slots filled by each chunk, over layers and heads
    key_chunks = {u // w for u in key_tokens}
    top = counts.topk(min(shown, int((counts > 0).sum())))
    most = ", ".join(f"{c}{' (key)' if c in key_chunks else ''} x{n}"
                     for n, c in zip(top.values.tolist(), top.indices.tolist()))
    return (f"scored slots: {int(counts.sum())} over {len(slots)} layers, filled by "
            f"{int((counts > 0).sum())} distinct chunks; most often: {most}")


def final_weights(cache, q, t):
    """Attention weights (H, t + 1) of query t, q (H, D) before RoPE, as this cache computes them."""
    H, D = q.shape
    if not isinstance(cache, LongHeadsCache):  # full attention: keys are stored at true positions
        cos, sin = rope_cos_sin(cache.inv_freq, torch.tensor([t], device=q.device))
        k = cache.k[0, :, :t + 1].repeat_interleave(H // cache.k.shape[1], dim=0).float()  # (H, t + 1, D)
        logits = (k @ apply_rope(q.float(), cos, sin)[:, :, None]).squeeze(-1)  # (H, t + 1)
        return torch.softmax(logits / math.sqrt(D), dim=-1)
    w, chunks = cache.w, selection(cache, q, t)  # (H, n_sel), in layout order
    rank = torch.full((H, t // w + 1), -1, device=q.device)
    rank.scatter_(1, chunks, torch.arange(chunks.shape[1], device=q.device).expand_as(chunks))
    r = rank[:, torch.arange(t + 1, device=q.device) // w]  # (H, t + 1): each token's chunk rank, -1 unread
    # DESIGN §3: the chunk of rank r sits at r * w + offset; stored keys are rotated to the offset
    k = cache.k[0, :, :t + 1].repeat_interleave(cache.groups, dim=0).float()  # (H, t + 1, D)
    k = apply_rope(k, cache.cos[r.clamp(min=0) * w].float(), cache.sin[r.clamp(min=0) * w].float())
    p = (chunks.shape[1] - 1) * w + t % w  # the query's position
    logits = (k @ apply_rope(q.float(), cache.cos[p].float(), cache.sin[p].float())[:, :, None]).squeeze(-1)
    return torch.softmax((logits / math.sqrt(D)).masked_fill(r < 0, float("-inf")), dim=-1)


def selection(cache, q, t):
    """The chunks (H, n_sel) that query t of each head reads, in their layout order."""
    g = t // cache.w
    if g < cache.K:
        return torch.arange(g + 1, device=q.device).expand(q.shape[0], g + 1)
    g = torch.tensor([g], device=q.device)
    scores = query_scores(cache, q, t)  # (H, 1, g - 2)
    return select_chunks(scores, g, cache.K, cache.layout, cache.local_chunks)[:, 0]


def query_scores(cache, q, t):
    """The scores (H, 1, g - 2) of candidates 1..g-2 for query t, q (H, D), as the cache scores."""
    qg = q.view(1, -1, cache.groups, 1, q.shape[-1])  # (1, Hkv, G, 1, D), as the cache groups heads
    return cache.scores(qg, t // cache.w - 1).flatten(0, 2)


def key_chunk_rank(cache, q, t, key_tokens):
    """'picked/H' for the final query, and the key chunk's median rank among the candidates."""
    if not isinstance(cache, LongHeadsCache):
        return "all", "-"
    w, g = cache.w, t // cache.w
    key_chunks = sorted({u // w for u in key_tokens})
    picked = torch.isin(selection(cache, q, t), torch.tensor(key_chunks, device=q.device)).any(-1)
    candidates = [c for c in key_chunks if 1 <= c <= g - cache.local_chunks]
    if g < cache.K or len(candidates) < len(key_chunks):
        return f"{int(picked.sum())}/{len(picked)}", "-"  # read anyway: the first K, 0, the newest
    scores = query_scores(cache, q, t).squeeze(1)  # (H, g - 2)
    best = scores[:, [c - 1 for c in candidates]].max(-1).values  # (H,)
    rank = 1 + (scores > best[:, None]).sum(-1)
    return f"{int(picked.sum())}/{len(picked)}", int(rank.float().median())
