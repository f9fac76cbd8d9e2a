"""A decoding step's aten operations in the GPU layout (issue 29, item 5): on a GPU each one not
a view is a kernel launch of a few microseconds, and a step's tiny tensors make the host, which
launches them, the bottleneck. Counted on meta tensors (shapes only) at Llama-2-7B's shape, 32k
tokens cached, one layer. Before issue 29: 229 operations, 135 of them launches (both with one
head per group and with four); now 190 and 93: a step's pairs read their chunks directly
(read_pairs, no pack), its one query needs no mask, its key's rotation and its ranks'
positions are slices and a table, not gathers.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tiled import LongHeadsCache


class CountOps(TorchDispatchMode):
    """Every aten operation run inside it, and those that make a tensor that is not a view."""

    def __init__(self):
        super().__init__()
        self.ops, self.launches = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func._schema.name)
        # why _unsafe_view too: a view that autograd is told not to track, no kernel either
        view = func.is_view or func._schema.name == "aten::_unsafe_view"
        if isinstance(out, (torch.Tensor, tuple, list)) and not view:
            self.launches.append(func._schema.name)
        return out


def decoding_step_ops(Hkv, cached=32768, H=32, D=128, dtype=torch.bfloat16):
    """The operations of one decoding step of one layer after `cached` tokens, 7B's head shape
    and the paper's 256 x 16, in the GPU layout on meta tensors."""
    cache = LongHeadsCache(1, H, Hkv, cached + 1, D, chunk_size=256, num_chunks=16, dtype=dtype,
                           device="meta", for_device="cuda")
    cache.length = cached  # as if stored (meta tensors hold nothing)
    q = torch.zeros(1, H, 1, D, dtype=dtype, device="meta")  # (B, H, 1, D)
    k = torch.zeros(1, Hkv, 1, D, dtype=dtype, device="meta")  # (B, Hkv, 1, D), and v
    with CountOps() as counted, torch.no_grad():
        cache(q, k, k)
    return counted


@pytest.mark.parametrize("Hkv", [32, 8])
def test_a_decoding_step_launches_at_most_100_kernels(Hkv):
    counted = decoding_step_ops(Hkv)
    assert len(counted.launches) <= 100 and len(counted.ops) <= 200, (
        len(counted.launches), len(counted.ops))
    assert "aten::index_add_" not in counted.ops, "pack counted the pairs: rows in a step"


# reads of a value back to the host that the CPU's recorder (test_longheads.RecordOps) cannot
# see, or does not count as waits: on a GPU each one stalls the host until the GPU catches up
UNSEEN_WAITS = (".tolist(", ".cpu(", ".numpy(", ".item(", "torch.equal", "bincount", "allclose")


def test_the_gpu_path_reads_nothing_back_that_the_recorder_cannot_see():
    """The functions a block and a step run in the GPU layout, read as text: none of the reads
    back the recorder misses (pack's exact count and .tolist() serve the CPU's layout only, and
    an offloaded block's read back of its rows, ChunkedKV.where_gathered, is deliberate: both
    are left out)."""
    import inspect
    import tiled
    path = [tiled.LongHeadsCache.forward, tiled.LongHeadsCache._store,
            tiled.LongHeadsCache._summarise, tiled.ChunkedKV.write, tiled.ChunkedKV.span,
            tiled.ChunkedKV.chunks,
            tiled.ChunkedKV._stage, tiled.attend_first_chunks, tiled.attend_block,
            tiled.score_candidates, tiled.read_picks, tiled.read_pairs, tiled.read_rows,
            tiled.put_back, tiled.rows_per_slice, tiled.own_chunk, tiled.own_mask,
            tiled.causal_attention, tiled.attention_lse, tiled.attention_lse_plain, tiled.merge,
            tiled.tile_bound]
    found = [(f.__name__, w) for f in path for w in UNSEEN_WAITS if w in inspect.getsource(f)]
    assert found == []
    assert ".tolist(" in inspect.getsource(tiled.pack), "the check reads the source it names"
