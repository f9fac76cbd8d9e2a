"""Tests: LongHeads against its definition, the Llama against transformers, the tokenizer.

Both fast paths, the short longheads_attention and the tiled LongHeadsCache, are held to:
1. every chunk selected          == causal attention with RoPE at true positions
2. any budget                    == longheads_reference, the per-query loop of DESIGN.md §1-§3
3. one prefill                   == a prefix prefill + pieces + single-token decoding steps
4. selections                    hold chunks 0, g-1, g, are sorted and unique, never in the future
5. GQA                           == the same computation with k/v repeated to every head
6. the copyable section          runs alone (math and torch only) and equals the reference
Then: our Llama == transformers.LlamaForCausalLM on checkpoints transformers saves, and bad
checkpoints are one clear error each.
"""
import ast
import doctest
import inspect
import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import longheads
import tiled
from longheads import (apply_rope, longheads_attention, longheads_reference, reference_selection,
                       rope_cos_sin, rope_inv_freq, select_chunks)
from tiled import LongHeadsCache, causal_attention, pack, tiled_attention

FAST = pytest.mark.parametrize("attention", [longheads_attention, tiled_attention],
                               ids=["short", "tiled"])
PROPERTY = settings(max_examples=int(os.environ.get("LONGHEADS_EXAMPLES", 200)), deadline=None)


