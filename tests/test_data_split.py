"""Tests for dealing the training data to groups: the train document index, split_train_blocks
(iid / dirichlet / by_source), its non-IID-ness, and ShardedSampler over a group's subset."""

from __future__ import annotations

import json
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
    source_tv_distance,
    split_train_blocks,
    train_block_documents,
    train_block_sources,
)

WORDS = "the of and to in is for that def return class import self value data model loss train token".split()
SEQ = 16
KINDS = [("iid", 1.0), ("dirichlet", 0.1), ("dirichlet", 1.0), ("dirichlet", 100.0), ("by_source", 1.0)]


def text(rng: random.Random, n_words: int) -> str:
    return "".join(rng.choice(WORDS) + ("\n" if i % 10 == 9 else " ") for i in range(n_words))


def write_sources(root: Path, seed: int = 0) -> Path:
    """8 folders of 1..8 files (nested ones too), 3 top-level files, 2 jsonl files of rows."""
    rng = random.Random(seed)
    for i, name in enumerate(["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]):
        for j in range(i + 1):
            f = root / name / ("sub" if j % 3 == 2 else "") / f"f{j}.py"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text(rng, rng.randint(60, 250)))
    for name in ("readme.md", "notes.txt", "setup.py"):
        (root / name).write_text(text(rng, 150))
    (root / "rows").mkdir()
    for name, n in (("a.jsonl", 12), ("b.jsonl", 5)):
        with open(root / "rows" / name, "w") as fh:
            for _ in range(n):
                fh.write(json.dumps({"text": text(rng, 80)}) + "\n")
    return root


def prep(path, cache: Path, **kw) -> D.PreparedData:
    kw.setdefault("vocab_size", 300)
    kw.setdefault("seq_len", SEQ)
    kw.setdefault("val_fraction", 0.1)
    return D.prepare_data(DataSpec(path=str(path), **kw), cache, show_progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_sources(tmp_path_factory.mktemp("split") / "corpus")


@pytest.fixture(scope="module")
def data(corpus, tmp_path_factory) -> D.PreparedData:
    return prep(corpus, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def stdlib(tmp_path_factory) -> D.PreparedData:
    """The stdlib subset of tests/trainutil.py's TINY settings."""
    return D.prepare_data(
        DataSpec(path="stdlib", max_documents=60, vocab_size=512, seq_len=64),
        tmp_path_factory.mktemp("stdlib_cache"),
        show_progress=False,
    )


def texts_by_label(root: Path, stdlib: bool = False) -> dict[str, set[str]]:
    """Every document's exact text under its expected source label (built independently)."""
    out: dict[str, set[str]] = {}
    files = D._stdlib_files(root) if stdlib else [p for p in root.rglob("*") if p.is_file()]
    for f in files:
        rel = f.relative_to(root).as_posix()
        if f.suffix == ".jsonl":
            rows = [json.loads(line)["text"] for line in f.read_text().splitlines()]
            out.setdefault(rel, set()).update(rows)
        else:
            label = rel.split("/")[0] if "/" in rel else rel.rsplit(".", 1)[0]
            out.setdefault(label, set()).add(f.read_bytes().decode("utf-8"))
    return out


# ----------------------------------------------------------------------------------- document index


def check_doc_index(d: D.PreparedData, expected: dict[str, set[str]]) -> None:
    toks = np.asarray(d.train_tokens)
    off = np.asarray(d.train_doc_offsets)
    assert off.dtype == np.int64 and len(off) == d.num_train_documents == d.manifest["num_train_documents"]
    assert off[0] == 0 and np.all(np.diff(off) >= 2)  # every document has text and its EOS
    assert np.all(toks[off[1:] - 1] == d.eos_id) and toks[-1] == d.eos_id  # the token before each is EOS
    assert np.all(toks[off] != d.eos_id)  # ...and the one at each offset starts a document
    assert int((toks == d.eos_id).sum()) == len(off)  # no EOS inside a document
    assert len(d.train_doc_source_ids) == len(off) and d.manifest["num_train_sources"] == len(d.train_source_labels)
    ends = np.append(off[1:], len(toks))
    for i, (a, b, label) in enumerate(zip(off, ends, d.train_doc_sources)):
        doc = d.tokenizer.decode(toks[a : b - 1].tolist(), skip_special_tokens=False)
        assert doc in expected[label], (i, label)
    assert set(d.train_doc_sources) == set(d.train_source_labels)


def test_doc_index_agrees_with_decoding(data, corpus):
    check_doc_index(data, texts_by_label(corpus))
    labels = set(data.train_source_labels)
    assert {"alpha", "theta", "rows/a.jsonl"} <= labels and labels <= set(texts_by_label(corpus))
    assert not any(lab.endswith((".py", ".md", ".txt")) for lab in labels)  # "readme.md" -> "readme"


def test_doc_index_stdlib(stdlib):
    root = Path(stdlib.manifest["source"]["root"])
    check_doc_index(stdlib, texts_by_label(root, stdlib=True))
    assert "asyncio" in stdlib.train_source_labels  # asyncio/*.py -> one source


def test_source_label():
    assert D.source_label("json/decoder.py", row=False) == "json"
    assert D.source_label("os.py", row=False) == "os"
    assert D.source_label("a/b/c.txt", row=False) == "a"
    assert D.source_label("sub/rows.jsonl", row=True) == "sub/rows.jsonl"


def test_doc_index_cached_and_rebuilt(corpus, data, tmp_path):
    cache = tmp_path / "cache"
    d1 = prep(corpus, cache)
    entry = d1.cache_path
    for name in ("train_docs.npy", "train_doc_sources.json"):
        assert (entry / name).is_file()
    assert not list(entry.glob(".*.tmp"))
    d2 = prep(corpus, cache)
    assert d2.from_cache and np.array_equal(d2.train_doc_offsets, data.train_doc_offsets)
    assert d2.train_doc_sources == data.train_doc_sources
    # an entry whose index is missing or inconsistent is incomplete: rebuilt, to the same bytes
    for damage in (
        lambda: (entry / "train_docs.npy").unlink(),
        lambda: np.save(entry / "train_docs.npy", np.zeros(3, dtype=np.int64)),
        lambda: (entry / "train_doc_sources.json").write_text('{"labels": ["x"], "runs": [[0, 1]]}'),
    ):
        del d2
        damage()
        d2 = prep(corpus, cache)
        assert not d2.from_cache
        assert np.array_equal(d2.train_doc_offsets, data.train_doc_offsets)
        assert d2.train_doc_sources == data.train_doc_sources
        assert np.array_equal(d2.train_tokens, data.train_tokens)


# ------------------------------------------------------------------------------------------ blocks


def test_block_documents(data):
    for seq in (1, 7, SEQ, 100):
        doc = train_block_documents(data, seq)
        n = len(TokenBlocks(data.train_tokens, seq))
        assert doc.shape == (n,) and np.all(np.diff(doc) >= 0)
        off = np.append(data.train_doc_offsets, data.train_num_tokens)
        first_target = np.arange(n) * seq + 1  # block i's y[0] is train_tokens[i * seq + 1]
        assert np.all((off[doc] <= first_target) & (first_target < off[doc + 1]))
        src = train_block_sources(data, seq)
        assert np.array_equal(src, np.asarray(data.train_doc_source_ids)[doc])


# ------------------------------------------------------------------------------------------- split


@pytest.mark.parametrize("kind,alpha", KINDS)
@pytest.mark.parametrize("groups", [1, 2, 3, 4, 7])
def test_partition(data, kind, alpha, groups):
    n = len(TokenBlocks(data.train_tokens, SEQ))
    parts = split_train_blocks(data, SEQ, groups, kind, alpha, seed=3)
    assert len(parts) == groups
    sizes = [len(p) for p in parts]  # n_i, the FedAvg weights
    assert min(sizes) > 0 and sum(sizes) == n
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)  # ascending, no repeats
    allb = np.concatenate(parts)
    assert np.array_equal(np.sort(allb), np.arange(n))  # disjoint and complete


@pytest.mark.parametrize("kind,alpha", KINDS)
def test_deterministic(data, corpus, tmp_path, kind, alpha):
    a = split_train_blocks(data, SEQ, 4, kind, alpha, seed=5)
    b = split_train_blocks(data, SEQ, 4, kind, alpha, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # the same inputs rebuilt from scratch in another cache give the same split
    other = prep(corpus, tmp_path / "cache")
    assert not other.from_cache
    c = split_train_blocks(other, SEQ, 4, kind, alpha, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, c))
    # the seed matters
    assert any(
        not all(np.array_equal(x, y) for x, y in zip(a, split_train_blocks(data, SEQ, 4, kind, alpha, seed=s)))
        for s in range(6, 10)
    )


def test_iid_balanced(data):
    n = len(TokenBlocks(data.train_tokens, SEQ))
    for groups in (2, 3, 5, 8):
        sizes = [len(p) for p in split_train_blocks(data, SEQ, groups, "iid", seed=1)]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n


def mean_tv(d, seq, kind, alpha, groups=4, seeds=range(5)) -> float:
    return float(np.mean([source_tv_distance(d, seq, split_train_blocks(d, seq, groups, kind, alpha, s)) for s in seeds]))


def test_source_tv_distance_bounds(data):
    n = len(TokenBlocks(data.train_tokens, SEQ))
    assert source_tv_distance(data, SEQ, [np.arange(n)]) == pytest.approx(0.0)
    # disjoint sources: a group holding a fraction f of the blocks is at distance 1 - f
    parts = split_train_blocks(data, SEQ, 3, "by_source")
    assert source_tv_distance(data, SEQ, parts) == pytest.approx(np.mean([1 - len(p) / n for p in parts]))


@pytest.mark.parametrize("which", ["corpus", "stdlib"])
def test_dirichlet_non_iid(which, data, stdlib):
    d, seq = (data, SEQ) if which == "corpus" else (stdlib, 64)
    iid = mean_tv(d, seq, "iid", 1.0)
    strong, mid, weak = (mean_tv(d, seq, "dirichlet", a) for a in (0.1, 1.0, 100.0))
    assert iid < 0.12 and weak < 0.12  # alpha = 100 is about as mixed as IID
    assert strong > 0.4 and strong > iid + 0.3  # alpha = 0.1: groups' source mixes far from the global one
    assert weak < mid < strong


def test_by_source(data):
    src = train_block_sources(data, SEQ)
    per_source = np.bincount(src)
    for groups in (2, 3, 4):
        for seed in range(3):
            parts = split_train_blocks(data, SEQ, groups, "by_source", seed=seed)
            owned = [set(src[p].tolist()) for p in parts]
            for i in range(groups):
                for j in range(i + 1, groups):
                    assert not owned[i] & owned[j]  # no source in two groups
                for s in owned[i]:  # and whole: all of its blocks
                    assert np.count_nonzero(src[parts[i]] == s) == per_source[s]
            loads = sorted(len(p) for p in parts)
            assert loads[-1] - loads[0] <= per_source.max()  # greedy (largest first) balance


def one_line_error(fn, *patterns: str) -> str:
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for p in patterns:
        assert p in msg, msg
    return msg


def test_errors(data, tmp_path):
    n = len(TokenBlocks(data.train_tokens, SEQ))
    one_line_error(lambda: split_train_blocks(data, SEQ, 2, "random"), "'random'", "iid, dirichlet, by_source")
    one_line_error(lambda: split_train_blocks(data, SEQ, 0), "groups")
    one_line_error(lambda: split_train_blocks(data, SEQ, 2.5), "groups")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        one_line_error(lambda bad=bad: split_train_blocks(data, SEQ, 2, "dirichlet", alpha=bad), "alpha")
    one_line_error(lambda: split_train_blocks(data, SEQ, n + 1), f"{n} training blocks", "fewer groups")
    one_line_error(lambda: split_train_blocks(data, 0, 2), "seq_len")
    k = int((np.bincount(train_block_sources(data, SEQ)) > 0).sum())
    one_line_error(lambda: split_train_blocks(data, SEQ, k + 1, "by_source"), f"only {k} source", f"at most {k} groups")
    # one source, 4 groups, alpha tiny: nearly all of it lands in one group every try
    f = tmp_path / "one.jsonl"
    f.write_text("".join(json.dumps({"text": text(random.Random(i), 40)}) + "\n" for i in range(30)))
    single = prep(f, tmp_path / "cache")
    assert single.train_source_labels == ["one.jsonl"]
    one_line_error(
        lambda: split_train_blocks(single, SEQ, 4, "dirichlet", alpha=1e-3),
        "left a group empty", f"{D.SPLIT_TRIES} seeded tries", "fewer groups", "larger alpha",
    )
    assert len(split_train_blocks(single, SEQ, 4, "dirichlet", alpha=10.0)) == 4  # satisfiable: fine


# ----------------------------------------------------------------------------------- subset sampler


def run(s: ShardedSampler, steps: int) -> list[list[int]]:
    return [s.next_indices() for _ in range(steps)]


def test_sampler_without_indices_is_unchanged():
    n, bs, seed = 50, 4, 7
    s = ShardedSampler(n, bs, 0, 1, seed=seed, indices=None)
    got = run(s, 30)
    ref, epoch = [], 0
    while len(ref) < 30:  # the documented order: randperm(n) seeded seed + epoch, remainder dropped
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        ref += [perm[i : i + bs] for i in range(0, n - bs + 1, bs)]
        epoch += 1
    assert got == ref[:30]
    assert set(s.state_dict()) == {"epoch", "position", "seed", "num_examples"}
    assert s.state_dict()["num_examples"] == n


def test_sampler_subset_draws_only_and_covers(data):
    parts = split_train_blocks(data, SEQ, 3, "dirichlet", alpha=0.5, seed=2)
    n = len(TokenBlocks(data.train_tokens, SEQ))
    for part in parts:
        bs = 4
        s = ShardedSampler(n, bs, 0, 1, seed=11, indices=part)
        assert s.num_examples == len(part) and s.steps_per_epoch == len(part) // bs
        epoch0 = sum(run(s, s.steps_per_epoch), [])
        assert s.epoch == 1 and s.position == 0
        assert len(set(epoch0)) == len(epoch0) == s.steps_per_epoch * bs  # each at most once per epoch
        assert set(epoch0) <= set(part.tolist())
        assert len(part) - len(epoch0) < bs  # all but the dropped remainder
        # the subset's permutation is the full sampler's over positions, mapped through indices
        plain = sum(run(ShardedSampler(len(part), bs, 0, 1, seed=11), s.steps_per_epoch), [])
        assert epoch0 == part[plain].tolist()
    # exact cover when the subset is a multiple of the batch
    sub = parts[0][: (len(parts[0]) // 8) * 8]
    s = ShardedSampler(n, 8, 0, 1, seed=0, indices=sub)
    assert sorted(sum(run(s, s.steps_per_epoch), [])) == sorted(sub.tolist())


def test_sampler_subset_sharding_and_resume(data):
    n = len(TokenBlocks(data.train_tokens, SEQ))
    part = split_train_blocks(data, SEQ, 2, "by_source", seed=0)[1]
    spe = ShardedSampler(n, 8, 0, 1, seed=5, indices=part).steps_per_epoch
    total, cut = 3 * spe, spe + spe // 2  # three epochs; resume in the middle of the second
    ref = run(ShardedSampler(n, 8, 0, 1, seed=5, indices=part), total)
    # data-parallel ranks of the group: their chunks concatenate to the single-rank batch
    ranks = [run(ShardedSampler(n, 4, r, 2, seed=5, indices=part), total) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == ref
    assert set(sum(ranks[0] + ranks[1], [])) <= set(part.tolist())
    # resume mid-epoch (and under another layout) exactly
    s = ShardedSampler(n, 8, 0, 1, seed=5, indices=part)
    head = run(s, cut)
    state = json.loads(json.dumps(s.state_dict()))
    assert 0 < state["position"] and state["epoch"] == 1 and "indices_sha256" in state
    s2 = ShardedSampler(n, 8, 0, 1, seed=5, indices=torch.as_tensor(part))
    s2.load_state_dict(state)
    assert head + run(s2, total - cut) == ref
    four = [ShardedSampler(n, 2, r, 4, seed=5, indices=part) for r in range(4)]
    for x in four:
        x.load_state_dict(state)
    tail = [sum(z, []) for z in zip(*(run(x, total - cut) for x in four))]
    assert head + tail == ref


def test_sampler_subset_errors(data):
    n = len(TokenBlocks(data.train_tokens, SEQ))
    a, b = split_train_blocks(data, SEQ, 2, "iid", seed=0)
    sa = ShardedSampler(n, 4, 0, 1, seed=1, indices=a)
    whole = ShardedSampler(n, 4, 0, 1, seed=1)
    # equal sizes, other blocks / reordered blocks / the whole set: refused, one line each
    sb = ShardedSampler(n, 4, 0, 1, seed=1, indices=b[: len(a)] if len(b) >= len(a) else np.append(b, a[0]))
    one_line_error(lambda: sb.load_state_dict(sa.state_dict()), "subset", "different group")
    one_line_error(lambda: ShardedSampler(n, 4, 0, 1, seed=1, indices=a[::-1]).load_state_dict(sa.state_dict()), "subset")
    one_line_error(lambda: whole.load_state_dict(sa.state_dict()), "all examples")
    full = ShardedSampler(n, 4, 0, 1, seed=1, indices=np.arange(n))
    one_line_error(lambda: full.load_state_dict(whole.state_dict()), "all examples")
    assert run(full, 5) == run(ShardedSampler(n, 4, 0, 1, seed=1), 5)  # same order, other state
    one_line_error(lambda: ShardedSampler(n, 4, 0, 1, indices=[0, 1, 1, 2, 3]), "distinct")
    one_line_error(lambda: ShardedSampler(n, 4, 0, 1, indices=[0, 1, 2, n]), f"[0, {n})")
    one_line_error(lambda: ShardedSampler(n, 4, 0, 1, indices=[[0, 1], [2, 3]]), "1-D")
    one_line_error(lambda: ShardedSampler(n, 4, 0, 1, indices=[0.0, 1.0, 2.0, 3.0]), "integers")
    one_line_error(lambda: ShardedSampler(n, 4, 0, 2, indices=a[:7]), "subset", "global batch of 8")


def test_group_batches_are_the_groups_blocks(data):
    """What a group's rank trains on: TokenBlocks rows of its own blocks only."""
    blocks = data.train_blocks(SEQ)
    parts = split_train_blocks(data, SEQ, 4, "by_source", seed=0)
    src = train_block_sources(data, SEQ)
    for g, part in enumerate(parts):
        s = ShardedSampler(len(blocks), 4, 0, 1, seed=g, indices=part)
        idx = s.next_indices()
        x, y = blocks.get(idx)
        assert x.shape == (4, SEQ) and torch.equal(x[:, 1:], y[:, :-1])
        assert set(src[idx].tolist()) <= set(src[part].tolist())
    assert EOS_TOKEN not in data.train_source_labels
