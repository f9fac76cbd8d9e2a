"""Working memory of the fast path in the GPU's layout, measured on the CPU (issue 29).

A GPU runs tiled.py's GPU layout (for_device="cuda"), whose shapes never depend on the data
(it never waits for the GPU). So the same code on meta tensors, which hold shapes and no values,
makes every tensor the GPU would make, with no memory and no time: a block at the 7B shape and
128k tokens is measured directly, not extrapolated. lab.bench.LiveBytes counts the bytes of the
tensors made inside it that are alive at once; its blind spots (a kernel's own temporaries, the
allocator's rounding) are listed in lab/bench.py's memory section.
"""
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import tiled
from lab.bench import LiveBytes, block_flops, block_working_bytes, estimate_memory
from longheads import longheads_reference
from test_longheads import PROPERTY, problems
from tiled import LongHeadsCache, tiled_attention


@settings(max_examples=min(PROPERTY.max_examples, 25), deadline=None)  # ~10 s: slow slices
@given(problems("small"), st.integers(1, 7), st.sampled_from(["cpu", "cuda"]))
def test_pieces_sliced_to_one_row_or_head_equal_the_reference(problem, block_size, for_device):
    """With a working-set bound of one byte, read_rows reads one row and own_chunk one head at a
    time: every slice boundary is crossed, and the result is still the reference's."""
    q, k, v, opts = problem
    with mock.patch.multiple(tiled, PIECE_BYTES=1, CUDA_PIECE_BYTES=1):
        got = tiled_attention(q, k, v, block_size=block_size, for_device=for_device, **opts)
    torch.testing.assert_close(got, longheads_reference(q, k, v, **opts))


@pytest.mark.parametrize("Hkv, dtype", [(8, torch.bfloat16), (4, torch.float32)])
def test_meta_tensors_make_what_cpu_tensors_make(Hkv, dtype):
    """The premise of measuring on meta tensors: a block in the GPU layout makes the same
    tensors, byte for byte, on meta tensors as on real ones (grouped heads and not)."""
    opts = dict(H=8, Hkv=Hkv, D=32, chunk_size=64, num_chunks=5, length=832, dtype=dtype)
    on_meta = block_working_bytes(device="meta", **opts)
    assert on_meta == block_working_bytes(device="cpu", **opts)
    assert on_meta[0] > 0 and on_meta[1] == 512


def test_a_7b_block_at_128k_tokens_holds_under_2_5_gib():
    """The last block (2048 queries) of a 131072-token prompt at Llama-2-7B's shape (32 heads,
    32 key/value heads, D = 128, bfloat16; the paper's 256 x 16): 1.88e9 bytes measured; before
    the pieces were sliced (issue 29) it was 17.1e9, a float32 copy of every gathered key and
    value. Past the pieces' bound (CUDA_PIECE_BYTES, 1 GiB), what a block holds is per pair
    (queries rotated, outputs: P = H * b * (K - 1) rows of D) and, growing with the context, one
    float32 candidate score per (head, query, chunk). So, for T tokens, m = T / w chunks:
        W(T) <= W(32k) + (m - 128) * 2 * H * b * 4 bytes,
    which the second half checks between 32k and 128k, and which extrapolates beyond."""
    H, b, w = 32, 2048, 256
    shape = dict(H=H, Hkv=H, D=128, chunk_size=w, num_chunks=16)
    at_128k, queries = block_working_bytes(length=131072, **shape)
    assert queries == b and at_128k < 2.5 * 2**30, at_128k
    at_32k, _ = block_working_bytes(length=32768, **shape)
    assert at_128k - at_32k <= (131072 - 32768) // w * 2 * H * b * 4, (at_32k, at_128k)


def test_llama2_7b_at_128k_tokens_with_offload_fits_24_gb_on_paper():
    """lab.bench --estimate-memory's sum for a prefill in pieces of 8192 tokens, offloaded:
    weights 13.48 GB + the caches' GPU part (summaries, the first chunks' keys, RoPE tables)
    1.54 GB + one layer's working memory 2.42 GB + offload's copies 0.07 GB = 17.5 GB. The
    bound leaves 4 GB of the 24 for what LiveBytes cannot see: the CUDA context, the allocator's
    fragmentation, kernels' own temporaries. Fed whole, the prompt's activations (the MLP's
    four 131072 x 11008 tensors) alone take 11.9 GB: the 24 GB need the pieces."""
    parts = estimate_memory("llama2-7b", 131072, 8192, chunk_size=256, num_chunks=16)
    assert abs(parts["weights"] - 13.48e9) < 0.01e9  # 6.74e9 parameters in bfloat16
    assert parts["kv"] == 32 * 2 * 32 * 131072 * 128 * 2  # what offload keeps in host memory
    offloaded = parts["weights"] + parts["cache"] + parts["working"] + parts["copies"]
    assert offloaded < 20e9, parts
    assert parts["working"] < 3e9, parts