@st.composite
def problems(draw, budget):
    """Random q, k, v (float64) and LongHeads settings; budget "all" or "small" vs T."""
    B, Hkv, G = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    D = draw(st.sampled_from([2, 4, 8, 16]))
    w, K = draw(st.integers(1, 6)), draw(st.integers(3, 8))
    if budget == "all":
        T = draw(st.integers(1, K * w))
    else:  # at least one chunk beyond the budget; often a partial last chunk
        T = draw(st.integers(K * w + 1, K * w + 3 * w + 5))
    theta = draw(st.sampled_from([10.0, 500.0, 10000.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    q = torch.randn(B, Hkv * G, T, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, T, D, generator=gen, dtype=torch.float64)
    return q, k, v, dict(chunk_size=w, num_chunks=K, rope_theta=theta)


def causal_rope_attention(q, k, v, rope_theta):
    """Ordinary causal attention with RoPE at true positions, from PyTorch's SDPA."""
    G, T, D = q.shape[1] // k.shape[1], q.shape[2], q.shape[3]
    cos, sin = rope_cos_sin(rope_inv_freq(D, rope_theta), torch.arange(T), torch.float64)
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    return F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v,
                                          is_causal=True)


@FAST
@PROPERTY
@given(problems("all"))
def test_every_chunk_selected_is_causal_attention(attention, problem):
    q, k, v, opts = problem
    expected = causal_rope_attention(q, k, v, opts["rope_theta"])
    torch.testing.assert_close(attention(q, k, v, **opts), expected)


@PROPERTY
@given(st.integers(1, 40), st.integers(0, 40), st.integers(1, 2), st.sampled_from([1, 3]),
       st.integers(1, 9), st.integers(0, 2**32 - 1), st.booleans())
def test_causal_attention_after_a_prefix_is_the_masked_definition(T, prefix, Hkv, G,
                                                                  mask_block, seed, cuda_layout):
    """The last T of S queries, in blocks of mask_block (CPU) or with a lower-right causal bias
    (GPU, run here on the CPU), against the plain masked softmax."""
    gen, S = torch.Generator().manual_seed(seed), prefix + T
    q = torch.randn(1, Hkv * G, T, 4, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, Hkv, S, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    scores = q @ k.repeat_interleave(G, 1).transpose(-1, -2) / 2  # (1, H, T, S); 2 = sqrt(D)
    future = torch.arange(S) > torch.arange(prefix, S)[:, None]  # (T, S)
    expected = scores.masked_fill(future, float("-inf")).softmax(-1) @ v.repeat_interleave(G, 1)
    old, tiled.MASK_BLOCK = tiled.MASK_BLOCK, mask_block
    try:
        torch.testing.assert_close(causal_attention(q, k, v, cuda_layout), expected)
    finally:
        tiled.MASK_BLOCK = old


@PROPERTY
@given(problems("small"))
def test_short_function_equals_reference(problem):
    q, k, v, opts = problem
    torch.testing.assert_close(longheads_attention(q, k, v, **opts),
                               longheads_reference(q, k, v, **opts))


@PROPERTY
@given(problems("small"), st.integers(1, 7), st.sampled_from(["cpu", "cuda"]))
def test_tiled_path_equals_reference(problem, block_size, for_device):
    """Both layouts of the work: the CPU's (whole rows, the fused kernel) and, on the CPU, the
    GPU's (tiles counted by a bound, the plain pieces)."""
    q, k, v, opts = problem
    got = tiled_attention(q, k, v, block_size=block_size, for_device=for_device, **opts)
    torch.testing.assert_close(got, longheads_reference(q, k, v, **opts))


def copyable_section():
    """The source between the "copy from here" and "copy to here" lines of longheads.py."""
    lines = inspect.getsource(longheads).splitlines()
    first = next(i for i, line in enumerate(lines) if "copy from here" in line)
    last = next(i for i, line in enumerate(lines) if "copy to here" in line)
    return lines[first:last + 1]


def test_the_copyable_section_runs_alone_and_equals_the_reference():
    section = copyable_section()
    # short enough to copy and read in one sitting, its argument checks and its walk-through of
    # the README's toy example included
    assert len(section) <= 200, len(section)
    namespace = {}  # the section as a user copies it into an empty file: nothing added
    exec(compile("\n".join(section), "copied.py", "exec"), namespace)
    assert set(namespace) >= {"longheads_attention", "select_chunks", "chunk_summaries"}
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 61, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 61, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    opts = dict(chunk_size=4, num_chunks=6)
    torch.testing.assert_close(namespace["longheads_attention"](q, k, v, **opts),
                               longheads_reference(q, k, v, **opts))


def interleaved_rope(x, cos, sin):
    """RoPE on interleaved pairs (dims 2i, 2i + 1), as Meta's Llama code and gpt-fast rotate, from
    the same (.., D) tables, whose first D/2 columns hold the pairs' angles."""
    c, s = cos[..., :x.shape[-1] // 2], sin[..., :x.shape[-1] // 2]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], -1).flatten(-2)


def test_interleaved_rope_model_uses_the_function_after_two_reorders(monkeypatch):
    """The README's two lines: q, k, v reordered from interleaved pairs to halves, the output
    back, give the attention of an interleaved-RoPE model, held to the reference with its
    rotation made interleaved, past the budget; without v's reorder the summaries differ."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 45, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 45, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    opts = dict(chunk_size=4, num_chunks=4, rope_theta=100.0)
    q2, k2, v2 = [x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2) for x in (q, k, v)]
    got = longheads_attention(q2, k2, v2, **opts).unflatten(-1, (2, -1)).transpose(-1, -2)
    got = got.flatten(-2)
    qk_only = longheads_attention(q2, k2, v, **opts)
    monkeypatch.setattr(longheads, "apply_rope", interleaved_rope)
    expected = longheads.longheads_reference(q, k, v, **opts)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(qk_only, expected)


def test_the_method_imports_nothing_from_the_fast_path():
    """longheads.py needs math and torch only; tiled.py builds on it, never the other way."""
    tree = ast.parse(inspect.getsource(longheads))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert imported == {"math", "torch"}, imported


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_attention_lse_equals_the_plain_one(dtype):
    """The CPU's fused kernel (a private op) against the computation written out, with a mask
    whose rows see from all keys down to one, as the own chunk's causal window does."""
    assert tiled.FUSED_CPU is not None, "this torch has no fused CPU kernel: the fast path"
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(5, n, 16, generator=gen, dtype=dtype) for n in (7, 11, 11))
    mask = torch.arange(11) <= torch.arange(4, 11)[:, None]  # (7, 11)
    for m in (None, mask):
        out, lse = tiled.attention_lse(q, k, v, m)
        want_out, want_lse = tiled.attention_lse_plain(q, k, v, m)
        torch.testing.assert_close(out, want_out)
        torch.testing.assert_close(lse, want_lse)


def test_the_readme_examples_run_and_print_what_it_shows():
    """Every ```python block of README.md with >>> prompts is a doctest: its outputs are real."""
    text = open(os.path.join(os.path.dirname(__file__), "README.md"), encoding="utf-8").read()
    blocks = [b.split("```")[0] for b in text.split("```python\n")[1:]]
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for i, block in enumerate(b for b in blocks if ">>>" in b):
        runner.run(doctest.DocTestParser().get_doctest(block, {}, f"README {i}", "README.md", 0))
    assert runner.summarize(verbose=False) == (0, runner.tries) and runner.tries >= 10


def test_short_function_gradients_equal_the_reference():
    """Autograd through the short function: the gradients of the per-query definition."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 29, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 29, 4, generator=gen, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    opts = dict(chunk_size=3, num_chunks=4)
    loss = lambda attention: (attention(q, k, v, **opts) * torch.linspace(-1, 1, 4)).sum()
    expected = torch.autograd.grad(loss(longheads_reference), (q, k, v))
    for got, want in zip(torch.autograd.grad(loss(longheads_attention), (q, k, v)), expected):
        torch.testing.assert_close(got, want)


@PROPERTY
@given(problems("small"), st.data())
def test_prefill_equals_stepwise_decoding(problem, data):
    q, k, v, opts = problem
    B, H, T, D = q.shape
    cache = LongHeadsCache(B, H, k.shape[1], T, D, dtype=q.dtype, **opts)
    prefix = data.draw(st.integers(0, T), label="prefix")
    cuts = [0, prefix]
    while cuts[-1] < T:  # single decoding steps, with now and then a piece of several tokens
        cuts.append(min(T, cuts[-1] + data.draw(st.sampled_from([1, 1, 1, 2, 5]), label="piece")))
    outs = [cache(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e])
            for s, e in zip(cuts, cuts[1:]) if e > s]
    torch.testing.assert_close(torch.cat(outs, dim=2), longheads_attention(q, k, v, **opts))


@PROPERTY
@given(problems("small"))
def test_selections_obey_the_rule(problem):
    q, k, v, opts = problem
    B, H, T, D = q.shape
    w, K = opts["chunk_size"], opts["num_chunks"]
    cache = LongHeadsCache(B, H, k.shape[1], T, D, dtype=q.dtype, **opts)
    cache(q, k, v)  # fills keys and summaries
    summaries = cache.summaries.flatten(1, 2)  # (B, H, n, D)
    t = torch.arange(K * w, T)  # every query past the first K chunks
    qg = q[:, :, K * w:].unflatten(1, (k.shape[1], -1))  # (B, Hkv, G, b, D)
    scores = tiled.score_candidates(cache, qg, (T - 1) // w - 1).flatten(1, 2)  # (B, H, b, n - 1)
    ids = select_chunks(scores, t // w, K)  # (B, H, b, K)
    for z in range(B):
        for h in range(H):
            for i, g in enumerate((t // w).tolist()):
                chunks = ids[z, h, i].tolist()
                assert len(set(chunks)) == K and max(chunks) == g  # unique, no future
                assert chunks[0] == 0 and chunks[-2:] == [g - 1, g]
                assert chunks[1:-2] == sorted(chunks[1:-2])  # in text order
                qt = q[z, h, K * w + i]
                score = {j: float(qt @ summaries[z, h, j]) for j in range(1, g - 1)}
                assert chunks == reference_selection(score, g, K)


@PROPERTY
@given(st.integers(5, 12), st.integers(3, 5), st.integers(0, 2**31 - 1))
def test_selection_breaks_ties_as_the_reference(g, K, seed):
    """Scores from three values: most candidates tie, as on repeated text; the earlier wins."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (2, 4, g - 1), generator=gen).double()  # (heads, b, n - 1)
    ids = select_chunks(scores, torch.full((4,), g), K)  # (heads, b, K)
    for h in range(2):
        for i in range(4):
            score = {j: float(scores[h, i, j - 1]) for j in range(1, g - 1)}
            assert ids[h, i].tolist() == reference_selection(score, g, K)


@PROPERTY
@given(st.lists(st.integers(0, 9), min_size=1, max_size=300), st.integers(1, 8), st.booleans())
def test_pack_lays_items_out_in_rows_of_their_key(keys, size, whole):
    key = torch.tensor(keys)
    place, groups = pack(key, size, 10, whole=whole)
    assert [length for _, length in groups] == sorted({length for _, length in groups})
    slot_key = torch.cat([k.repeat_interleave(length) for k, length in groups])  # every slot's
    assert (slot_key[place] == key).all()  # every item sits in a row of its key
    assert len(set(place.tolist())) == len(keys)  # one slot each
    rows = [(k, length) for ks, length in groups for k in ks.tolist()]
    if whole:  # a key's items make one row, padded to a multiple of size
        assert sorted(rows) == sorted((k, -(-keys.count(k) // size) * size) for k in set(keys))
    else:  # rows of size, no row wasted
        assert all(length == size for _, length in rows)
        assert len(rows) == sum(-(-keys.count(k) // size) for k in set(keys))


@FAST
@PROPERTY
@given(problems("small"))
def test_gqa_equals_repeated_heads(attention, problem):
    q, k, v, opts = problem
    G = q.shape[1] // k.shape[1]
    repeated = attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), **opts)
    torch.testing.assert_close(attention(q, k, v, **opts), repeated)


@FAST
def test_rope_tables_inverse_frequencies_and_theta_agree(attention):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 50, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    opts = dict(chunk_size=4, num_chunks=5)
    by_theta = attention(q, k, v, rope_theta=500.0, **opts)
    inv_freq = rope_inv_freq(8, 500.0)
    by_freq = attention(q, k, v, rope=inv_freq, **opts)
    by_table = attention(q, k, v, rope=rope_cos_sin(inv_freq, torch.arange(20)), **opts)
    torch.testing.assert_close(by_freq, by_theta)
    torch.testing.assert_close(by_table, by_theta)
    scaled = attention(q, k, v, rope=inv_freq / 4, **opts)  # linear scaling
    assert not torch.allclose(scaled, by_theta)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_chunks=2), "num_chunks must be an integer >= 3"),
    (dict(chunk_size=0), "chunk_size must be a positive integer"),
    (dict(block_size=0), "block_size must be >= 1"),
    (dict(rope=torch.ones(3)), r"rope: need \(4,\) inverse frequencies or cos/sin tables"),
    (dict(rope=(torch.ones(4, 8), torch.ones(4, 8))), r"got cos \(4, 8\)"),
])
def test_bad_settings_are_value_errors(kwargs, message):
    q = k = v = torch.randn(1, 2, 30, 8)
    with pytest.raises(ValueError, match=message):
        tiled_attention(q, k, v, **{"chunk_size": 4, "num_chunks": 3, **kwargs})


@pytest.mark.parametrize("shapes, dtypes, message", [
    (((1, 3, 10, 8), (1, 2, 10, 8)), None, "multiple of the key/value heads"),
    (((1, 2, 10, 8), (1, 2, 9, 8)), None, "must agree"),
    (((1, 2, 10, 8), (1, 2, 10)), None, "must be"),
    (((1, 2, 10, 7), (1, 2, 10, 7)), None, "head dim must be even"),
    (((1, 2, 10, 8), (1, 2, 10, 8)), (torch.float32, torch.float64), "one floating dtype"),
])
def test_bad_inputs_are_value_errors(shapes, dtypes, message):
    dq, dk = dtypes or (torch.float32, torch.float32)
    q, k = torch.randn(shapes[0], dtype=dq), torch.randn(shapes[1], dtype=dk)
    with pytest.raises(ValueError, match=message):
        tiled_attention(q, k, k.clone(), chunk_size=4, num_chunks=3)


def test_offload_without_cuda_is_a_value_error():
    with pytest.raises(ValueError, match="nothing to offload"):
        LongHeadsCache(1, 2, 1, 8, 4, chunk_size=4, num_chunks=3, device="cpu", offload=True)


def test_cache_overflow_is_a_value_error():
    cache = LongHeadsCache(1, 2, 1, 8, 4, chunk_size=4, num_chunks=3)
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 1, 6, 4)
    cache(q, k, k)
    with pytest.raises(ValueError, match="max_len=8"):
        cache(q[:, :, :3], k[:, :, :3], k[:, :, :3])


@FAST
def test_memory_is_bounded_by_the_block(attention):
    """No single operation of a long context allocates anything near a T x T score tensor."""
    # the tiled path's query blocks hold up to 512 queries here, their own-chunk window b x b
    T = 2048 if attention is tiled_attention else 1024
    q = k = v = torch.randn(1, 1, T, 8)
    peak = peak_allocated_bytes(lambda: attention(q, k, v, chunk_size=16, num_chunks=4))
    assert peak < T * T * 4 / 8, peak  # an eighth of a T x T float32 score tensor


def peak_allocated_bytes(fn):
    """The most memory any one operation of fn holds, net, via the profiler's memory records."""
    with torch.profiler.profile(profile_memory=True, record_shapes=False) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


# ----------------------------------------------------------------------------- the Llama

CHECKPOINTS = {  # name: transformers LlamaConfig arguments and save_pretrained arguments
    "mha": (dict(num_key_value_heads=4), {}),
    "gqa-sharded": (dict(num_key_value_heads=2), dict(max_shard_size="30KB")),
    "tied": (dict(num_key_value_heads=1, tie_word_embeddings=True), {}),
    "linear-rope": (dict(num_key_value_heads=2,
                         rope_scaling={"rope_type": "linear", "factor": 4.0}), {}),
}
DYNAMIC = (dict(num_key_value_heads=2, max_position_embeddings=16,
                rope_scaling={"rope_type": "dynamic", "factor": 2.0}), {})


def save_checkpoint(name, path):
    """Save a tiny random Llama with transformers into path; return the transformers model."""
    transformers = pytest.importorskip("transformers")
    config_args, save_args = DYNAMIC if name == "dynamic-rope" else CHECKPOINTS[name]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=101, rope_theta=500.0,
                                      **config_args)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(path, **save_args)
    return hf


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    """(directory, the transformers model) of each kind of tiny checkpoint."""
    path = tmp_path_factory.mktemp(request.param)
    return path, save_checkpoint(request.param, path)


