"""Look inside LongHeads on one passkey prompt: does the answering query find the key, and use it?

    python -m lab.needles --diagnose --len 16384 --depths 0.5 --setting paper --plot chunks.png

One prompt, one prefill. The final query is the one whose next token is the answer. For it, in
every layer, over the query heads:
  picked   how many heads' selections hold a chunk of the key line
  place    where the key chunk stands among the candidates by score (the select rule; 1 = best,
           median over heads; "-" when the key sits in a chunk every query reads anyway)
  mass     the attention the final query puts on the key's digits (mean and best head)
  rank     with --distractors: where the key's chunk stands in the view (median over heads;
           K - 1 is the query's own chunk); picked*, mass* and rank* the same for the
           distractors' keys: does the wrong key win by being read, by weight, or by place?
the chunks that fill the scored slots most often over all layers and heads (are the winners
the same few filler chunks everywhere?), and the model's top-5 next tokens. Then the same for
full attention on the same key at a length where full attention still works (half the trained
length), for contrast. --plot draws the LongHeads part: every layer's and head's picked chunks,
the key's chunk marked, beside the attention mass on the key per layer.
"""
import math
import os

import torch

from longheads import apply_rope, rope_cos_sin, select_chunks
from tiled import LongHeadsCache, score_candidates


@torch.no_grad()
def diagnose(model, tok, ids, key_tokens, contrast_ids, contrast_key_tokens, plot_file=None):
    """Print the table for one prompt (LongHeads) and for a shorter one (full attention).
    key_tokens: the digit positions of each key, the asked one's first, then the distractors'."""
    runs = [("longheads", ids, key_tokens), ("full", contrast_ids, contrast_key_tokens)]
    for name, prompt, keys in runs:
        model.attention = name
        rows, picks, top5 = inspect(model, prompt, keys)
        asked, others = keys[0], [u for k in keys[1:] for u in k]
        print(f"\n{name} attention, {prompt.shape[1]} tokens, "
              f"key digits at {asked[0]}..{asked[-1]}"
              + (f", distractors' at {', '.join(f'{k[0]}..{k[-1]}' for k in keys[1:])}"
                 if others else ""))
        print(f"{'layer':>5}  {'picked':>7}  {'place':>5}  {'mass mean':>9}  {'mass best':>9}"
              + (f"  {'rank':>4}  {'picked*':>7}  {'mass* mean':>10}  {'rank*':>5}"
                 if others else ""))
        for layer, (asked_row, other_row) in enumerate(rows):
            picked, place, mass, rank = asked_row
            line = f"{layer:>5}  {picked:>7}  {place:>5}  {mass.mean():>9.3f}  {mass.max():>9.3f}"
            if others:
                picked, _, mass, other_rank = other_row
                line += f"  {rank:>4}  {picked:>7}  {mass.mean():>10.3f}  {other_rank:>5}"
            print(line)
        if others:
            print("*: the distractors' keys; rank: the median rank, over the heads that read "
                  "it, of the key's chunk in the view (rank K - 1 is the query's own chunk)")
        if picks:
            g = (prompt.shape[1] - 1) // model.chunk_size
            scored = [c[(c > 0) & (c < g - 1)] for c in picks]  # chunks 1..g-2
            print(scored_slots(scored, asked, model.chunk_size))
            if plot_file:
                plot(picks, [row[0][2] for row in rows], asked, model.chunk_size, g, plot_file)
        print("next token: " + ", ".join(f"{tok.decode([i])!r} {v:.2f}" for v, i in zip(*top5)))


