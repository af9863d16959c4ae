"""Data pipeline: documents -> byte-level BPE -> cached token streams -> sharded training batches.

Overview
--------
``prepare_data(spec, cache_dir)`` turns a corpus into two flat token streams (train / val), caches
them on disk and returns a :class:`PreparedData`.  ``TokenBlocks`` views a stream as fixed-length
training examples, ``ShardedSampler`` hands out deterministic, resumable, data-parallel-sharded
micro-batches (of all blocks, or of a subset) and ``iterate_eval`` walks the validation blocks in
order (all of them, or a fixed sample spread evenly over the split).  ``split_train_blocks`` deals the training blocks to groups (replicas, federated clients),
IID or non-IID by document source.

Sources (``DataSpec.path``)
    * ``"stdlib"``: every ``.py`` file of the running interpreter's standard library
      (``sysconfig.get_paths()["stdlib"]``), skipping any directory named in
      :data:`STDLIB_EXCLUDED_DIRS` (third-party packages, the test suites, IDLE and caches) and the
      ``config-*`` build directory.  On CPython 3.11 that is ~670 files, ~11 MB.
    * a local file or folder (searched recursively, hidden entries and ``__pycache__`` skipped) of
      ``.txt``/``.md``/``.py`` (one document = one whole file, read as UTF-8, bytes kept exactly),
      ``.jsonl``/``.json`` and ``.parquet`` (one document = one row's ``text_field``, loaded with
      ``datasets.load_dataset("json"/"parquet")``, one call per file, HF cache inside ``cache_dir``).
      Other extensions in a folder are ignored.  Files are visited in sorted relative-path order.
    * a Hugging Face hub dataset name (``"name"`` or ``"org/name"``, split ``"train"``), only tried
      when the path does not exist locally and does not look like a file path.
    Empty documents (``""`` / ``None`` rows, empty files) are skipped; ``max_documents`` keeps the
    first N non-empty documents in that order.

Split
    Each document has an identity (relative file path, ``"<relpath>#<row>"`` for rows, ``"#<row>"``
    for hub rows).  ``sha256(seed, identity)`` mapped to [0, 1) below ``val_fraction`` -> val, so
    adding files never moves other documents between splits.  With >= 2 documents both splits are
    guaranteed non-empty (if one came out empty, the document whose hash is closest to the
    boundary is moved over).

Tokenizer
    ``DataSpec.tokenizer`` loads a ``tokenizer.json``; ``<|endoftext|>`` is added as a special token
    if it lacks one.  Otherwise a byte-level BPE (GPT-2 style ByteLevel pre-tokenizer/decoder, full
    256-byte initial alphabet, special token ``<|endoftext|>``) is trained on the TRAIN split only,
    so decoding round-trips any text.  The tokenizer used is saved in the cache entry.

Streams
    Each document is tokenised (``Tokenizer.encode_batch``: multi-threaded in Rust) and followed
    by the EOS id; documents are concatenated per split.  ``val_text()`` is the exact text of the
    val stream: every val document followed by the literal ``"<|endoftext|>"``, so
    ``tokenizer.encode(val_text()).ids == val_tokens`` and ``val_bytes == len(val_text().encode())``
    (the 13 separator bytes per document are counted; they are what the EOS token stands for).

Document index (train stream)
    ``PreparedData.train_doc_offsets[i]`` is the first token of train document i (its tokens, EOS
    last, run to the next offset or the end of the stream) and ``train_doc_sources[i]`` its source
    label (:func:`source_label`): for the stdlib and local folders the first path component of the
    file (``json/decoder.py`` -> ``json``, ``os.py`` -> ``os``), for ``.jsonl``/``.json``/``.parquet``
    rows the file's relative path, for hub rows the dataset name.  Stored per source as ids into
    ``train_source_labels`` (``train_doc_source_ids``).

Groups
    ``split_train_blocks(data, seq_len, groups, kind, alpha, seed)`` returns each group's block
    indices: ``iid`` (seeded round-robin), ``dirichlet`` (each source's blocks cut among the groups
    in Dirichlet(alpha) proportions) or ``by_source`` (whole sources, greedily balanced).  A block
    counts for the document (and source) holding its first target token.  ``ShardedSampler(...,
    indices=group_blocks)`` then samples one group's blocks over that group's data-parallel ranks;
    ``source_tv_distance`` measures how non-IID a split is.

Cache
    ``cache_dir/<cache_key>/`` holds ``tokenizer.json``, ``train.bin``/``val.bin`` (raw
    little-endian uint16, or uint32 when the vocabulary exceeds 65535), ``val.txt``, the train
    document index (``train_docs.npy``: int64 start offsets; ``train_doc_sources.json``: the distinct
    labels and run-length ``[label id, count]`` pairs in document order) and, written last,
    ``done.json``.  Every file is written under a unique temporary name, fsynced and
    ``os.replace``-d into place, so a crash never leaves a file that looks complete, and concurrent
    writers (e.g. several ranks) only race to write identical bytes.  An entry without a valid
    ``done.json`` (or whose files have the wrong size, or whose document index does not match) is
    rebuilt.

    ``cache_key`` = sha256 over: :data:`PIPELINE_VERSION`, the ``tokenizers`` version, the source
    (kind, resolved root, and for local sources every input file's relative path + size + mtime_ns -
    a stat, not a content hash, so keying an 11 MB or a 100 GB corpus costs the same; touching a file
    invalidates), ``text_field``, ``vocab_size``, the sha256 of the tokenizer file if one is given,
    ``val_fraction``, ``max_documents`` and ``seed``.  ``seq_len`` is *not* part of the key: blocks
    are cut at load time, so changing it reuses the cache.  ``num_proc`` does not change the output
    and is not part of the key either.  Hub datasets are keyed by name only (a new upstream revision
    is not detected: delete the entry).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from .files import atomic_write, sha256_file

__all__ = [
    "DataError",
    "DataSpec",
    "EOS_TOKEN",
    "PIPELINE_VERSION",
    "PreparedData",
    "SPLIT_KINDS",
    "ShardedSampler",
    "TokenBlocks",
    "eval_sample",
    "iterate_eval",
    "prepare_data",
    "source_label",
    "source_tv_distance",
    "split_documents",
    "split_train_blocks",
    "train_block_documents",
    "train_block_sources",
]

log = logging.getLogger(__name__)

PIPELINE_VERSION = "data-v2"  # v2: + train document index (train_docs.npy, train_doc_sources.json)
EOS_TOKEN = "<|endoftext|>"
STDLIB = "stdlib"
PLAIN_EXTS = (".txt", ".md", ".py")
ROW_EXTS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ALLOWED_EXTS = PLAIN_EXTS + tuple(ROW_EXTS)
# Directory names skipped anywhere under the stdlib root (plus "config-*" build directories).
STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "__pycache__", "lib-dynload"}
)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_CHUNK_BYTES = 4 << 20  # text per encode_batch call (progress granularity / thread load balance)
_CHUNK_DOCS = 4096
_MANIFEST = "done.json"
_DOC_OFFSETS = "train_docs.npy"
_DOC_SOURCES = "train_doc_sources.json"


class DataError(ValueError):
    """Bad data input: missing/empty path, unreadable tokenizer, missing column, too little data..."""


@dataclass
class DataSpec:
    path: str
    text_field: str = "text"
    tokenizer: str | None = None
    vocab_size: int = 4096
    seq_len: int = 256
    val_fraction: float = 0.05
    max_documents: int | None = None
    num_proc: int = 2
    seed: int = 1234

    def validate(self) -> None:
        if not isinstance(self.path, str | os.PathLike) or not str(self.path).strip():
            raise DataError(f"data path must be a non-empty string, got {self.path!r}")
        if self.tokenizer is None and self.vocab_size < 257:
            raise DataError(
                f"vocab_size={self.vocab_size} is too small: a byte-level BPE needs >= 257 "
                "(256 byte tokens + <|endoftext|>)"
            )
        if self.seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {self.seq_len}")
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_documents is not None and self.max_documents < 2:
            raise DataError(f"max_documents must be None or >= 2 (train and val), got {self.max_documents}")
        if self.num_proc < 1:
            raise DataError(f"num_proc must be >= 1, got {self.num_proc}")
        if not self.text_field:
            raise DataError("text_field must be a non-empty column name")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65535), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


# --------------------------------------------------------------------------------------------------
# Sources and documents
# --------------------------------------------------------------------------------------------------


@dataclass
class _Source:
    kind: str  # "stdlib" | "local" | "hub"
    root: str  # resolved root folder/file, or hub name
    files: list[Path] = field(default_factory=list)  # sorted, absolute

    def rel(self, f: Path) -> str:
        root = Path(self.root)
        return f.name if root.is_file() else f.relative_to(root).as_posix()

    def key_material(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "root": self.root}
        if self.kind == STDLIB:
            out["excluded_dirs"] = sorted(STDLIB_EXCLUDED_DIRS)
        if self.kind != "hub":
            stats = []
            for f in self.files:
                st = f.stat()
                stats.append([self.rel(f), st.st_size, st.st_mtime_ns])
            out["files"] = stats
        return out


def _stdlib_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in STDLIB_EXCLUDED_DIRS and not x.startswith(("config-", "."))]
        files.extend(Path(d, n) for n in names if n.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _folder_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x != "__pycache__"]
        files.extend(
            Path(d, n) for n in names if not n.startswith(".") and Path(n).suffix.lower() in ALLOWED_EXTS
        )
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _looks_like_hub_name(path: str) -> bool:
    return bool(_HUB_NAME.match(path)) and Path(path).suffix.lower() not in ALLOWED_EXTS


def _resolve_source(path: str) -> _Source:
    if path == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"]).resolve()
        files = _stdlib_files(root)
        if not files:
            raise DataError(f"path 'stdlib': no .py files found under {root}")
        return _Source(STDLIB, str(root), files)
    p = Path(path).expanduser()
    if p.exists():
        p = p.resolve()
        if p.is_file():
            if p.suffix.lower() not in ALLOWED_EXTS:
                raise DataError(
                    f"data file {p} has unsupported extension {p.suffix!r}; allowed: {', '.join(ALLOWED_EXTS)}"
                )
            return _Source("local", str(p), [p])
        files = _folder_files(p)
        if not files:
            raise DataError(
                f"data folder {p} contains no data files; allowed extensions: {', '.join(ALLOWED_EXTS)} "
                "(searched recursively, hidden entries skipped)"
            )
        return _Source("local", str(p), files)
    if _looks_like_hub_name(path):
        return _Source("hub", path)
    raise DataError(
        f"data path {path!r} does not exist; expected 'stdlib', a local file/folder of "
        f"{', '.join(ALLOWED_EXTS)} files, or a Hugging Face hub dataset name ('name' or 'org/name')"
    )


def _texts_from_column(ds: Any, text_field: str, where: str) -> Iterator[Any]:
    """Values of one column, streamed chunk by chunk from the Arrow table (no full copy)."""
    if text_field not in ds.column_names:
        raise DataError(f"{where}: text_field {text_field!r} not found; available columns: {ds.column_names}")
    for chunk in ds.data.column(text_field).chunks:
        yield from chunk.to_pylist()


def _check_text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _hf_load(builder: str, data_files: list[str] | None, cache_dir: Path, **kw: Any) -> Any:
    import datasets  # lazy: ~1 s import, only needed for row formats / hub

    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        if data_files is None:
            return datasets.load_dataset(builder, split="train", cache_dir=str(cache_dir), **kw)
        return datasets.load_dataset(
            builder, data_files=data_files, split="train", cache_dir=str(cache_dir), **kw
        )
    finally:
        if not was_disabled:
            datasets.utils.enable_progress_bars()


def source_label(rel: str, row: bool) -> str:
    """The source label of a document from a file at relative path ``rel``.

    Rows of a ``.jsonl``/``.json``/``.parquet`` file (``row=True``): the file's relative path.
    Whole-file documents: the first path component, its extension dropped when the file lies at the
    top level (``json/decoder.py`` -> ``json``, ``os.py`` -> ``os``, ``sub/doc.txt`` -> ``sub``).
    """
    if row:
        return rel
    first, sep, _ = rel.partition("/")
    return first if sep else (Path(first).stem or first)


def _load_documents(
    src: _Source, spec: DataSpec, cache_dir: Path, show_progress: bool
) -> tuple[list[str], list[str], list[str], int]:
    """Return (identities, texts, source labels, skipped_empty) in deterministic load order."""
    limit = spec.max_documents
    ids: list[str] = []
    texts: list[str] = []
    labels: list[str] = []
    skipped = 0
    hf_cache = cache_dir / "hf_datasets"

    def add(ident: str, text: str, label: str) -> bool:
        nonlocal skipped
        if not text:
            skipped += 1
        else:
            ids.append(ident)
            texts.append(text)
            labels.append(label)
        return limit is not None and len(texts) >= limit

    if src.kind == "hub":
        try:
            ds = _hf_load(src.root, None, hf_cache, num_proc=spec.num_proc if spec.num_proc > 1 else None)
        except DataError:
            raise
        except Exception as e:  # network, auth, unknown name... all surface as one clear error
            raise DataError(
                f"data path {src.root!r} does not exist locally and could not be loaded as a Hugging Face "
                f"hub dataset ({type(e).__name__}: {e}); expected 'stdlib', a local file/folder of "
                f"{', '.join(ALLOWED_EXTS)} files, or a hub dataset name"
            ) from e
        for i, v in enumerate(_texts_from_column(ds, spec.text_field, f"hub dataset {src.root!r}")):
            if add(f"#{i}", _check_text(v, f"hub dataset {src.root!r} row {i}"), src.root):
                break
    else:
        bar = tqdm(
            src.files, desc="read documents", unit="file", disable=not show_progress or len(src.files) < 2
        )
        for f in bar:
            rel = src.rel(f)
            ext = f.suffix.lower()
            if ext in PLAIN_EXTS:
                try:
                    text = f.read_bytes().decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"data file {f} is not valid UTF-8 ({e}); plain-text files must be UTF-8"
                    ) from e
                if add(rel, text, source_label(rel, row=False)):
                    break
            else:
                try:
                    ds = _hf_load(ROW_EXTS[ext], [str(f)], hf_cache)
                except Exception as e:
                    raise DataError(
                        f"data file {f} could not be parsed as {ext[1:]} ({type(e).__name__}: {e})"
                    ) from e
                done = False
                label = source_label(rel, row=True)
                for i, v in enumerate(_texts_from_column(ds, spec.text_field, f"data file {f}")):
                    text = _check_text(v, f"data file {f} row {i} field {spec.text_field!r}")
                    if add(f"{rel}#{i}", text, label):
                        done = True
                        break
                if done:
                    break
        bar.close()
    if not texts:
        raise DataError(
            f"data path {spec.path!r} ({src.root}) contains no text: all {skipped} document(s) are empty"
        )
    return ids, texts, labels, skipped


def _hash_unit(seed: int, identity: str) -> float:
    h = hashlib.sha256(f"{seed}\x00{identity}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def split_documents(identities: Sequence[str], val_fraction: float, seed: int) -> list[bool]:
    """Per document: True if it belongs to the validation split.

    Depends only on (seed, identity) of each document, so adding documents does not move others;
    with >= 2 documents both splits are forced non-empty (the one closest to the boundary moves).
    """
    u = [_hash_unit(seed, i) for i in identities]
    is_val = [x < val_fraction for x in u]
    if len(u) >= 2:
        if not any(is_val):
            is_val[min(range(len(u)), key=u.__getitem__)] = True
        elif all(is_val):
            is_val[max(range(len(u)), key=u.__getitem__)] = False
    return is_val


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _check_tokenizer_path(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"tokenizer file {path!r} does not exist (expected a tokenizers tokenizer.json)")
    return p.resolve()


def _load_tokenizer(path: Path) -> Tokenizer:
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise DataError(
            f"tokenizer file {path} could not be parsed as a tokenizers tokenizer.json ({type(e).__name__}: {e})"
        ) from e
    if tok.token_to_id(EOS_TOKEN) is None:
        tok.add_special_tokens([EOS_TOKEN])
    return tok


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) with the full byte alphabet and <|endoftext|> as id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


# --------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------


def _chunks(texts: Sequence[str], sizes: Sequence[int]) -> Iterator[tuple[list[str], int]]:
    batch: list[str] = []
    nbytes = 0
    for t, s in zip(texts, sizes):
        batch.append(t)
        nbytes += s
        if nbytes >= _CHUNK_BYTES or len(batch) >= _CHUNK_DOCS:
            yield batch, nbytes
            batch, nbytes = [], 0
    if batch:
        yield batch, nbytes


def _tokenize_split(
    tok: Tokenizer,
    texts: Sequence[str],
    eos_id: int,
    dtype: np.dtype,
    out_path: Path,
    desc: str,
    show_progress: bool,
    num_proc: int,
    doc_lengths: list[int] | None = None,
) -> int:
    """Tokenise texts (each followed by eos) into a raw token file, atomically. Returns #tokens.

    ``doc_lengths``, when given, receives each document's token count (its EOS included), in order.
    """
    sizes = [len(t.encode("utf-8")) for t in texts]
    le = dtype.newbyteorder("<")

    def write(fh: Any) -> int:
        n = 0
        with tqdm(total=sum(sizes), desc=desc, unit="B", unit_scale=True, disable=not show_progress) as bar:
            for batch, nbytes in _chunks(texts, sizes):
                if num_proc > 1:  # Rust thread pool (all cores, or RAYON_NUM_THREADS)
                    encs = tok.encode_batch(batch, add_special_tokens=False)
                else:
                    encs = [tok.encode(t, add_special_tokens=False) for t in batch]
                ids: list[int] = []
                for e in encs:
                    ids.extend(e.ids)
                    ids.append(eos_id)
                    if doc_lengths is not None:
                        doc_lengths.append(len(e.ids) + 1)
                np.asarray(ids, dtype=le).tofile(fh)
                n += len(ids)
                bar.update(nbytes)
        return n

    return atomic_write(out_path, write)


# --------------------------------------------------------------------------------------------------
# Prepared data
# --------------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    train_tokens: np.ndarray  # 1-D read-only memmap
    val_tokens: np.ndarray
    tokenizer: Tokenizer
    tokenizer_path: Path
    vocab_size: int
    eos_id: int
    val_bytes: int
    val_num_tokens: int
    train_num_tokens: int
    cache_key: str
    cache_path: Path  # cache_dir/<cache_key>
    seq_len: int
    from_cache: bool
    manifest: dict = field(repr=False)
    # Document index of the train stream: document i is train_tokens[offsets[i]:offsets[i+1]]
    # (offsets[n] := train_num_tokens; the last token of each document is the EOS), its source is
    # train_source_labels[train_doc_source_ids[i]].
    train_doc_offsets: np.ndarray = field(repr=False)  # int64 [num_train_documents], ascending, [0] = 0
    train_doc_source_ids: np.ndarray = field(repr=False)  # int32 [num_train_documents]
    train_source_labels: list[str] = field(repr=False)  # distinct labels, in order of first appearance

    @property
    def train_doc_sources(self) -> list[str]:
        """The source label of every train document, in stream order."""
        labels = self.train_source_labels
        return [labels[i] for i in self.train_doc_source_ids.tolist()]

    @property
    def num_train_documents(self) -> int:
        return len(self.train_doc_offsets)

    @property
    def num_train_sequences(self) -> int:
        return max(0, (self.train_num_tokens - 1) // self.seq_len)

    @property
    def num_val_sequences(self) -> int:
        return max(0, (self.val_num_tokens - 1) // self.seq_len)

    def train_blocks(self, seq_len: int | None = None) -> TokenBlocks:
        return TokenBlocks(self.train_tokens, seq_len or self.seq_len, name="train")

    def val_blocks(self, seq_len: int | None = None) -> TokenBlocks:
        return TokenBlocks(self.val_tokens, seq_len or self.seq_len, name="val")

    def val_text(self) -> str:
        """Exact text of the val stream (documents each followed by "<|endoftext|>")."""
        return (self.cache_path / "val.txt").read_bytes().decode("utf-8")



def _spec_key_material(spec: DataSpec, tok_path: Path | None) -> dict[str, Any]:
    return {
        "text_field": spec.text_field,
        "vocab_size": spec.vocab_size,
        "tokenizer_sha256": sha256_file(tok_path) if tok_path else None,
        "val_fraction": spec.val_fraction,
        "max_documents": spec.max_documents,
        "seed": spec.seed,
    }


def compute_cache_key(spec: DataSpec) -> str:
    """The cache key prepare_data would use (stats every input file; reads no documents)."""
    spec.validate()
    tok_path = _check_tokenizer_path(spec.tokenizer) if spec.tokenizer else None
    return _cache_key(_resolve_source(str(spec.path)), spec, tok_path)


def _cache_key(src: _Source, spec: DataSpec, tok_path: Path | None) -> str:
    material = {
        "version": PIPELINE_VERSION,
        "tokenizers": tokenizers.__version__,
        "source": src.key_material(),
        "spec": _spec_key_material(spec, tok_path),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _read_manifest(entry: Path, key: str) -> dict | None:
    """The manifest of a complete cache entry, or None (missing / corrupt / files of wrong size)."""
    try:
        m = json.loads((entry / _MANIFEST).read_text())
        if m.get("version") != PIPELINE_VERSION or m.get("cache_key") != key:
            return None
        itemsize = np.dtype(m["dtype"]).itemsize
        if (entry / "train.bin").stat().st_size != m["train_num_tokens"] * itemsize:
            return None
        if (entry / "val.bin").stat().st_size != m["val_num_tokens"] * itemsize:
            return None
        if (entry / "val.txt").stat().st_size != m["val_bytes"] or not (entry / "tokenizer.json").is_file():
            return None
        _read_doc_index(entry, m)
        return m
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _doc_source_runs(labels: Sequence[str]) -> dict[str, Any]:
    """Per-document labels as {"labels": distinct labels (first-appearance order), "runs": [[id, n]...]}."""
    index: dict[str, int] = {}
    runs: list[list[int]] = []
    for lab in labels:
        i = index.setdefault(lab, len(index))
        if runs and runs[-1][0] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return {"labels": list(index), "runs": runs}


def _read_doc_index(entry: Path, m: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(offsets, source ids, labels) of the train documents; ValueError if inconsistent with ``m``."""
    n_docs, n_tokens = int(m["num_train_documents"]), int(m["train_num_tokens"])
    offsets = np.load(entry / _DOC_OFFSETS, mmap_mode="r", allow_pickle=False)
    if offsets.dtype != np.int64 or offsets.shape != (n_docs,):
        raise ValueError(f"{_DOC_OFFSETS}: {offsets.dtype} {offsets.shape}, expected int64 ({n_docs},)")
    if n_docs and (int(offsets[0]) != 0 or int(offsets[-1]) >= n_tokens):
        raise ValueError(f"{_DOC_OFFSETS}: offsets outside the train stream")
    src = json.loads((entry / _DOC_SOURCES).read_text())
    labels = [str(x) for x in src["labels"]]
    runs = np.asarray(src["runs"], dtype=np.int64).reshape(-1, 2)
    if runs[:, 1].sum() != n_docs or (len(runs) and (runs[:, 0].min() < 0 or runs[:, 0].max() >= len(labels))):
        raise ValueError(f"{_DOC_SOURCES}: runs do not cover {n_docs} documents")
    ids = np.repeat(runs[:, 0], runs[:, 1]).astype(np.int32)
    return offsets, ids, labels