@pytest.fixture(scope="module")
def mha_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain")
    save_checkpoint("mha", path)
    return path


def test_logits_and_greedy_tokens_match_transformers(checkpoint):
    from model import Llama
    path, hf = checkpoint
    model = Llama.from_pretrained(path)
    ids = torch.randint(0, 101, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)
    # both stop a row at end-of-sequence token 2 and pad it with 2 (the mha checkpoint ends one)
    expected = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2,
                           attention_mask=torch.ones_like(ids))
    assert torch.equal(model.generate(ids, max_new_tokens=12), expected)


def test_longheads_with_every_chunk_selected_is_the_model(checkpoint):
    from model import Llama
    path, hf = checkpoint
    model = Llama.from_pretrained(path, attention="longheads", chunk_size=8, num_chunks=5)
    ids = torch.randint(0, 101, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_dynamic_rope_logits_match_transformers(tmp_path):
    """Dynamic NTK RoPE (here past its 16 trained positions). Only logits: transformers changes
    the frequencies while it generates, we fix them for the cache's length (README, Limits)."""
    from model import Llama
    hf = save_checkpoint("dynamic-rope", tmp_path)
    ids = torch.randint(0, 101, (1, 37), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(Llama.from_pretrained(tmp_path)(ids), hf(ids).logits,
                                   atol=1e-4, rtol=0)


class ReferenceAttention(torch.nn.Module):
    """A stand-in for a layer's cache that computes LongHeads with the slow reference."""

    def __init__(self, inv_freq, **opts):
        super().__init__()
        self.inv_freq, self.opts = inv_freq, opts

    def forward(self, q, k, v):
        return longheads_reference(q.double(), k.double(), v.double(), rope=self.inv_freq,
                                   **self.opts).float()


def test_selective_longheads_model_equals_the_reference(checkpoint):
    """With a budget far below the prompt, the model's logits are those of the reference loop."""
    from model import Llama
    path, _ = checkpoint
    opts = dict(chunk_size=3, num_chunks=5)
    model = Llama.from_pretrained(path, attention="longheads", **opts)
    ids = torch.randperm(101, generator=torch.Generator().manual_seed(5))[:33][None]
    reference = [ReferenceAttention(model.config.inv_freq(15), **opts) for _ in model.model.layers]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(ids, caches=reference), atol=1e-4, rtol=0)


def test_longheads_generate_equals_rerunning_the_sequence(checkpoint):
    """Prefill + cached decoding picks what a full forward pass over the growing text picks."""
    from model import Llama
    path, _ = checkpoint
    model = Llama.from_pretrained(path, attention="longheads", chunk_size=4, num_chunks=3)
    ids = torch.randint(0, 101, (1, 30), generator=torch.Generator().manual_seed(3))
    tokens = model.generate(ids, max_new_tokens=10, eos_token_id=[])  # all 10, whatever they are
    with torch.no_grad():
        for t in range(30, 40):
            assert model(tokens[:, :t])[0, -1].argmax() == tokens[0, t]


def test_both_rope_spellings_load_the_same_model(tmp_path, checkpoint):
    """transformers >= 5 writes rope_parameters; older checkpoints say rope_theta + rope_scaling
    (with "type", the oldest key). Both spellings of the same RoPE give the same model."""
    from model import Llama, rope_settings
    path, _ = checkpoint
    config = json.loads((path / "config.json").read_text())
    rope = rope_settings(config)
    scaling = {"type": rope["rope_type"], "factor": rope["rope_factor"]}
    config = {k: v for k, v in config.items()
              if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
    classic = {**config, "rope_theta": rope["rope_theta"],
               "rope_scaling": None if rope["rope_type"] == "default" else scaling}
    new = {**config, "rope_parameters": {"rope_type": rope["rope_type"],
                                         "rope_theta": rope["rope_theta"],
                                         "factor": rope["rope_factor"]}}
    ids = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        a = Llama.from_pretrained(copy_checkpoint(path, tmp_path / "classic", classic))(ids)
        b = Llama.from_pretrained(copy_checkpoint(path, tmp_path / "new", new))(ids)
        assert torch.equal(a, b) and torch.equal(a, Llama.from_pretrained(path)(ids))


def test_tying_follows_the_config_or_a_missing_output_layer(tmp_path, mha_checkpoint):
    from model import Llama
    config = json.loads((mha_checkpoint / "config.json").read_text())
    untied = Llama.from_pretrained(mha_checkpoint)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    tied = Llama.from_pretrained(copy_checkpoint(mha_checkpoint, tmp_path,
                                                 {**config, "tie_word_embeddings": True}))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight  # the stored lm_head is ignored


def test_longheads_in_bfloat16_stays_close_to_float64():
    """Half precision: summaries and softmax run in float32, the rest in bfloat16."""
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, 70, 16, generator=gen)
    k, v = (torch.randn(1, 2, 70, 16, generator=gen) for _ in range(2))
    opts = dict(chunk_size=8, num_chunks=4)
    exact = longheads_attention(q.double(), k.double(), v.double(), **opts)
    half = tiled_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), **opts)
    assert half.dtype == torch.bfloat16 and (half.double() - exact).abs().max() < 0.05
    cache = LongHeadsCache(1, 4, 2, 70, 16, dtype=torch.bfloat16, **opts)
    steps = [cache(q[:, :, :20].bfloat16(), k[:, :, :20].bfloat16(), v[:, :, :20].bfloat16())]
    steps += [cache(q[:, :, t:t + 1].bfloat16(), k[:, :, t:t + 1].bfloat16(),
                    v[:, :, t:t + 1].bfloat16())
              for t in range(20, 70)]
    # a bfloat16 ulp or two
    assert (torch.cat(steps, 2).double() - half.double()).abs().max() < 0.02