def test_live_bytes_counts_what_is_alive_not_views_or_what_came_before():
    """The counter itself: a view or an in-place op adds nothing, a freed tensor leaves, a tensor
    made before is not counted."""
    before = torch.zeros(1000)
    with LiveBytes() as live:
        a = torch.zeros(100)  # 400 bytes
        a.view(10, 10).add_(1)  # a view, in place: nothing new
        b = before * 2  # 4000 bytes
        del b
        c = a + 1  # 400 bytes, while a lives
    assert live.peak == 400 + 4000 and c.shape == a.shape


@pytest.mark.parametrize("for_device", ["cpu", "cuda"])
def test_a_block_reads_its_own_chunk_not_the_blocks_window(for_device):
    """Issue 39: every piece of attention past the first K chunks reads at most w keys a query:
    a picked chunk, or the own chunk, whatever the block's size. Here blocks of 100 queries,
    w = 16, most starting mid-chunk, in both layouts; the result is still the reference's."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 300, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 300, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    opts, keys = dict(chunk_size=16, num_chunks=5), []
    real = tiled.attention_lse

    def spy(q, k, v, mask=None, fused=True):
        keys.append(k.shape[1])  # (N, S, D): S keys a query
        return real(q, k, v, mask, fused)
    with mock.patch.object(tiled, "attention_lse", spy):
        got = tiled_attention(q, k, v, block_size=100, for_device=for_device, **opts)
    torch.testing.assert_close(got, longheads_reference(q, k, v, **opts))
    assert keys and max(keys) <= 16, keys


def test_the_own_chunk_is_a_small_share_of_a_7b_blocks_work():
    """The work (floating-point operations of the matrix products, counted on meta tensors) of
    the last block of an 8192-token prompt at Llama-2-7B's shape, the paper's 256 x 16, GPU
    layout: 2048 queries in 8 chunks. Each chunk's queries against its own 256 keys cost
    2 x 2 x H x 8 x 256 x 256 x D = 8.6e9 (padding a partial chunk would add at most two
    chunks); against the block's whole window, as before issue 39, they cost 68.7e9 of the
    block's 211e9."""
    total, own = block_flops(H=32, Hkv=32, D=128, chunk_size=256, num_chunks=16, length=8192)
    assert own <= 2 * 2 * 32 * (8 + 2) * 256 * 256 * 128, (own, total)
    assert own > 0 and total < 160e9, (own, total)


def test_an_offloaded_block_learns_its_rows_once():
    """Offloaded, the host gathers the rows a block reads, so it must read them back from the
    GPU, a wait: once a block (ChunkedKV.where_gathered), not once a slice of rows. Counted in
    the GPU layout on the CPU, with pieces small enough that a block goes in many slices."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 400, 16, generator=gen)
    k, v = (torch.randn(1, 2, 400, 16, generator=gen) for _ in range(2))
    with mock.patch.object(tiled, "CUDA_PIECE_BYTES", 2**14):  # read when a cache is made
        cache = LongHeadsCache(1, 4, 2, 400, 16, chunk_size=16, num_chunks=5, block_size=120,
                               for_device="cuda")
    gathered, read = [], []  # rows read back, once a block; rows read, once a slice
    real_gathered, real_chunks = tiled.ChunkedKV.where_gathered, tiled.ChunkedKV.chunks

    def where_gathered(kv, rows):
        gathered.append(len(rows))
        return real_gathered(kv, rows)

    def chunks(kv, rows):
        read.append(len(rows))
        return real_chunks(kv, rows)
    with mock.patch.multiple(tiled.ChunkedKV, where_gathered=where_gathered, chunks=chunks):
        cache(q, k, v)
    assert len(gathered) == 3, gathered  # blocks 80.., 200.., 320..
    assert len(read) > 3 * len(gathered), read  # ... each in several slices


def test_sliced_pieces_in_the_gpu_layout_never_wait():
    """test_longheads' recorder on a prefill block and a decoding step whose pieces go in many
    slices (a 16 KiB bound): slicing adds no operation that would make the host wait."""
    from test_longheads import RecordOps
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(1, 4, 301, 16, generator=gen)
    k, v = (torch.randn(1, 2, 301, 16, generator=gen) for _ in range(2))
    with mock.patch.object(tiled, "CUDA_PIECE_BYTES", 2**14):
        cache = LongHeadsCache(1, 4, 2, 301, 16, chunk_size=16, num_chunks=5, for_device="cuda")
    cache(q[:, :, :200], k[:, :, :200], v[:, :, :200])
    for s, e in [(200, 300), (300, 301)]:  # a prefill block, then a decoding step
        with RecordOps() as recorded:
            cache(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e])
        assert recorded.waits == [], (s, e, recorded.waits)
        assert recorded.ops.count("aten::index_select") > 4, "the pieces went in slices"