def _build(
    src: _Source,
    spec: DataSpec,
    tok_path: Path | None,
    cache_dir: Path,
    entry: Path,
    key: str,
    show_progress: bool,
) -> dict:
    ids, texts, labels, skipped = _load_documents(src, spec, cache_dir, show_progress)
    if len(texts) < 2:
        raise DataError(
            f"data path {spec.path!r} ({src.root}) has only {len(texts)} non-empty document; need >= 2 for a "
            "document-level train/val split (split the text into several files or use .jsonl rows)"
        )
    is_val = split_documents(ids, spec.val_fraction, spec.seed)
    train_texts = [t for t, v in zip(texts, is_val) if not v]
    val_texts = [t for t, v in zip(texts, is_val) if v]
    train_labels = [lab for lab, v in zip(labels, is_val) if not v]

    if tok_path is not None:
        tok = _load_tokenizer(tok_path)
    else:
        log.info(
            "training byte-level BPE (vocab %d) on %d train documents", spec.vocab_size, len(train_texts)
        )
        tok = train_bpe_tokenizer(train_texts, spec.vocab_size, show_progress=show_progress)
    eos_id = tok.token_to_id(EOS_TOKEN)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)

    entry.mkdir(parents=True, exist_ok=True)
    (entry / _MANIFEST).unlink(missing_ok=True)  # entry is incomplete from here until the manifest lands
    tok_json = tok.to_str()
    atomic_write(entry / "tokenizer.json", lambda fh: fh.write(tok_json), mode="w")
    val_blob = "".join(t + EOS_TOKEN for t in val_texts).encode("utf-8")
    atomic_write(entry / "val.txt", lambda fh: fh.write(val_blob))
    doc_lengths: list[int] = []
    n_train = _tokenize_split(
        tok, train_texts, eos_id, dtype, entry / "train.bin", "tokenise train", show_progress, spec.num_proc,
        doc_lengths=doc_lengths,
    )
    if len(doc_lengths) != len(train_texts) or sum(doc_lengths) != n_train:  # pragma: no cover - invariant
        raise RuntimeError("train document index does not match the train stream")
    offsets = np.zeros(len(doc_lengths), dtype=np.int64)
    np.cumsum(doc_lengths[:-1], out=offsets[1:])
    atomic_write(entry / _DOC_OFFSETS, lambda fh: np.save(fh, offsets, allow_pickle=False))
    runs = _doc_source_runs(train_labels)
    atomic_write(entry / _DOC_SOURCES, lambda fh: json.dump(runs, fh), mode="w")
    n_val = _tokenize_split(
        tok, val_texts, eos_id, dtype, entry / "val.bin", "tokenise val", show_progress, spec.num_proc
    )
    manifest = {
        "version": PIPELINE_VERSION,
        "cache_key": key,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "train_num_tokens": n_train,
        "val_num_tokens": n_val,
        "val_bytes": len(val_blob),
        "num_train_documents": len(train_texts),
        "num_val_documents": len(val_texts),
        "num_train_sources": len(runs["labels"]),
        "skipped_empty_documents": skipped,
        "source": {"kind": src.kind, "root": src.root, "num_files": len(src.files)},
        "spec": {k: v for k, v in asdict(spec).items() if k not in ("seq_len", "num_proc")},
    }
    atomic_write(entry / _MANIFEST, lambda fh: json.dump(manifest, fh, indent=1), mode="w")
    return manifest