def test_dtype_argument_converts_weights(checkpoint):
    from model import Llama
    model = Llama.from_pretrained(checkpoint[0], dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def copy_checkpoint(src, dst, config=None):
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("change, message", [
    (lambda c, p: c.update(model_type="mistral"), "model_type='mistral' is not supported"),
    (lambda c, p: c.update(attention_bias=True), "attention_bias=True is not supported"),
    (lambda c, p: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}),
     "rope type 'yarn'"),
    (lambda c, p: c.update(num_key_value_heads=1), "k_proj.weight has shape"),
    (lambda c, p: c.update(intermediate_size=64), "mlp.down_proj.weight has shape"),
    (lambda c, p: c.update(num_hidden_layers=3),
     "model.layers.2.input_layernorm.weight is missing"),
    (lambda c, p: c.update(num_hidden_layers=1),
     "model.layers.1.input_layernorm.weight is not part"),
    (lambda c, p: (p / "model.safetensors").write_bytes(b"garbage"), "not a readable safetensors"),
    (lambda c, p: (p / "model.safetensors").unlink(), "no model.safetensors"),
    (lambda c, p: (p / "config.json").write_text("{"), "config.json is not valid JSON"),
    (lambda c, p: c.pop("hidden_size"), "hidden_size must be a positive integer"),
])
def test_bad_checkpoints_are_one_clear_error(tmp_path, mha_checkpoint, change, message):
    from model import Llama
    path = mha_checkpoint
    config = json.loads((path / "config.json").read_text())
    copy_checkpoint(path, tmp_path)
    change(config, tmp_path)
    if (tmp_path / "config.json").read_text() != "{":
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        Llama.from_pretrained(tmp_path)