def inspect(model, ids, keys):
    """One prefill. Per layer, for the final query, of the asked key (keys[0]) and of all the
    distractors' together (keys[1:]): (picked, place, mass per head, rank); past the first K
    chunks, the chunks (H, K) each head read; and the top-5 next-token logits."""
    finals, hooks = {}, []
    caches = model.new_caches(1, ids.shape[1])
    keep = lambda i: lambda module, args: finals.__setitem__(i, args[0][0, :, -1])  # (H, D)
    for i, cache in enumerate(caches):  # keep each layer's last query of the prefill
        hooks.append(cache.register_forward_pre_hook(keep(i)))
    try:
        logits = model.lm_head(model.hidden(ids, caches)[:, -1])[0]  # (vocab,)
    finally:
        for h in hooks:
            h.remove()
    t, rows, picks = ids.shape[1] - 1, [], []
    groups = [keys[0], [u for k in keys[1:] for u in k]]  # the asked key, the distractors
    for i, cache in enumerate(caches):
        weights = final_weights(cache, finals[i], t)  # (H, t + 1)
        rows.append([(*key_chunk_place(cache, finals[i], t, tokens),
                      weights[:, tokens].sum(-1), view_rank(cache, finals[i], t, tokens))
                     if tokens else None for tokens in groups])
        if isinstance(cache, LongHeadsCache) and t // cache.w >= cache.K:
            picks.append(selection(cache, finals[i], t))  # (H, K)
    top = logits.float().topk(5)
    return rows, picks, (top.values.tolist(), top.indices.tolist())