def prepare_data(spec: DataSpec, cache_dir: str | Path, show_progress: bool = True) -> PreparedData:
    """Load, split, tokenise and cache the corpus described by ``spec`` (see module docstring)."""
    spec.validate()
    cache_dir = Path(cache_dir).expanduser().resolve()
    tok_path = _check_tokenizer_path(spec.tokenizer) if spec.tokenizer else None
    src = _resolve_source(str(spec.path))
    key = _cache_key(src, spec, tok_path)
    entry = cache_dir / key
    manifest = _read_manifest(entry, key)
    from_cache = manifest is not None
    if manifest is None:
        manifest = _build(src, spec, tok_path, cache_dir, entry, key, show_progress)
    log.info("data cache %s: %s", "hit" if from_cache else "built", entry)

    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    train = np.memmap(entry / "train.bin", dtype=dtype, mode="r", shape=(manifest["train_num_tokens"],))
    val = np.memmap(entry / "val.bin", dtype=dtype, mode="r", shape=(manifest["val_num_tokens"],))
    tok_file = entry / "tokenizer.json"
    doc_offsets, doc_source_ids, source_labels = _read_doc_index(entry, manifest)
    data = PreparedData(
        train_tokens=train,
        val_tokens=val,
        tokenizer=_load_tokenizer(tok_file),
        tokenizer_path=tok_file,
        vocab_size=manifest["vocab_size"],
        eos_id=manifest["eos_id"],
        val_bytes=manifest["val_bytes"],
        val_num_tokens=manifest["val_num_tokens"],
        train_num_tokens=manifest["train_num_tokens"],
        cache_key=key,
        cache_path=entry,
        seq_len=spec.seq_len,
        from_cache=from_cache,
        manifest=manifest,
        train_doc_offsets=doc_offsets,
        train_doc_source_ids=doc_source_ids,
        train_source_labels=source_labels,
    )
    for split, n in (("train", data.train_num_tokens), ("val", data.val_num_tokens)):
        if n < spec.seq_len + 1:
            raise DataError(
                f"{split} split of {spec.path!r} has {n} tokens; one sequence needs seq_len+1 = "
                f"{spec.seq_len + 1} (use a smaller seq_len, more data, or a different val_fraction)"
            )
    return data


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