def test_missing_directory_is_one_clear_error(tmp_path):
    from model import Llama
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        Llama.from_pretrained(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- the tokenizer

TEXT = ["The grass is green. The sky is blue. The sun is yellow.", "The pass key is 12345.",
        "Remember it. 12345 is the pass key.",
        "What is the pass key? Here we go. There and back again."]


def test_sentencepiece_tokenizer_round_trips(tmp_path):
    import sentencepiece
    from tokenizer import Tokenizer
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(TEXT * 50),
                                             model_prefix=str(tmp_path / "tokenizer"),
                                             vocab_size=40, bos_id=1, eos_id=2, unk_id=0,
                                             minloglevel=2)
    tok = Tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 40)
    for text in TEXT:
        ids = tok.encode(text)
        assert ids[0] == 1 and tok.decode(ids[1:]) == text
        assert tok.encode(text, bos=False) == ids[1:]


def test_sentencepiece_continuation_has_no_stray_space(tmp_path):
    """Llama's sentencepiece adds a word-start marker to every encode: a piece of a longer text
    must not start with an extra lone one."""
    import sentencepiece
    from tokenizer import Tokenizer
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(TEXT * 50),
                                             model_prefix=str(tmp_path / "tokenizer"),
                                             vocab_size=40, add_dummy_prefix=True,
                                             remove_extra_whitespaces=False,
                                             bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    tok = Tokenizer(tmp_path)
    whole = tok.encode(TEXT[0] + " " + TEXT[1], bos=False)
    assert tok.encode(TEXT[0], bos=False) + tok.continuation(" " + TEXT[1]) == whole