def view_rank(cache, q, t, key_tokens):
    """The median rank, over the heads that read one, of the key's chunks in query t's view
    (the highest where a key spans two), or "-" for full attention or when no head reads it."""
    if not isinstance(cache, LongHeadsCache):
        return "-"
    chunks = selection(cache, q, t)  # (H, K) in rank order: rank r is column r
    holds = torch.isin(chunks, torch.tensor(sorted({u // cache.w for u in key_tokens}),
                                            device=q.device))  # (H, K)
    ranks = torch.arange(chunks.shape[1], device=q.device).masked_fill(~holds, -1).amax(-1)
    read = ranks[ranks >= 0]
    return int(read.float().median()) if len(read) else "-"


def plot(picks, masses, key_tokens, w, g, file):
    """Layers x heads rows, chunks 0..g as columns: what the final query read, the key's chunk
    marked; beside it the attention mass on the key's digits per layer (mean and best head)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    L, H = len(picks), picks[0].shape[0]
    grid = torch.zeros(L * H, g + 1)  # (layer-heads, chunks): 2 read; 1, 3 the key's, 3 read
    grid.scatter_(1, torch.cat(picks).cpu(), 2.0)
    key_chunks = sorted({u // w for u in key_tokens})
    grid[:, key_chunks] += 1
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 7), sharey=True,
                                 gridspec_kw=dict(width_ratios=[4, 1]))
    cmap = matplotlib.colors.ListedColormap(["white", "mistyrose", "tab:blue", "tab:red"])
    ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=3.5, aspect="auto", interpolation="nearest",
              extent=(-0.5, g + 0.5, L, 0))
    ax.set(xlabel=f"chunk ({w} tokens each); blue: read; red: the key's chunk, read (pale: not)",
           ylabel=f"layer ({H} heads each)", title="chunks each head reads for the answering query")
    mass = torch.stack([m.float().cpu() for m in masses])  # (L, H)
    y = torch.arange(L) + 0.5
    bx.barh(y, mass.max(-1).values, height=0.8, color="tab:orange", label="best head")
    bx.barh(y, mass.mean(-1), height=0.8, color="tab:red", label="mean over heads")
    bx.set(xlabel="attention on the key's digits", xlim=(0, 1))
    bx.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(file + ".tmp.png")
    os.replace(file + ".tmp.png", file)


def scored_slots(slots, key_tokens, w, shown=8):
    """One line: how many distinct chunks fill the final query's scored slots, the most frequent."""
    counts = torch.cat(slots).bincount()  # (chunks,): slots each chunk fills over layers, heads
    key_chunks = {u // w for u in key_tokens}
    top = counts.topk(min(shown, int((counts > 0).sum())))
    most = ", ".join(f"{c}{' (key)' if c in key_chunks else ''} x{n}"
                     for n, c in zip(top.values.tolist(), top.indices.tolist()))
    return (f"scored slots: {int(counts.sum())} over {len(slots)} layers, filled by "
            f"{int((counts > 0).sum())} distinct chunks; most often: {most}")


def final_weights(cache, q, t):
    """Attention weights (H, t + 1) of query t, q (H, D) before RoPE, as the cache computes them."""
    H, D = q.shape
    if not isinstance(cache, LongHeadsCache):  # full attention: keys are stored at true positions
        cos, sin = rope_cos_sin(cache.inv_freq, torch.tensor([t], device=q.device))
        G = H // cache.k.shape[1]
        k = cache.k[0, :, :t + 1].repeat_interleave(G, dim=0).float()  # (H, t + 1, D)
        logits = (k @ apply_rope(q.float(), cos, sin)[:, :, None]).squeeze(-1)  # (H, t + 1)
        return torch.softmax(logits / math.sqrt(D), dim=-1)
    w, chunks = cache.w, selection(cache, q, t)  # (H, n_sel), in rank order
    rank = torch.full((H, t // w + 1), -1, device=q.device)
    rank.scatter_(1, chunks, torch.arange(chunks.shape[1], device=q.device).expand_as(chunks))
    # (H, t + 1): the rank of each token's chunk, -1 where it is not read
    r = rank[:, torch.arange(t + 1, device=q.device) // w]
    # DESIGN.md §3: rank r sits at r * w + offset; stored keys are rotated to the offset
    k = cache.kv.k[0, :, :t + 1].to(q.device)  # (Hkv, t + 1, D); offloaded, it was on the CPU
    k = k.repeat_interleave(cache.G, dim=0).float()  # (H, t + 1, D)
    k = apply_rope(k, cache.cos[r.clamp(min=0) * w].float(), cache.sin[r.clamp(min=0) * w].float())
    p = (chunks.shape[1] - 1) * w + t % w  # the query's position
    qr = apply_rope(q.float(), cache.cos[p].float(), cache.sin[p].float())  # (H, D)
    logits = (k @ qr[:, :, None]).squeeze(-1)  # (H, t + 1)
    return torch.softmax((logits / math.sqrt(D)).masked_fill(r < 0, float("-inf")), dim=-1)


def selection(cache, q, t):
    """The chunks (H, n_sel) that query t of each head reads, in rank order (text order)."""
    g = t // cache.w
    if g < cache.K:  # the first K chunks: every chunk so far, at its true position
        return torch.arange(g + 1, device=q.device).expand(q.shape[0], g + 1)
    g = torch.tensor([g], device=q.device)
    scores = query_scores(cache, q, t)  # (H, 1, g - 2)
    return select_chunks(scores, g, cache.K)[:, 0]


def query_scores(cache, q, t):
    """The scores (H, 1, g - 2) of candidates 1..g-2 for query t, q (H, D), as the cache scores."""
    qg = q.view(1, -1, cache.G, 1, q.shape[-1])  # (1, Hkv, G, 1, D), as the cache groups heads
    return score_candidates(cache, qg, t // cache.w - 2).flatten(0, 2)


def key_chunk_place(cache, q, t, key_tokens):
    """'picked/H' for the final query, and the key chunk's median place among the candidates."""
    if not isinstance(cache, LongHeadsCache):
        return "all", "-"
    w, g = cache.w, t // cache.w
    key_chunks = sorted({u // w for u in key_tokens})
    picked = torch.isin(selection(cache, q, t), torch.tensor(key_chunks, device=q.device)).any(-1)
    candidates = [c for c in key_chunks if 1 <= c <= g - 2]  # else read anyway: 0, g - 1, g
    if g < cache.K or len(candidates) < len(key_chunks):
        return f"{int(picked.sum())}/{len(picked)}", "-"  # read anyway: the first K, 0, the newest
    scores = query_scores(cache, q, t).squeeze(1)  # (H, g - 2)
    best = scores[:, [c - 1 for c in candidates]].max(-1).values  # (H,)
    place = 1 + (scores > best[:, None]).sum(-1)  # (H,)
    return f"{int(picked.sum())}/{len(picked)}", int(place.float().median())