class TokenBlocks:
    """A token stream viewed as examples: example i = tokens[i*seq_len : i*seq_len + seq_len + 1]."""

    def __init__(self, tokens: np.ndarray | torch.Tensor, seq_len: int, name: str = "tokens"):
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.cpu().numpy()
        tokens = np.asarray(tokens) if not isinstance(tokens, np.memmap) else tokens
        if tokens.ndim != 1:
            raise DataError(f"{name}: token stream must be 1-D, got shape {tuple(tokens.shape)}")
        if seq_len < 1:
            raise DataError(f"{name}: seq_len must be >= 1, got {seq_len}")
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"{name} split has {len(tokens)} tokens; one sequence needs seq_len+1 = {seq_len + 1}"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.name = name
        self._n = (len(tokens) - 1) // seq_len
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)

    def __len__(self) -> int:
        return self._n

    def get(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) LongTensors of shape [len(indices), seq_len]; y is x shifted by one token."""
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._n):
            raise IndexError(f"{self.name}: example index out of range [0, {self._n})")
        rows = np.asarray(self.tokens[idx[:, None] * self.seq_len + self._offsets], dtype=np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get([i])
        return x[0], y[0]


class ShardedSampler:
    """Deterministic, resumable micro-batch indices for one data-parallel rank.

    Each epoch is ``torch.randperm(num_examples)`` from a generator seeded with ``seed + epoch``,
    cut into global batches of ``batch_size_per_rank * dp_world`` (the remainder is dropped);
    rank r takes the r-th contiguous chunk of each global batch.  Hence the concatenation over
    ranks equals the dp_world=1 sampler with the summed batch size, for any layout.  ``position``
    counts examples of the current epoch already consumed globally, so a state saved under one
    layout resumes under another with the same global batch.

    ``indices`` (e.g. one group's blocks from :func:`split_train_blocks`) restricts the sampler to
    a subset of the ``num_examples`` examples: the permutation runs over positions
    ``0..len(indices)-1`` exactly as above and position p yields ``indices[p]``, so every subset
    example is drawn once per epoch and nothing outside it ever is.  ``self.num_examples`` is then
    ``len(indices)`` (the pool drawn from) and the state gains ``indices_sha256``, so a state only
    loads into a sampler over the same subset (in the same order).  With ``indices=None`` the
    behaviour and the state are exactly those of a sampler without the argument.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size_per_rank: int,
        dp_rank: int,
        dp_world: int,
        seed: int = 0,
        indices: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    ):
        if dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise DataError(f"invalid data-parallel layout: dp_rank={dp_rank}, dp_world={dp_world}")
        if batch_size_per_rank < 1:
            raise DataError(f"batch_size_per_rank must be >= 1, got {batch_size_per_rank}")
        self.indices: np.ndarray | None = None
        self.indices_sha256: str | None = None
        if indices is not None:
            self.indices, self.indices_sha256 = _check_subset(indices, int(num_examples))
            num_examples = len(self.indices)
        self.num_examples = int(num_examples)
        self.batch_size = int(batch_size_per_rank)
        self.dp_rank = int(dp_rank)
        self.dp_world = int(dp_world)
        self.seed = int(seed)
        self.global_batch = self.batch_size * self.dp_world
        if self.num_examples < self.global_batch:
            what = "examples" if self.indices is None else "examples in the subset (indices)"
            raise DataError(
                f"{self.num_examples} {what} cannot fill one global batch of {self.global_batch} "
                f"({self.batch_size} per rank x {self.dp_world} ranks)"
            )
        self.epoch = 0
        self.position = 0
        self._perm: torch.Tensor | None = None
        self._perm_epoch = -1

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = torch.randperm(self.num_examples, generator=g)
            self._perm_epoch = self.epoch
        assert self._perm is not None
        return self._perm

    def _maybe_roll(self) -> None:
        if self.position + self.global_batch > self.num_examples:
            self.epoch += 1
            self.position = 0

    def next_indices(self) -> list[int]:
        self._maybe_roll()
        start = self.position + self.dp_rank * self.batch_size
        out = self._permutation()[start : start + self.batch_size].tolist()
        if self.indices is not None:
            out = self.indices[out].tolist()
        self.position += self.global_batch
        self._maybe_roll()
        return out

    def state_dict(self) -> dict:
        state = {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": self.num_examples,
        }
        if self.indices_sha256 is not None:
            state["indices_sha256"] = self.indices_sha256
        return state

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
            seed, num_examples = int(state["seed"]), int(state["num_examples"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"invalid sampler state {state!r}: needs epoch, position, seed, num_examples"
            ) from e
        subset = state.get("indices_sha256")
        if subset != self.indices_sha256:
            def pool(h: str | None) -> str:
                return "all examples" if h is None else f"the subset {str(h)[:12]}"

            raise DataError(
                f"sampler state draws from {pool(subset)} but this sampler from {pool(self.indices_sha256)} "
                "(a different group, data split or number of groups?)"
            )
        if num_examples != self.num_examples:
            raise DataError(
                f"sampler state is for {num_examples} examples but this dataset has {self.num_examples} "
                "(different data, seq_len or cache?)"
            )
        if seed != self.seed:
            raise DataError(f"sampler state has seed {seed} but this sampler has seed {self.seed}")
        if epoch < 0 or not 0 <= position <= num_examples:
            raise DataError(f"invalid sampler state: epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position


# --------------------------------------------------------------------------------------------------
# Dealing the train blocks to groups (replicas, federated clients)
# --------------------------------------------------------------------------------------------------

SPLIT_KINDS = ("iid", "dirichlet", "by_source")
SPLIT_TRIES = 100  # reseeded attempts of a dirichlet split before giving up on an empty group


def _num_blocks(data: PreparedData, seq_len: int) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int | np.integer) or seq_len < 1:
        raise DataError(f"seq_len must be an integer >= 1, got {seq_len!r}")
    n = (int(data.train_num_tokens) - 1) // int(seq_len)
    if n < 1:
        raise DataError(
            f"train split has {data.train_num_tokens} tokens; one sequence needs seq_len+1 = {seq_len + 1}"
        )
    return n


def train_block_documents(data: PreparedData, seq_len: int) -> np.ndarray:
    """For each block i of ``TokenBlocks(data.train_tokens, seq_len)``: the train document holding
    its first TARGET token, ``train_tokens[i * seq_len + 1]`` (a block opening on the last token, the
    EOS, of one document predicts the next document from its first target on, so it counts as the
    next one).  int64 [num_blocks]."""
    n = _num_blocks(data, seq_len)
    first_target = np.arange(n, dtype=np.int64) * int(seq_len) + 1
    return np.searchsorted(np.asarray(data.train_doc_offsets), first_target, side="right") - 1


def train_block_sources(data: PreparedData, seq_len: int) -> np.ndarray:
    """Source id (into ``data.train_source_labels``) of each block, by :func:`train_block_documents`."""
    return np.asarray(data.train_doc_source_ids, dtype=np.int64)[train_block_documents(data, seq_len)]


def source_tv_distance(data: PreparedData, seq_len: int, parts: Sequence[np.ndarray]) -> float:
    """Non-IID-ness of a split: the mean over groups of the total-variation distance between the
    group's histogram of block sources and that of all the train blocks (0: every group has the
    global mix; near 1: groups hold sources the others lack)."""
    src = train_block_sources(data, seq_len)
    k = len(data.train_source_labels)
    glob = np.bincount(src, minlength=k) / len(src)
    tv = []
    for part in parts:
        h = np.bincount(src[np.asarray(part, dtype=np.int64)], minlength=k)
        tv.append(0.5 * np.abs(h / max(1, h.sum()) - glob).sum())
    return float(np.mean(tv))


def _parts_from_owner(owner: np.ndarray, groups: int) -> list[np.ndarray]:
    order = np.argsort(owner, kind="stable")  # ascending block index within each group
    return np.split(order, np.cumsum(np.bincount(owner, minlength=groups))[:-1])


def split_train_blocks(
    data: PreparedData,
    seq_len: int,
    groups: int,
    kind: str = "iid",
    alpha: float = 1.0,
    seed: int = 0,
) -> list[np.ndarray]:
    """Deal the blocks of ``TokenBlocks(data.train_tokens, seq_len)`` to ``groups`` groups.

    Returns one ascending int64 array of block indices per group; every block is in exactly one
    group and no group is empty.  ``n_i = len(parts[i])`` is group i's number of training blocks
    (FedAvg weights ``n_i / sum(n)``).  A block belongs to the document holding its first target
    token (:func:`train_block_documents`), and to that document's source.  The result depends only
    on (the train stream and its document index, seq_len, groups, kind, alpha, seed).

    ``kind``:
        * ``"iid"``: a seeded permutation of all blocks dealt round-robin (sizes differ by <= 1).
        * ``"dirichlet"``: for each source, its blocks (shuffled) are cut among the groups in
          proportions drawn from Dirichlet(alpha, ..., alpha) over groups (Hsu et al. 2019), so each
          group's mix of sources is skewed; alpha = 0.1 gives strongly non-IID groups, large alpha
          approaches IID.  If a group comes out empty the draw is repeated with the next seed
          (``SPLIT_TRIES`` tries, then DataError).
        * ``"by_source"``: whole sources dealt to groups, largest first, each to the group with the
          fewest blocks so far (ties among equal sources broken by a seeded shuffle); the seed also
          permutes which group gets which share.  Needs at least ``groups`` sources with blocks.
    """
    if kind not in SPLIT_KINDS:
        raise DataError(f"data split kind {kind!r} is unknown; use one of {', '.join(SPLIT_KINDS)}")
    if isinstance(groups, bool) or not isinstance(groups, int | np.integer) or groups < 1:
        raise DataError(f"number of groups must be an integer >= 1, got {groups!r}")
    if not (isinstance(alpha, int | float | np.floating) and math.isfinite(alpha) and alpha > 0):
        raise DataError(f"data split alpha must be a finite number > 0, got {alpha!r}")
    groups, seed = int(groups), int(seed)
    n = _num_blocks(data, seq_len)
    if groups > n:
        raise DataError(
            f"cannot deal {n} training blocks (seq_len {seq_len}) to {groups} groups, each needs one; "
            "use fewer groups, a smaller seq_len or more data"
        )
    if kind == "iid":
        perm = np.random.default_rng([seed, 0]).permutation(n)
        return [np.sort(perm[g::groups]) for g in range(groups)]

    src = train_block_sources(data, seq_len)
    num_sources = len(data.train_source_labels)
    per_source = np.bincount(src, minlength=num_sources)
    if kind == "by_source":
        present = np.flatnonzero(per_source)
        if len(present) < groups:
            raise DataError(
                f"by_source split: only {len(present)} source(s) have training blocks (seq_len {seq_len}) "
                f"but {groups} groups need one each; use at most {len(present)} groups, or data.split "
                "dirichlet or iid"
            )
        rng = np.random.default_rng([seed, 0])
        shuffled = rng.permutation(present)
        order = shuffled[np.argsort(-per_source[shuffled], kind="stable")]  # largest first
        load = np.zeros(groups, dtype=np.int64)
        group_of = np.zeros(num_sources, dtype=np.int64)
        for s_id in order:
            g = int(np.argmin(load))
            group_of[s_id] = g
            load[g] += per_source[s_id]
        relabel = rng.permutation(groups)
        return _parts_from_owner(relabel[group_of[src]], groups)

    by_src = np.argsort(src, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(per_source)])
    owner = np.empty(n, dtype=np.int64)
    for attempt in range(SPLIT_TRIES):
        rng = np.random.default_rng([seed, attempt])
        for s_id in np.flatnonzero(per_source):
            blocks = rng.permutation(by_src[bounds[s_id] : bounds[s_id + 1]])
            p = rng.dirichlet(np.full(groups, float(alpha)))
            cuts = np.round(np.cumsum(p)[:-1] * len(blocks)).astype(np.int64)
            owner[blocks] = np.repeat(np.arange(groups), np.diff(np.concatenate([[0], cuts, [len(blocks)]])))
        if np.bincount(owner, minlength=groups).min() > 0:
            return _parts_from_owner(owner, groups)
    raise DataError(
        f"dirichlet split (alpha={alpha}) of {n} training blocks from {int((per_source > 0).sum())} source(s) "
        f"left a group empty in all {SPLIT_TRIES} seeded tries; use fewer groups, a larger alpha, a smaller "
        "seq_len or more data"
    )