def test_json_tokenizer_round_trips_with_special_ids_from_its_config(tmp_path):
    import tokenizers
    from tokenizer import Tokenizer
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                             initial_alphabet=alphabet)
    bpe.train_from_iterator(TEXT * 20, trainer)
    bpe.save(str(tmp_path / "tokenizer.json"))
    special_tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(special_tokens))
    tok = Tokenizer(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.encode("hi")[0] != 0  # no post-processor: no BOS
    for text in TEXT + ["ünïcødé 42 !"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("hi", bos=True)[0] == 0


def test_directory_without_tokenizer_is_one_clear_error(tmp_path):
    from tokenizer import Tokenizer
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        Tokenizer(tmp_path)


# ----------------------------------------------------------------------------- the README's snippet

def readme_block(marker):
    """The README's Python block that contains `marker`, as text."""
    readme = (Path(__file__).parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"one README block with {marker!r}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "linear", "factor": 2.0}])
def test_readme_snippet_runs_in_transformers(tmp_path, monkeypatch, rope_scaling):
    """The README's LlamaAttention.forward, run as written inside transformers, gives our
    model's LongHeads logits: plain causal attention within the budget (K * w = 4 * 256 tokens),
    and chunks really selected past it. With use_cache=False, transformers' own generate() makes
    our tokens; with its default, a key/value cache, it is refused in one line."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama
    from model import Llama
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=101, max_position_embeddings=1024,
                                      rope_scaling=rope_scaling)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    ours = Llama.from_pretrained(tmp_path, attention="longheads", chunk_size=256)
    assert ours.num_chunks == 4
    ids = torch.randint(0, 101, (1, 1400), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        plain = hf(ids).logits
        # restored after the test: the snippet replaces the forward of every LlamaAttention
        monkeypatch.setattr(modeling_llama.LlamaAttention, "forward",
                            modeling_llama.LlamaAttention.forward)
        block = readme_block("def longheads_forward")
        assert "TRAINED_LENGTH = 4096" in block  # Llama-2's, as the README says; this model's:
        exec(block.replace("TRAINED_LENGTH = 4096", "TRAINED_LENGTH = 1024"), {})
        assert modeling_llama.LlamaAttention.forward.__name__ == "longheads_forward"
        short = hf(ids[:, :300], use_cache=False).logits  # inside the budget: plain attention
        torch.testing.assert_close(short, plain[:, :300], atol=1e-4, rtol=0)
        long = hf(ids, use_cache=False).logits
        torch.testing.assert_close(long, ours(ids), atol=1e-4, rtol=0)
        for call in (lambda: hf(ids[:, :5]), lambda: hf.generate(ids[:, :5], max_new_tokens=2)):
            with pytest.raises(ValueError, match=r"^LongHeads here reads no key/value cache: "
                               r"call the model and generate\(\) with use_cache=False$"):
                call()  # transformers' default: a cache, which the snippet would ignore
        made = hf.generate(ids[:, :1050], max_new_tokens=2, use_cache=False, do_sample=False)
        assert torch.equal(made, ours.generate(ids[:, :1050], 2))  # past the budget
    assert (long[:, 1024:] - plain[:, 1024:]).abs().max() > 1e-2  # past it, chunks were picked


# ----------------------------------------------------------------------------- the GPU's layout

# operations that make the host wait for the GPU: a count or a value read back, a shape that
# depends on data (boolean masks go through nonzero), a copy to the host
WAITING = {"aten::nonzero", "aten::nonzero_static", "aten::masked_select", "aten::item",
           "aten::_local_scalar_dense", "aten::is_nonzero", "aten::unique_consecutive",
           "aten::_unique2", "aten::unique_dim", "aten::repeat_interleave"}


class RecordOps(TorchDispatchMode):
    """Every aten operation run inside it, and the ones that would wait on a GPU."""

    def __init__(self):
        super().__init__()
        self.ops, self.waits = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops.append(name)
        indices = args[1] if name.startswith("aten::index") and len(args) > 1 else ()
        masked = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                     for i in (indices if isinstance(indices, (list, tuple)) else ()))
        to_host = (name in ("aten::_to_copy", "aten::copy_") and "cpu" in str(kwargs or {}))
        if name in WAITING or masked or to_host:
            self.waits.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("G", [2, 1])
def test_the_gpu_layout_never_waits_for_the_gpu(G):
    """A prefill block past the first K chunks and a decoding step, in the GPU's layout, run
    on the CPU under a recorder: not one operation that would make the host wait."""
    gen = torch.Generator().manual_seed(9)
    T, Hkv = 300, 2
    q = torch.randn(1, Hkv * G, T + 1, 16, generator=gen)
    k, v = (torch.randn(1, Hkv, T + 1, 16, generator=gen) for _ in range(2))
    cache = LongHeadsCache(1, Hkv * G, Hkv, T + 1, 16, chunk_size=16, num_chunks=5,
                           for_device="cuda")
    cache(q[:, :, :200], k[:, :, :200], v[:, :, :200])  # past the first K chunks (80 tokens)
    for s, e in [(200, T), (T, T + 1)]:  # a prefill block, then a decoding step
        with RecordOps() as recorded:
            cache(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e])
        assert len(recorded.ops) > 50, "the recorder saw the work"
        assert recorded.waits == [], (s, e, recorded.waits)
    out = torch.cat([tiled_attention(q[:, :, :200], k[:, :, :200], v[:, :, :200],
                                     chunk_size=16, num_chunks=5)], 2)
    assert out.shape == (1, Hkv * G, 200, 16)


def test_the_recorder_sees_what_waits():
    """The recorder is not blind: the CPU's layout counts its tiles exactly, a boolean mask
    goes through nonzero, and .item() reads a value back."""
    with RecordOps() as recorded:
        pack(torch.tensor([0, 0, 1, 3]), 2, 4, whole=False)  # exact count: int(tiles.sum())
        x = torch.arange(6.0)
        x[x > 2].sum().item()
    assert "aten::_local_scalar_dense" in recorded.waits
    assert any("nonzero" in name or "index" in name for name in recorded.waits)


@PROPERTY
@given(st.lists(st.integers(0, 9), min_size=1, max_size=300), st.integers(1, 8))
def test_tiles_counted_by_the_bound_hold_every_item(keys, size):
    """pack with `most` (the GPU's layout): the same rows as the exact count, then empty tiles up
    to the bound, never fewer; and where every bucket fits one tile, no empty tile at all."""
    key = torch.tensor(keys)
    most = max(keys.count(k) for k in set(keys))
    place, [(tile_key, length)] = pack(key, size, 10, whole=False, most=most)
    exact_place, [(exact_key, _)] = pack(key, size, 10, whole=False)
    assert torch.equal(place, exact_place) and length == size
    assert torch.equal(tile_key[:len(exact_key)], exact_key)
    assert len(tile_key) == tiled.tile_bound(len(keys), size, 10, most) >= len(exact_key)
    if most <= size:
        assert len(tile_key) == min(10, len(keys)) and len(exact_key) <= len(tile_key)


def test_a_decoding_step_with_one_head_per_group_has_no_empty_tiles():
    """Llama-2-7B's shape (G = 1): a step's K - 1 pairs, each a different chunk, take K - 1
    tiles of one pair, not twice that."""
    K, heads = 16, 32
    assert tiled.tile_bound(heads * (K - 1), 1, heads * 600, most=1) == heads * (K - 1)


@pytest.mark.parametrize("spread", [4.0, 12.0, 24.0])
def test_the_plain_piece_in_bfloat16_keeps_float32_logits(spread):
    """The GPU's piece (attention_lse_plain) on bfloat16 inputs whose logits spread widely, as
    a trained model's do: its log-sum-exp and output match float64 on the same inputs."""
    gen = torch.Generator().manual_seed(10)
    q = (torch.randn(8, 32, 64, generator=gen) * spread / 8).bfloat16()  # logits' std ~ spread
    k, v = (torch.randn(8, 48, 64, generator=gen).bfloat16() for _ in range(2))
    out, lse = tiled.attention_lse_plain(q, k, v)
    logits = q.double() @ k.double().transpose(-1, -2)
    assert (lse.double() - logits.logsumexp(-1)).abs().max() < 1e-4
    want = logits.softmax(-1) @ v.double()
    assert (out.double() - want).abs().max() < 1e-4


def test_cache_options_are_refused_in_one_line():
    with pytest.raises(ValueError, match="for_device must be"):
        LongHeadsCache(1, 2, 1, 8, 4, chunk_size=4, num_chunks=3, for_device="gpu")
