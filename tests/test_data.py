"""Tests for trainer.data: loading, splitting, tokenising, caching, sampling, errors."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import data as D
from trainer.data import (
    EOS_TOKEN,
    DataError,
    DataSpec,
    ShardedSampler,
    TokenBlocks,
    iterate_eval,
    prepare_data,
    split_documents,
)

WORDS = "the of and to in is for that def return class import self value data model loss train token".split()
UNICODE = ["naïve", "café", "日本語", "emoji 🎉", "tab\tsep", "  indented", "\r\n", "ß"]


def make_text(rng: random.Random, n_words: int) -> str:
    out = []
    for i in range(n_words):
        out.append(rng.choice(UNICODE) if rng.random() < 0.05 else rng.choice(WORDS))
        out.append("\n" if i % 12 == 11 else " ")
    return "".join(out)


def write_text_corpus(root: Path, n_files: int = 12, n_words: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    exts = [".txt", ".md", ".py"]
    for i in range(n_files):
        sub = root / ("sub" if i % 3 == 0 else "")
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:03d}{exts[i % 3]}").write_bytes(make_text(rng, n_words).encode("utf-8"))
    (root / "ignored.bin").write_bytes(b"\x00\x01binary")
    (root / ".hidden.txt").write_text("hidden file must be skipped")
    return root


def write_jsonl(path: Path, n_rows: int = 40, n_words: int = 60, seed: int = 1, field: str = "text") -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n_rows):
            fh.write(json.dumps({field: make_text(rng, n_words), "id": i}) + "\n")
    return path


def spec(path, **kw) -> DataSpec:
    kw.setdefault("vocab_size", 300)
    kw.setdefault("seq_len", 16)
    kw.setdefault("val_fraction", 0.2)
    return DataSpec(path=str(path), **kw)


def prep(s: DataSpec, cache: Path) -> D.PreparedData:
    return prepare_data(s, cache, show_progress=False)


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory) -> Path:
    return write_text_corpus(tmp_path_factory.mktemp("corpus") / "text")


@pytest.fixture(scope="module")
def text_data(text_corpus, tmp_path_factory) -> D.PreparedData:
    return prep(spec(text_corpus), tmp_path_factory.mktemp("cache"))


def decode(d: D.PreparedData, ids) -> str:
    return d.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


# ------------------------------------------------------------------------------------------ loading


def test_text_folder(text_data, text_corpus):
    d = text_data
    m = d.manifest
    assert m["num_train_documents"] + m["num_val_documents"] == 12  # .bin and hidden files ignored
    assert m["num_train_documents"] > 0 and m["num_val_documents"] > 0
    assert d.vocab_size == 300 and d.tokenizer.get_vocab_size() == 300
    assert d.train_tokens.dtype == np.uint16 and d.val_tokens.dtype == np.uint16
    assert isinstance(d.train_tokens, np.memmap) and d.train_tokens.ndim == 1
    assert d.eos_id == d.tokenizer.token_to_id(EOS_TOKEN)
    assert d.tokenizer_path.is_file() and d.tokenizer_path.parent == d.cache_path
    assert len(d.cache_key) == 64 and d.cache_path.name == d.cache_key
    assert (d.cache_path / "done.json").is_file()
    assert not d.from_cache
    assert d.num_train_sequences == (len(d.train_tokens) - 1) // 16
    assert d.num_val_sequences == (len(d.val_tokens) - 1) // 16
    # whole files are documents: every val document is exactly the content of one file
    files = {p.read_bytes().decode() for p in text_corpus.rglob("doc*")}
    val_docs = d.val_text().split(EOS_TOKEN)
    assert val_docs[-1] == "" and set(val_docs[:-1]) <= files


def test_jsonl_json_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "rows"
    root.mkdir()
    write_jsonl(root / "a.jsonl", n_rows=30, seed=1)
    rng = random.Random(2)
    (root / "b.json").write_text(json.dumps([{"text": make_text(rng, 60), "other": 1} for _ in range(10)]))
    pq.write_table(
        pa.table({"text": [make_text(rng, 60) for _ in range(20)] + ["", None]}), root / "c.parquet"
    )
    d = prep(spec(root), tmp_path / "cache")
    m = d.manifest
    assert m["num_train_documents"] + m["num_val_documents"] == 60
    assert m["skipped_empty_documents"] == 2
    # rows are labelled with their file; the index covers every train document
    assert set(d.train_doc_sources) <= {"a.jsonl", "b.json", "c.parquet"} and len(d.train_source_labels) == 3
    assert len(d.train_doc_sources) == m["num_train_documents"]
    assert (tmp_path / "cache" / "hf_datasets").is_dir()  # HF cache kept inside cache_dir
    # each format alone
    for name in ("a.jsonl", "b.json", "c.parquet"):
        one = prep(spec(root / name), tmp_path / "cache")
        assert one.val_num_tokens > 0 and one.train_num_tokens > 0


def test_text_field_and_max_documents(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", n_rows=30, field="content")
    d = prep(spec(f, text_field="content", max_documents=10), tmp_path / "cache")
    assert d.manifest["num_train_documents"] + d.manifest["num_val_documents"] == 10
    d2 = prep(spec(f, text_field="content"), tmp_path / "cache")
    assert d2.cache_key != d.cache_key
    assert d2.manifest["num_train_documents"] + d2.manifest["num_val_documents"] == 30


def test_hub_dataset_path(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rng = random.Random(3)
    fake = datasets.Dataset.from_dict({"text": [make_text(rng, 50) for _ in range(20)]})
    calls = []

    def fake_load(name, *a, **kw):
        calls.append((name, kw.get("split"), kw.get("cache_dir")))
        return fake

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    d = prep(spec("someorg/somedata"), tmp_path / "cache")
    assert calls and calls[0][0] == "someorg/somedata" and calls[0][1] == "train"
    assert calls[0][2].startswith(str(tmp_path / "cache"))
    assert d.manifest["num_train_documents"] + d.manifest["num_val_documents"] == 20
    assert d.train_source_labels == ["someorg/somedata"]  # hub rows: one source
    assert d.train_doc_sources == ["someorg/somedata"] * d.manifest["num_train_documents"]

    def failing(*a, **kw):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match="someorg/other"):
        prep(spec("someorg/other"), tmp_path / "cache")


def test_stdlib_small(tmp_path):
    d = prep(DataSpec(path="stdlib", vocab_size=300, seq_len=64, max_documents=50), tmp_path / "cache")
    m = d.manifest
    assert m["num_train_documents"] + m["num_val_documents"] == 50
    assert m["source"]["kind"] == "stdlib"
    files = D._stdlib_files(Path(m["source"]["root"]))
    rels = {f.relative_to(m["source"]["root"]).parts[0] for f in files}
    assert rels.isdisjoint({"site-packages", "test", "idlelib"})
    assert not any("tests" in f.parts for f in files)
    assert decode(d, d.val_tokens) == d.val_text()


# ------------------------------------------------------------------- determinism, split, tokenizer


def test_deterministic_across_runs(text_corpus, text_data, tmp_path):
    d2 = prep(spec(text_corpus), tmp_path / "other_cache")
    assert d2.cache_key == text_data.cache_key and not d2.from_cache
    assert np.array_equal(d2.train_tokens, text_data.train_tokens)
    assert np.array_equal(d2.val_tokens, text_data.val_tokens)
    assert d2.tokenizer_path.read_bytes() == text_data.tokenizer_path.read_bytes()
    assert d2.val_text() == text_data.val_text()


def test_num_proc_does_not_change_output(text_corpus, text_data, tmp_path):
    d = prep(spec(text_corpus, num_proc=1), tmp_path / "cache")
    assert d.cache_key == text_data.cache_key
    assert np.array_equal(d.train_tokens, text_data.train_tokens)


def test_split_stable_when_adding_documents():
    ids = [f"f{i}.txt" for i in range(200)]
    a = split_documents(ids, 0.1, seed=7)
    b = split_documents(ids + [f"new{i}.txt" for i in range(50)], 0.1, seed=7)
    assert a == b[:200]
    assert 5 < sum(a) < 40  # roughly val_fraction
    assert split_documents(ids, 0.1, seed=8) != a  # seed matters
    # both splits non-empty for tiny corpora, whatever the hashes say
    for n in range(2, 6):
        for seed in range(20):
            s = split_documents([f"d{i}" for i in range(n)], 0.01, seed)
            assert any(s) and not all(s)
            s = split_documents([f"d{i}" for i in range(n)], 0.99, seed)
            assert any(s) and not all(s)


def test_tokenizer_roundtrip(text_data):
    tok = text_data.tokenizer
    for s in [
        "hello world",
        "  def f(x):\n\treturn x  \r\n",
        "日本語 🎉 naïve",
        "",
        " leading",
        "a\u00a0b\x00c",
    ]:
        assert tok.decode(tok.encode(s).ids) == s
    assert decode(text_data, text_data.val_tokens) == text_data.val_text()
    # the val stream is exactly the tokenisation of val_text()
    assert tok.encode(text_data.val_text()).ids == text_data.val_tokens.tolist()


def test_eos_separators(text_data):
    d = text_data
    for toks, ndocs in (
        (d.train_tokens, d.manifest["num_train_documents"]),
        (d.val_tokens, d.manifest["num_val_documents"]),
    ):
        assert int(toks[-1]) == d.eos_id
        assert int((np.asarray(toks) == d.eos_id).sum()) == ndocs
    assert d.eos_id == 0  # first special token of a trained BPE


def test_val_bytes(text_data):
    d = text_data
    assert d.val_bytes == len(d.val_text().encode("utf-8"))
    assert d.val_num_tokens == len(d.val_tokens)
    assert d.val_text().count(EOS_TOKEN) == d.manifest["num_val_documents"]


def test_given_tokenizer(text_corpus, text_data, tmp_path):
    d = prep(spec(text_corpus, tokenizer=str(text_data.tokenizer_path)), tmp_path / "cache")
    assert np.array_equal(d.train_tokens, text_data.train_tokens)
    assert d.eos_id == text_data.eos_id
    # a tokenizer without <|endoftext|> gets it added as a special token
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bare = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.decoder = decoders.ByteLevel()
    bare.save(str(tmp_path / "bare.json"))
    d2 = prep(spec(text_corpus, tokenizer=str(tmp_path / "bare.json")), tmp_path / "cache")
    assert d2.tokenizer.token_to_id(EOS_TOKEN) == d2.eos_id == 256
    assert d2.vocab_size == 257
    assert decode(d2, d2.val_tokens) == d2.val_text()
    # changing the tokenizer file's content changes the key
    bare.add_tokens(["zzz"])
    bare.save(str(tmp_path / "bare.json"))
    assert (
        prep(spec(text_corpus, tokenizer=str(tmp_path / "bare.json")), tmp_path / "cache").cache_key
        != d2.cache_key
    )


def test_token_dtype():
    assert D.token_dtype(300) == np.uint16 and D.token_dtype(65535) == np.uint16
    assert D.token_dtype(65536) == np.uint32 and D.token_dtype(128256) == np.uint32


# -------------------------------------------------------------------------------------------- cache


def test_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    root = write_text_corpus(tmp_path / "c", n_files=8)
    cache = tmp_path / "cache"
    d1 = prep(spec(root), cache)
    assert not d1.from_cache

    def boom(*a, **kw):
        raise AssertionError("re-tokenised although cached")

    with monkeypatch.context() as mp:
        mp.setattr(D, "_tokenize_split", boom)
        mp.setattr(D, "train_bpe_tokenizer", boom)
        d2 = prep(spec(root), cache)
        # seq_len is not part of the key
        d3 = prep(spec(root, seq_len=8), cache)
    assert d2.from_cache and d3.from_cache
    assert d2.cache_key == d1.cache_key == d3.cache_key
    assert np.array_equal(d2.train_tokens, d1.train_tokens)
    assert d3.num_train_sequences == (d1.train_num_tokens - 1) // 8

    calls = []
    real = D._tokenize_split
    monkeypatch.setattr(D, "_tokenize_split", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    f = root / "doc001.md"
    f.write_text(f.read_text() + " changed")
    d4 = prep(spec(root), cache)
    assert not d4.from_cache and d4.cache_key != d1.cache_key and calls
    for changed in (dict(vocab_size=310), dict(seed=1), dict(val_fraction=0.3), dict(max_documents=5)):
        d5 = prep(spec(root, **changed), cache)
        assert not d5.from_cache and d5.cache_key not in (d1.cache_key, d4.cache_key), changed
    assert prep(spec(root, vocab_size=310), cache).from_cache
    # adding a file invalidates too
    (root / "new.txt").write_text("a brand new document " * 20)
    assert prep(spec(root), cache).cache_key != d4.cache_key


def test_jsonl_rewrite_same_size_invalidates(tmp_path):
    f = tmp_path / "rows.jsonl"
    rows = [make_text(random.Random(i), 30) for i in range(12)]
    f.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    d1 = prep(spec(f, seq_len=4), tmp_path / "cache")
    text1 = d1.val_text()
    st = f.stat()
    f.write_text("".join(json.dumps({"text": r[::-1]}) + "\n" for r in rows))  # same size, new content
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert f.stat().st_size == st.st_size
    d2 = prep(spec(f, seq_len=4), tmp_path / "cache")
    assert not d2.from_cache and d2.cache_key != d1.cache_key
    docs1 = text1.split(EOS_TOKEN)[:-1]
    docs2 = d2.val_text().split(EOS_TOKEN)[:-1]
    assert docs2 == [x[::-1] for x in docs1]  # fresh rows (not the HF cache's), same split by identity


def test_interrupted_write_is_not_complete(tmp_path, monkeypatch):
    root = write_text_corpus(tmp_path / "c", n_files=8)
    cache = tmp_path / "cache"
    real = D._tokenize_split

    def crash_on_val(tok, texts, eos, dtype, out_path, *a, **kw):
        if out_path.name == "val.bin":
            raise KeyboardInterrupt("simulated crash")
        return real(tok, texts, eos, dtype, out_path, *a, **kw)

    monkeypatch.setattr(D, "_tokenize_split", crash_on_val)
    with pytest.raises(KeyboardInterrupt):
        prep(spec(root), cache)
    key = D.compute_cache_key(spec(root))
    entry = cache / key
    assert entry.is_dir() and not (entry / "done.json").exists() and not (entry / "val.bin").exists()
    assert not list(entry.glob(".*.tmp"))  # temp files cleaned up
    monkeypatch.setattr(D, "_tokenize_split", real)
    d = prep(spec(root), cache)
    assert not d.from_cache and d.cache_key == key
    expected = np.array(d.train_tokens)
    del d
    # a truncated stream file is detected via the manifest and rebuilt (replace, never truncate a
    # file in place: it may be memory-mapped by a live PreparedData)
    (entry / "short.bin").write_bytes((entry / "train.bin").read_bytes()[:10])
    os.replace(entry / "short.bin", entry / "train.bin")
    d2 = prep(spec(root), cache)
    assert not d2.from_cache and np.array_equal(d2.train_tokens, expected)
    (entry / "done.json").write_text("{not json")
    assert not prep(spec(root), cache).from_cache
    assert prep(spec(root), cache).from_cache


def test_doc_index_written_before_manifest(tmp_path, monkeypatch):
    root = write_text_corpus(tmp_path / "c", n_files=8)
    written = []
    real = D.atomic_write
    monkeypatch.setattr(D, "atomic_write", lambda path, *a, **kw: written.append(path.name) or real(path, *a, **kw))
    d = prep(spec(root), tmp_path / "cache")
    assert written[-1] == "done.json" and {"train_docs.npy", "train_doc_sources.json"} <= set(written[:-1])
    assert d.manifest["version"] == D.PIPELINE_VERSION == "data-v2"
    # folder documents are labelled with their first path component (top-level files: the stem)
    docs = sorted(p.relative_to(root).as_posix() for p in root.rglob("doc*"))
    expected = {x.split("/")[0] if "/" in x else x.rsplit(".", 1)[0] for x in docs}
    assert set(d.train_doc_sources) <= expected and "sub" in expected
    off = np.asarray(d.train_doc_offsets)
    assert off[0] == 0 and np.all(np.asarray(d.train_tokens)[off[1:] - 1] == d.eos_id)


# ------------------------------------------------------------------------------------------- errors


def test_error_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        prep(spec(missing), tmp_path / "cache")
    with pytest.raises(DataError, match="nope.jsonl"):
        prep(spec("nope.jsonl"), tmp_path / "cache")


def test_error_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"{empty}.*allowed"):
        prep(spec(empty), tmp_path / "cache")
    (empty / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match=str(empty)):
        prep(spec(empty), tmp_path / "cache")
    with pytest.raises(DataError, match="unsupported extension"):
        prep(spec(empty / "x.csv"), tmp_path / "cache")


def test_error_empty_text(tmp_path):
    root = tmp_path / "blank"
    root.mkdir()
    (root / "a.txt").write_text("")
    (root / "b.txt").write_text("")
    with pytest.raises(DataError, match=f"{root}.*no text"):
        prep(spec(root), tmp_path / "cache")
    f = tmp_path / "blank.jsonl"
    f.write_text('{"text": ""}\n{"text": null}\n')
    with pytest.raises(DataError, match="no text"):
        prep(spec(f), tmp_path / "cache")


def test_error_single_document(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("only one document " * 50)
    with pytest.raises(DataError, match="need >= 2"):
        prep(spec(f), tmp_path / "cache")


def test_error_tokenizer(text_corpus, tmp_path):
    missing = tmp_path / "missing_tok.json"
    with pytest.raises(DataError, match=str(missing)):
        prep(spec(text_corpus, tokenizer=str(missing)), tmp_path / "cache")
    bad = tmp_path / "bad_tok.json"
    bad.write_text('{"this is": "not a tokenizer"}')
    with pytest.raises(DataError, match=str(bad)):
        prep(spec(text_corpus, tokenizer=str(bad)), tmp_path / "cache")


def test_error_text_field(tmp_path):
    f = write_jsonl(tmp_path / "rows.jsonl", n_rows=5)
    with pytest.raises(DataError, match=r"rows\.jsonl.*'body'.*available columns"):
        prep(spec(f, text_field="body"), tmp_path / "cache")
    g = tmp_path / "ints.jsonl"
    g.write_text('{"text": 1}\n{"text": 2}\n')
    with pytest.raises(DataError, match="ints.jsonl"):
        prep(spec(g), tmp_path / "cache")
    h = tmp_path / "broken.jsonl"
    h.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match="broken.jsonl"):
        prep(spec(h), tmp_path / "cache")


def test_error_too_little_data(tmp_path):
    root = write_text_corpus(tmp_path / "c", n_files=6, n_words=40)
    with pytest.raises(DataError, match=r"train split.*has \d+ tokens.*seq_len\+1 = 100001"):
        prep(spec(root, seq_len=100_000), tmp_path / "cache")
    d = prep(spec(root, seq_len=4), tmp_path / "cache")  # the cache entry was kept
    assert d.from_cache and d.val_num_tokens != d.train_num_tokens
    n, split = min((d.train_num_tokens, "train"), (d.val_num_tokens, "val"))
    with pytest.raises(DataError, match=rf"{split} split.*has {n} tokens.*seq_len\+1 = {n + 1}"):
        prep(spec(root, seq_len=n), tmp_path / "cache")
    d = prep(spec(root, seq_len=n - 1), tmp_path / "cache")
    assert min(d.num_train_sequences, d.num_val_sequences) == 1
    with pytest.raises(DataError, match="train"):
        TokenBlocks(np.zeros(10, dtype=np.uint16), 10, name="train")


def test_error_bad_spec(tmp_path, text_corpus):
    for bad in (dict(val_fraction=0.0), dict(val_fraction=1.0), dict(vocab_size=100), dict(seq_len=0)):
        with pytest.raises(DataError):
            prep(spec(text_corpus, **bad), tmp_path / "cache")


def test_error_not_utf8(tmp_path):
    root = write_text_corpus(tmp_path / "c", n_files=3)
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt.*UTF-8"):
        prep(spec(root), tmp_path / "cache")


# ---------------------------------------------------------------------------------------- sampling


def test_token_blocks():
    toks = np.arange(103, dtype=np.uint16)
    b = TokenBlocks(toks, 10)
    assert len(b) == 10  # (103 - 1) // 10
    x, y = b.get([0, 9, 3])
    assert x.dtype == torch.long and x.shape == y.shape == (3, 10)
    assert x[0].tolist() == list(range(10)) and y[0].tolist() == list(range(1, 11))
    assert x[1].tolist() == list(range(90, 100)) and y[1].tolist() == list(range(91, 101))
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert x.is_contiguous() and y.is_contiguous()
    xi, yi = b[3]
    assert torch.equal(xi, x[2]) and torch.equal(yi, y[2])
    with pytest.raises(IndexError):
        b.get([10])
    with pytest.raises(IndexError):
        b.get([-1])
    assert len(TokenBlocks(np.arange(11), 10)) == 1


def test_token_blocks_on_prepared(text_data):
    b = text_data.train_blocks()
    x, y = b.get(range(len(b)))
    flat = np.asarray(text_data.train_tokens[: len(b) * 16 + 1], dtype=np.int64)
    assert np.array_equal(x.reshape(-1).numpy(), flat[:-1])
    assert np.array_equal(y.reshape(-1).numpy(), flat[1:])
    assert len(text_data.val_blocks()) == text_data.num_val_sequences


def run_sampler(s: ShardedSampler, steps: int) -> list[list[int]]:
    return [s.next_indices() for _ in range(steps)]


def test_sampler_deterministic():
    a = run_sampler(ShardedSampler(100, 8, 0, 1, seed=3), 30)
    b = run_sampler(ShardedSampler(100, 8, 0, 1, seed=3), 30)
    c = run_sampler(ShardedSampler(100, 8, 0, 1, seed=4), 30)
    assert a == b and a != c


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sampler_sharding_matches_single_rank(world):
    per_rank, n, steps = 5, 97, 25  # several epochs with a dropped remainder
    single = run_sampler(ShardedSampler(n, per_rank * world, 0, 1, seed=11), steps)
    ranks = [run_sampler(ShardedSampler(n, per_rank, r, world, seed=11), steps) for r in range(world)]
    for t in range(steps):
        assert sum((ranks[r][t] for r in range(world)), []) == single[t]
        assert all(len(ranks[r][t]) == per_rank for r in range(world))


def test_sampler_resume():
    ref = run_sampler(ShardedSampler(50, 4, 1, 2, seed=5), 40)
    s = ShardedSampler(50, 4, 1, 2, seed=5)
    head = run_sampler(s, 17)
    state = json.loads(json.dumps(s.state_dict()))  # survives a JSON round-trip (checkpoints)
    assert set(state) == {"epoch", "position", "seed", "num_examples"}
    s2 = ShardedSampler(50, 4, 1, 2, seed=5)
    s2.load_state_dict(state)
    assert head + run_sampler(s2, 23) == ref
    # a state saved under one layout resumes under another with the same global batch
    g = ShardedSampler(50, 8, 0, 1, seed=5)
    run_sampler(g, 17)
    s4 = [ShardedSampler(50, 2, r, 4, seed=5) for r in range(4)]
    for s_ in s4:
        s_.load_state_dict(g.state_dict())
    for _ in range(10):
        assert sum((s_.next_indices() for s_ in s4), []) == g.next_indices()


def test_sampler_state_mismatch():
    s = ShardedSampler(50, 4, 0, 1, seed=5)
    with pytest.raises(DataError, match="60 examples"):
        s.load_state_dict({"epoch": 0, "position": 0, "seed": 5, "num_examples": 60})
    with pytest.raises(DataError, match="seed"):
        s.load_state_dict({"epoch": 0, "position": 0, "seed": 6, "num_examples": 50})
    with pytest.raises(DataError):
        s.load_state_dict({"epoch": 0})
    with pytest.raises(DataError):
        ShardedSampler(7, 4, 0, 2, seed=0)  # cannot fill one global batch
    with pytest.raises(DataError):
        ShardedSampler(70, 4, 2, 2, seed=0)


def test_sampler_epoch_rollover():
    n, bs = 23, 5
    s = ShardedSampler(n, bs, 0, 1, seed=9)
    assert s.steps_per_epoch == 4
    epochs = [run_sampler(s, 4) for _ in range(3)]
    for e, batches in enumerate(epochs):
        flat = sum(batches, [])
        assert len(flat) == len(set(flat)) == 20 and all(0 <= i < n for i in flat)
        expected = torch.randperm(n, generator=torch.Generator().manual_seed(9 + e))[:20].tolist()
        assert flat == expected
    assert epochs[0] != epochs[1] != epochs[2]
    assert s.state_dict()["epoch"] == 3 and s.state_dict()["position"] == 0


def test_iterate_eval():
    b = TokenBlocks(np.arange(1 + 7 * 4), 4)
    batches = list(iterate_eval(b, 3))
    assert [x.shape[0] for x, _ in batches] == [3, 3, 1]
    xs = torch.cat([x for x, _ in batches])
    assert xs.reshape(-1).tolist() == list(range(28))
    assert len(list(iterate_eval(b, 3, max_batches=2))) == 2
    assert len(list(iterate_eval(b, 100))) == 1


def test_cache_key_helper_matches(text_corpus, text_data):
    assert D.compute_cache_key(spec(text_corpus)) == text_data.cache_key
    assert os.path.basename(text_data.cache_path) == text_data.cache_key