def _check_subset(indices: Sequence[int] | np.ndarray | torch.Tensor, n: int) -> tuple[np.ndarray, str]:
    if isinstance(indices, torch.Tensor):
        indices = indices.cpu().numpy()
    idx = np.asarray(indices)
    if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
        raise DataError(f"sampler indices must be a 1-D array of integers, got {idx.dtype} {tuple(idx.shape)}")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise DataError(f"sampler indices must lie in [0, {n}) (num_examples), got [{idx.min()}, {idx.max()}]")
    if len(np.unique(idx)) != len(idx):
        raise DataError(f"sampler indices must be distinct; {len(idx) - len(np.unique(idx))} repeat")
    return idx, hashlib.sha256(idx.astype("<i8").tobytes()).hexdigest()


def eval_sample(num_blocks: int, batch_size: int, max_batches: int | None = None) -> np.ndarray:
    """The blocks an evaluation reads, in order: every block when `max_batches` is None or covers
    the split; otherwise `max_batches * batch_size` blocks spread evenly over it (block
    floor(j * n / m) for j < m), so the sample represents the whole split (every region, not just
    its first documents) and is the same at every call."""
    if batch_size < 1:
        raise DataError(f"eval batch_size must be >= 1, got {batch_size}")
    if max_batches is None or max_batches * batch_size >= num_blocks:
        return np.arange(num_blocks, dtype=np.int64)
    m = max_batches * batch_size
    return np.arange(m, dtype=np.int64) * num_blocks // m


def iterate_eval(
    blocks: TokenBlocks, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches over `eval_sample(len(blocks), batch_size, max_batches)`: the whole split in
    order, or at most `max_batches` batches of a fixed, evenly spread sample; the last batch may
    be smaller."""
    idx = eval_sample(len(blocks), batch_size, max_batches)
    for start in range(0, len(idx), batch_size):
        yield blocks.get(idx[start:start + batch_size])
