"""De novo molecule generation data: NCI (shipped with RDKit), MOSES, or your own SMILES file.

Rows are ``[target tokens][EOS][PAD...]`` with an empty prompt, so generation starts from an empty sequence;
the targets are SMILES, SAFE or bracket-SAFE strings split by :class:`~insertion_diffusion.chem.tokenizer.
RegexTokenizer`. The vocabulary comes from the training split only.

The corpus is cleaned once (canonicalised with RDKit, encoded, tokenised, de-duplicated, long molecules dropped;
every dropped line counted by reason, see :mod:`insertion_diffusion.data.corpus`) and cached under
``cache_dir/<source>-<representation>-<hash>/``: ``{train,val,test}.tsv`` (text, canonical SMILES, source line),
``{split}.ids.npy`` / ``{split}.len.npy`` (token ids, lengths) and ``manifest.json`` (settings, source identity,
drop counts, vocabulary, versions, sha256 of every file). The tokenizer and ``max_length`` must exist when the
CLI instantiates the model, so ``__init__`` loads the cache, building it first when it is missing, stale or
corrupt (with a warning); ``prepare_data`` / ``setup`` only read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import MetricCollection

from insertion_diffusion.chem.convert import REPRESENTATIONS, SAFE_INSTALL, SMILES_FORMS
from insertion_diffusion.chem.tokenizer import RegexTokenizer
from insertion_diffusion.data.base import SequenceDataModule, TensorDictDataset, encode_rows
from insertion_diffusion.data.corpus import (
    Corpus,
    atomic_write,
    clean_molecules,
    corpus_format,
    default_num_proc,
    file_sha256,
    read_corpus,
    summarise,
    zero_counts,
)

__all__ = ["MOSES_FILES", "MoleculeDataModule", "MoleculeRows", "SOURCES", "nci_path"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump when cleaning or the cache layout changes: caches written by another version are rebuilt."""

SOURCES: tuple[str, ...] = ("nci", "moses", "path")
SPLITS: tuple[str, ...] = ("train", "val", "test")

MOSES_WHEEL = "molsets==0.3.1"
MOSES_FILES: dict[str, dict[str, Any]] = {
    # the MOSES splits as shipped inside the molsets 0.3.1 wheel (moses/dataset/data/<split>.csv.gz); sha256 pins
    # the gzip member, smiles_sha256 the SMILES column (smiles_column_digest) that the public CSV must match too
    "train": {
        "member": "moses/dataset/data/train.csv.gz",
        "sha256": "786f0313aa6b9ba5514df685f885742a70ea8d86f1a4fa48115f7f80a634265c",
        "rows": 1_584_663,
        "smiles_sha256": "7eaef3b172d05cfc7ecd898c3e991835605b438574df1334f1ddb1c8fc82ffb7",
        "url": "https://media.githubusercontent.com/media/molecularsets/moses/master/data/train.csv",
    },
    "test": {
        "member": "moses/dataset/data/test.csv.gz",
        "sha256": "f896fbf3764f88d94670b9959e5872c600c12152a18233823e820761b7a791b2",
        "rows": 176_074,
        "smiles_sha256": "4c40fe6efc63cbe59e94b30d9ca39e77d92a95f449cf13c7f180df21d0b82dac",
        "url": "https://media.githubusercontent.com/media/molecularsets/moses/master/data/test.csv",
    },
}
_SHA_LIMIT = 512 << 20  # user files larger than this are identified by size + mtime instead of sha256


def nci_path() -> Path:
    """``RDConfig.RDDataDir/NCI/first_5K.smi``: 5,000 NCI SMILES (tab-separated with an id) shipped with RDKit."""
    from rdkit import RDConfig

    return Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"


class _StaleCache(Exception):
    """The cache directory exists but cannot be trusted; the message says why."""


def _versions(representation: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import rdkit

    out = {"rdkit": rdkit.__version__, "format_version": str(FORMAT_VERSION)}
    if representation not in SMILES_FORMS:
        for pkg in ("safe-mol", "datamol"):
            try:
                out[pkg] = version(pkg)
            except PackageNotFoundError:
                out[pkg] = "missing"
    return out


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """An exclusive lock on ``root/.lock`` (POSIX), so concurrent processes (DDP ranks) build a cache once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locking, atomic writes still protect readers
        yield
        return
    with open(root / ".lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _round_up(n: int, multiple: int = 8) -> int:
    return -(-n // multiple) * multiple


class MoleculeRows(TensorDictDataset):
    """Rows ``[target][EOS][PAD...]`` stored compactly: small-int ids ``(N, L)`` plus target lengths ``(N,)``.

    Item ``i`` is exactly what :func:`~insertion_diffusion.data.base.encode_rows` with empty prompts and
    ``bos=False`` gives, plus the row index: ``input_ids`` (long), ``fixed`` (EOS only), ``attention_mask``
    (target and EOS), and ``has_reference = False`` (``predict`` records carry no reference). Storing int16 ids and recomputing the two masks per item keeps 1.6M MOSES rows at
    ~200 MB instead of ~1 GB.
    """

    def __init__(self, ids: Tensor, lengths: Tensor) -> None:
        super().__init__({"input_ids": ids, "lengths": lengths})
        self._positions = torch.arange(ids.shape[1])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        n = self.tensors["lengths"][index]
        return {
            "input_ids": self.tensors["input_ids"][index].long(),
            "fixed": self._positions == n,
            "attention_mask": self._positions <= n,
            "index": torch.tensor(index, dtype=torch.long),
            # generation is unconditional: a row's molecule is not a reference for what is generated from it
            "has_reference": torch.tensor(False),
        }


def layout_rows(flat: np.ndarray, lengths: np.ndarray, width: int, pad_id: int, eos_id: int) -> np.ndarray:
    """Flat target ids + lengths -> ``(N, width)`` ids ``[target][EOS][PAD...]`` in the smallest int type.

    The same layout as ``encode_rows(prompts=[[]] * n, targets, tokenizer, width, bos=False)["input_ids"]``
    (a test checks it), without building per-row Python lists (1.6M MOSES rows).
    """
    n = len(lengths)
    dtype = np.int16 if max(pad_id, eos_id, int(flat.max(initial=0))) < np.iinfo(np.int16).max else np.int32
    ids = np.full((n, width), pad_id, dtype=dtype)
    # a boolean mask assigns in row-major order, which is the order of ``flat``: no (row, col) index arrays
    ids[np.arange(width)[None, :] < lengths[:, None]] = flat
    ids[np.arange(n), lengths] = eos_id
    return ids


class MoleculeDataModule(SequenceDataModule):
    """Unconditional molecule generation from NCI, MOSES or a SMILES file, as SMILES / SAFE / bracket-SAFE.

    Args:
        source: ``nci`` (RDKit's ``NCI/first_5K.smi``, 5,000 molecules, no download), ``moses`` (the MOSES
            train / test splits, from the ``molsets==0.3.1`` wheel via ``pip download``, else MOSES' public
            CSV files) or ``path`` (your file, ``data.path``).
        path: for ``source: path``: a ``.smi`` / ``.txt`` (SMILES first on each line, then anything), ``.csv`` or
            ``.tsv`` file, optionally gzipped (``.gz``).
        column: SMILES column of a ``path`` table: a header name, a 0-based index, or None (a column named
            like ``SMILES`` in a header, else the first column).
        representation: ``smiles``, ``kekule_smiles``, ``safe`` or ``bracket_safe`` (SAFE forms need
            ``safe-mol``).
        max_length: fixed row width (target + EOS); None: the longest kept molecule + 1 rounded up to a
            multiple of 8 (so at most ``max_tokens + 1`` rounded up). Molecules longer than ``max_length - 1`` tokens are dropped.
        max_tokens: molecules with more tokens are dropped (counted as ``too_long``).
        train_size: training molecules: a random subset of this size (None: all that remain).
        val_size: validation molecules (also the number generated per validation run).
        test_size: test molecules (also the number generated per test / predict run).
        cache_dir: where cleaned splits are cached (created if missing).
        num_proc: processes for canonicalisation (None: min(2, CPUs)); does not change the result.
        batch_size: rows per training batch.
        eval_batch_size: rows per validation / test / predict batch (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        seed: seeds the random splits and subsets, and the training shuffle.
        fcd_reference: FCD in the ``test`` metrics against this reference: ``"test"`` (the test split's
            molecules: for ``moses``, a random MOSES-test sample of ``test_size``), a SMILES file path, or None
            (no FCD; ChemNet costs ~4 s per 1,000 molecules). Report FCD with its sample size (``test/fcd_n``).
    """

    def __init__(
        self,
        source: str = "nci",
        path: str | None = None,
        column: int | str | None = None,
        representation: str = "smiles",
        max_length: int | None = None,
        max_tokens: int = 128,
        train_size: int | None = None,
        val_size: int = 1000,
        test_size: int = 1000,
        cache_dir: str = "data_cache/molecules",
        num_proc: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        fcd_reference: str | None = None,
    ) -> None:
        if fcd_reference is not None and fcd_reference != "test" and not Path(fcd_reference).expanduser().is_file():
            raise ValueError(
                f"data.fcd_reference={fcd_reference!r} is neither 'test' nor an existing SMILES file; use 'test', "
                "a path, or null"
            )
        self.fcd_reference = fcd_reference
        self._validate(source, path, column, representation, max_length, max_tokens, train_size, val_size,
                       test_size, num_proc)
        self.source = source
        self.path = str(Path(path).expanduser().resolve()) if path is not None else None
        self.column = column
        self.representation = representation
        self.max_tokens = int(max_tokens)
        self.token_limit = int(max_tokens) if max_length is None else min(int(max_tokens), int(max_length) - 1)
        self.requested_max_length = None if max_length is None else int(max_length)
        self.sizes = {
            "train": None if train_size is None else int(train_size),
            "val": int(val_size),
            "test": int(test_size),
        }
        self.cache_root_dir = str(cache_dir)
        self.num_proc = default_num_proc() if num_proc is None else int(num_proc)
        self.split_seed = int(seed)
        self._fresh: dict[str, dict[str, Any]] | None = None
        self._train_canonical: frozenset[str] | None = None

        self.manifest = self._load_or_build()
        tokenizer = RegexTokenizer(self.manifest["vocab"])
        super().__init__(
            tokenizer=tokenizer,
            max_length=int(self.manifest["max_length"]),
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        self.save_hyperparameters()
        # Record the resolved length: the model's linked ``max_length`` hparam must agree with it.
        self.hparams["max_length"] = self.max_length
        self.drop_counts: dict[str, int] = dict(self.manifest["counts"])
        self.split_sizes: dict[str, int] = dict(self.manifest["sizes"])
        # Lightning logs the DataModule's hparams with the run (hparams.yaml, TensorBoard's HPARAMS tab), so the
        # cleaning record stays beside the curves it explains, not only in the console and the cache manifest.
        self.hparams["drop_counts"] = dict(self.drop_counts)
        self.hparams["split_sizes"] = dict(self.split_sizes)
        # Lightning logs ``hparams_initial`` (a snapshot taken by save_hyperparameters): snapshot the resolved values
        self.save_hyperparameters(dict(self.hparams))
        self.train_lengths: Tensor = torch.from_numpy(
            self._read_split_arrays("train")[1].astype(np.int64)
        )

    # --- argument checks ---------------------------------------------------------------------------
    @staticmethod
    def _validate(source, path, column, representation, max_length, max_tokens, train_size, val_size, test_size,
                  num_proc) -> None:
        if source not in SOURCES:
            raise ValueError(f"unknown molecule source {source!r}; set data.source to one of {list(SOURCES)}")
        if representation not in REPRESENTATIONS:
            raise ValueError(
                f"unknown molecule representation {representation!r}; set data.representation to one of "
                f"{list(REPRESENTATIONS)}"
            )
        if source == "path":
            if path is None:
                raise ValueError("data.source is 'path' but data.path is not set; give the SMILES file's path")
            corpus_format(path)
            if not Path(path).expanduser().is_file():
                raise FileNotFoundError(
                    f"data.path {path!r} does not exist or is not a file; give an existing .smi/.txt/.csv/.tsv file"
                )
        elif path is not None or column is not None:
            key = "data.path" if path is not None else "data.column"
            raise ValueError(f"{key} is only used with data.source: path (data.source is {source!r}); remove it")
        if isinstance(column, bool) or (isinstance(column, int) and column < 0):
            raise ValueError(f"data.column must be a column name or an index >= 0, got {column!r}")
        if isinstance(column, str) and not column.strip():
            raise ValueError("data.column is an empty string; give a column name, an index >= 0, or null")
        for key, value, low in (
            ("max_tokens", max_tokens, 1),
            ("val_size", val_size, 0),
            ("test_size", test_size, 0),
        ):
            if int(value) < low:
                raise ValueError(f"data.{key} must be >= {low}, got {value}")
        for key, value, low in (("train_size", train_size, 1), ("max_length", max_length, 2),
                                ("num_proc", num_proc, 1)):
            if value is not None and int(value) < low:
                raise ValueError(f"data.{key} must be >= {low} or null, got {value}")
        if representation not in SMILES_FORMS:
            from insertion_diffusion.chem.convert import _safe

            try:
                _safe()
            except ImportError as err:
                raise ValueError(
                    f"data.representation={representation!r} needs safe-mol, which is not importable "
                    f"({err.__cause__ or err}); install it with: {SAFE_INSTALL}, or use data.representation: smiles"
                ) from None

    # --- settings and source identity --------------------------------------------------------------
    @property
    def settings(self) -> dict[str, Any]:
        """Everything the cleaned splits depend on, except the source file's content and library versions."""
        return {
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "path": self.path,
            "column": self.column,
            "representation": self.representation,
            "token_limit": self.token_limit,
            "max_length": self.requested_max_length,
            "train_size": self.sizes["train"],
            "val_size": self.sizes["val"],
            "test_size": self.sizes["test"],
            "seed": self.split_seed,
        }

    @property
    def cache_dir(self) -> Path:
        digest = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:12]
        return Path(self.cache_root_dir) / f"{self.source}-{self.representation}-{digest}"

    def _source_identity(self) -> dict[str, Any]:
        if self.source == "moses":
            return {split: {"sha256": spec["sha256"]} for split, spec in MOSES_FILES.items()}
        path = nci_path() if self.source == "nci" else Path(self.path)
        if not path.is_file():
            raise FileNotFoundError(
                f"the NCI corpus {str(path)!r} is missing from this RDKit install; reinstall rdkit or use "
                "data.source: path"
            )
        stat = path.stat()
        if stat.st_size <= _SHA_LIMIT:
            return {"file": str(path), "sha256": file_sha256(path)}
        return {"file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    # --- cache -------------------------------------------------------------------------------------
    def _unwritable(self, path: Path, err: OSError) -> ValueError:
        return ValueError(
            f"cannot write the molecule cache at {str(path)!r} ({type(err).__name__}: {err.strerror or err}); "
            "choose a writable data.cache_dir"
        )

    def _load_or_build(self) -> dict[str, Any]:
        root = self.cache_dir
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise self._unwritable(root, err) from err
        identity = self._source_identity()
        with _build_lock(root):
            if (root / "manifest.json").exists():
                try:
                    manifest = self._verified_manifest(identity)
                    rank_zero_info(
                        f"MoleculeDataModule: loaded {self.source}/{self.representation} from {root} "
                        f"(train {manifest['sizes']['train']}, val {manifest['sizes']['val']}, "
                        f"test {manifest['sizes']['test']})"
                    )
                    return manifest
                except _StaleCache as why:
                    rank_zero_warn(f"MoleculeDataModule: rebuilding the cache in {root}: {why}")
            return self._build(identity)

    def _verified_manifest(self, identity: dict[str, Any]) -> dict[str, Any]:
        root = self.cache_dir
        try:
            manifest = json.loads((root / "manifest.json").read_text())
            version, settings, files = manifest["format_version"], manifest["settings"], manifest["files"]
            source, versions = manifest["source"], manifest["versions"]
            for key in ("vocab", "max_length", "counts", "sizes"):
                manifest[key]  # KeyError if absent
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise _StaleCache(f"manifest.json is unreadable ({type(err).__name__}: {err})") from None
        if version != FORMAT_VERSION:
            raise _StaleCache(f"format version {version!r} differs from the current {FORMAT_VERSION}")
        if settings != self.settings:
            keys = sorted(k for k in set(settings) | set(self.settings) if settings.get(k) != self.settings.get(k))
            raise _StaleCache(f"settings differ from the requested ones ({', '.join(keys)})")
        if source != identity:
            raise _StaleCache("the source file changed since the cache was built")
        current = _versions(self.representation)
        if versions != current:
            keys = sorted(k for k in set(versions) | set(current) if versions.get(k) != current.get(k))
            raise _StaleCache(f"library versions changed ({', '.join(keys)})")
        for name, entry in files.items():
            try:
                data = (root / name).read_bytes()
            except OSError as err:
                raise _StaleCache(f"{name} is missing ({type(err).__name__})") from None
            if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                raise _StaleCache(f"{name} does not match its sha256 in manifest.json (edited or truncated)")
        expected = {f"{s}.{kind}" for s in SPLITS for kind in ("tsv", "ids.npy", "len.npy")}
        if set(files) != expected:
            raise _StaleCache("manifest.json does not list the expected files")
        return manifest

    def _read_file(self, name: str) -> bytes:
        data = (self.cache_dir / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.manifest["files"][name]["sha256"]:
            raise _StaleCache(f"{name} changed after it was verified")
        return data

    def _read_split_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(flat ids, lengths)`` of a split, from this process's fresh build or the verified cache."""
        if self._fresh is not None and split in self._fresh:
            return self._fresh[split]["flat"], self._fresh[split]["lengths"]
        try:
            flat = np.load(io.BytesIO(self._read_file(f"{split}.ids.npy")), allow_pickle=False)
            lengths = np.load(io.BytesIO(self._read_file(f"{split}.len.npy")), allow_pickle=False)
        except (OSError, ValueError, _StaleCache) as why:
            raise ValueError(
                f"the molecule cache {str(self.cache_dir)!r} changed or broke while in use ({why}); delete that "
                "directory and run again"
            ) from None
        return flat, lengths

    # --- building ----------------------------------------------------------------------------------
    def _corpora(self) -> list[tuple[Corpus, list[str]]]:
        """``(corpus, the splits it feeds in order)``; splits are filled test -> val -> train."""
        if self.source == "moses":
            files = _moses_files(Path(self.cache_root_dir) / "moses")
            return [
                (read_corpus(str(files["test"]), "SMILES"), ["test"]),
                (read_corpus(str(files["train"]), "SMILES"), ["val", "train"]),
            ]
        if self.source == "nci":
            return [(read_corpus(str(nci_path()), 0), ["test", "val", "train"])]
        return [(read_corpus(self.path, self.column), ["test", "val", "train"])]

    def _build(self, identity: dict[str, Any]) -> dict[str, Any]:
        rank_zero_info(
            f"MoleculeDataModule: cleaning {self.source} as {self.representation} into {self.cache_dir} "
            f"({self.num_proc} process{'es' if self.num_proc > 1 else ''})"
        )
        counts = zero_counts()
        seen: set[str] = set()
        records: dict[str, list[tuple[str, str, list[str], str]]] = {s: [] for s in SPLITS}
        examined: dict[str, int] = {}
        lines_read: dict[str, int] = {}
        for pool_index, (corpus, splits) in enumerate(self._corpora()):
            tag = Path(corpus.path).name
            lines_read[tag] = corpus.total_lines
            for key, value in corpus.counts.items():
                counts[key] += value
            wants = [self.sizes[s] for s in splits]
            needed = None if any(w is None for w in wants) else sum(wants)
            kept, used = self._clean_pool(corpus, tag, needed, pool_index, counts, seen)
            examined[tag] = used
            start = 0
            for split, want in zip(splits, wants):
                take = kept[start:] if want is None else kept[start : start + want]
                records[split] = take
                start += len(take)
                if want is not None and len(take) < want and split == "train":
                    rank_zero_warn(
                        f"MoleculeDataModule: data.train_size={want} but only {len(take)} training molecules "
                        f"remain after cleaning; using {len(take)}"
                    )
            eval_want = sum(self.sizes[s] for s in splits if s != "train")
            if not kept:
                raise ValueError(
                    f"{corpus.path}: no molecule remains after cleaning ({corpus.total_lines} lines; dropped: "
                    f"{summarise(counts)}); check that it holds SMILES (one per line, or a table with data.column "
                    "naming the SMILES column), or raise data.max_tokens if everything was too_long"
                )
            if len(kept) < eval_want + ("train" in splits):
                raise ValueError(
                    f"{corpus.path}: only {len(kept)} molecules remain after cleaning ({corpus.total_lines} lines; "
                    f"dropped: {summarise(counts)}), but data.val_size + data.test_size = {eval_want} of them are "
                    "held out and training needs at least 1; use a larger corpus or lower data.val_size / "
                    "data.test_size"
                )
        if not records["train"]:
            raise ValueError(
                f"no training molecule remains after cleaning {self.source} (dropped: {summarise(counts)}); check "
                "the file and data.column, or raise data.max_tokens"
            )
        tokenizer = RegexTokenizer.from_corpus(r[2] for r in records["train"])
        vocab = set(tokenizer.tokens)
        unknown_first = None
        for split in ("val", "test"):
            keep = []
            for rec in records[split]:
                missing = sorted(set(rec[2]) - vocab)
                if missing:
                    counts["unknown_token"] += 1
                    if unknown_first is None:
                        unknown_first = {"split": split, "line": rec[3], "tokens": missing}
                    continue
                keep.append(rec)
            records[split] = keep
        if unknown_first is not None:
            rank_zero_warn(
                f"MoleculeDataModule: dropped {counts['unknown_token']} validation/test molecules whose tokens are "
                f"not in the training vocabulary (first: {unknown_first['split']} molecule from "
                f"{unknown_first['line']}, tokens {unknown_first['tokens']})"
            )
        longest = max(len(r[2]) for split in SPLITS for r in records[split])
        if self.requested_max_length is not None:
            max_length = self.requested_max_length
        else:
            # never above max_tokens + 1 rounded up: longer molecules were dropped
            max_length = max(2, _round_up(longest + 1))
        sizes = {s: len(records[s]) for s in SPLITS}
        message = (
            f"MoleculeDataModule: {self.source} as {self.representation}: train {sizes['train']}, val "
            f"{sizes['val']}, test {sizes['test']}; dropped {sum(counts.values())} lines ({summarise(counts)}); "
            f"vocabulary {len(tokenizer.tokens)} tokens, max_length {max_length}"
        )
        rank_zero_info(message)
        log.info(message)

        stoi = tokenizer.stoi
        fresh: dict[str, dict[str, Any]] = {}
        blobs: dict[str, bytes] = {}
        for split in SPLITS:
            recs = records[split]
            lengths = np.fromiter((len(r[2]) for r in recs), dtype=np.int32, count=len(recs))
            flat = np.fromiter(
                (stoi[t] for r in recs for t in r[2]), dtype=np.int16 if len(stoi) < 32767 else np.int32,
                count=int(lengths.sum()),
            )
            fresh[split] = {"flat": flat, "lengths": lengths}
            blobs[f"{split}.tsv"] = "".join(f"{r[1]}\t{r[0]}\t{r[3]}\n" for r in recs).encode()
            blobs[f"{split}.ids.npy"] = _npy_bytes(flat)
            blobs[f"{split}.len.npy"] = _npy_bytes(lengths)
        manifest = {
            "format_version": FORMAT_VERSION,
            "settings": self.settings,
            "source": identity,
            "versions": _versions(self.representation),
            "counts": counts,
            "sizes": sizes,
            "lines_read": lines_read,
            "lines_examined": examined,
            "unknown_token_first": unknown_first,
            "vocab": tokenizer.tokens,
            "max_length": max_length,
            "longest_tokens": longest,
            "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                      for name, data in blobs.items()},
        }
        root = self.cache_dir
        try:
            # the manifest goes first and comes back last, so a crash mid-build never leaves a "valid" cache
            (root / "manifest.json").unlink(missing_ok=True)
            for name, data in blobs.items():
                atomic_write(root / name, data)
            atomic_write(root / "manifest.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        except OSError as err:
            raise self._unwritable(root, err) from err
        self._fresh = fresh
        self._train_canonical = frozenset(r[0] for r in records["train"])
        return manifest

    def _clean_pool(
        self, corpus: Corpus, tag: str, needed: int | None, pool_index: int, counts: dict[str, int], seen: set[str]
    ) -> tuple[list[tuple[str, str, list[str], str]], int]:
        """Clean the corpus's molecules in a seeded random order until ``needed`` are kept (None: all).

        Returns the kept ``(canonical, text, tokens, "tag:line")`` records in that order and how many entries
        were examined; drop counts cover exactly the examined entries.
        """
        order = np.random.default_rng([self.split_seed, pool_index]).permutation(len(corpus.smiles))
        kept: list[tuple[str, str, list[str], str]] = []
        pos = 0
        while pos < len(order) and (needed is None or len(kept) < needed):
            block = len(order) - pos if needed is None else max(1024, int(1.1 * (needed - len(kept))) + 64)
            idx = order[pos : pos + block]
            results = clean_molecules(
                [corpus.smiles[i] for i in idx], self.representation, self.token_limit, self.num_proc,
                # SAFE costs ~7 ms a molecule (encode + verify) against ~0.3 ms for SMILES: a pool pays sooner
                min_parallel=20_000 if self.representation in SMILES_FORMS else 1_000,
            )
            for i, res in zip(idx.tolist(), results):
                pos += 1
                if isinstance(res, str):
                    counts[res] += 1
                    continue
                canon, text, tokens = res
                if canon in seen:
                    counts["duplicate"] += 1
                    continue
                seen.add(canon)
                kept.append((canon, text, tokens, f"{tag}:{corpus.lines[i]}"))
                if needed is not None and len(kept) >= needed:
                    break
        return kept, pos

    # --- attributes --------------------------------------------------------------------------------
    @property
    def train_canonical(self) -> frozenset[str]:
        """Canonical SMILES of the training split (for novelty), loaded from the cache on first use."""
        if self._train_canonical is None:
            try:
                text = self._read_file("train.tsv").decode()
            except (OSError, _StaleCache) as why:
                raise ValueError(
                    f"the molecule cache {str(self.cache_dir)!r} changed or broke while in use ({why}); delete "
                    "that directory and run again"
                ) from None
            self._train_canonical = frozenset(line.split("\t")[1] for line in text.splitlines())
        return self._train_canonical

    def split_texts(self, split: str) -> list[str]:
        """The representation strings of a split, in row order (human-readable view of the cache)."""
        text = self._read_file(f"{split}.tsv").decode()
        return [line.split("\t")[0] for line in text.splitlines()]

    # --- Lightning hooks ---------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Nothing to do: ``__init__`` already built or verified the cache (the CLI needs the vocabulary)."""

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage or "", SPLITS):
            if split in self.datasets:
                continue
            flat, lengths = self._read_split_arrays(split)
            ids = layout_rows(flat, lengths, self.max_length, self.tokenizer.pad_id, self.tokenizer.eos_id)
            self.datasets[split] = MoleculeRows(torch.from_numpy(ids), torch.from_numpy(lengths.astype(np.int64)))
        if self._fresh is not None and all(s in self.datasets for s in SPLITS):
            self._fresh = None

    def encode_texts(self, texts: list[str]) -> dict[str, Tensor]:
        """Representation strings -> ``encode_rows`` tensors (empty prompts, no BOS)."""
        targets = [self.tokenizer.encode(t) for t in texts]
        return encode_rows([[] for _ in targets], targets, self.tokenizer, self.max_length, bos=False)

    def make_metrics(self, prefix: str = "") -> MetricCollection:
        """Molecule metrics (validity, uniqueness, novelty, ...) from :mod:`insertion_diffusion.metrics.molecules`."""
        from insertion_diffusion.metrics.molecules import molecule_metrics

        reference = None
        if self.fcd_reference is not None and prefix.startswith("test"):
            reference = self.fcd_reference
            if reference == "test":
                reference = [s for s in map(self._reference_smiles, self.split_texts("test")) if s]
        return molecule_metrics(
            prefix=prefix,
            tokenizer=self.tokenizer,
            representation=self.representation,
            train_canonical=self.train_canonical,
            fcd_reference=reference,
        )

    def _reference_smiles(self, text: str) -> str | None:
        from insertion_diffusion.chem.convert import decode_to_smiles

        return decode_to_smiles(text, self.representation, "strict")


# --- MOSES files -----------------------------------------------------------------------------------------
def _moses_files(directory: Path) -> dict[str, Path]:
    """``{"train": path, "test": path}``: the verified MOSES files, fetched into ``directory`` if needed.

    Route 1: ``pip download --no-deps molsets==0.3.1`` and extract ``moses/dataset/data/{train,test}.csv.gz``
    (sha256-pinned). Route 2 (no pip access to the wheel): MOSES' public CSV files (:data:`MOSES_FILES` urls),
    checked by row count and by the sha256 of their SMILES column (:func:`smiles_column_digest`), pinned from
    the wheel's files, so line endings or extra columns in the public copy do not matter but its molecules do.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create {str(directory)!r} for the MOSES files ({err}); set data.cache_dir") from err
    out = {split: directory / Path(spec["member"]).name for split, spec in MOSES_FILES.items()}
    if all(p.is_file() and file_sha256(p) == MOSES_FILES[s]["sha256"] for s, p in out.items()):
        return out
    wheel_error = _moses_from_wheel(directory, out)
    if wheel_error is None:
        return out
    url_error, csvs = _moses_from_urls(directory)
    if url_error is None:
        return csvs
    raise ValueError(
        f"cannot obtain the MOSES data set: the {MOSES_WHEEL} wheel route failed ({wheel_error}) and the public "
        f"CSV route failed ({url_error}); put train.csv.gz and test.csv.gz from the molsets wheel in "
        f"{str(directory)!r}, or use data.source: path with your own copy"
    )


def _moses_from_wheel(directory: Path, out: dict[str, Path]) -> str | None:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", MOSES_WHEEL, "-d", tmp]
        rank_zero_info(f"MoleculeDataModule: fetching MOSES: {' '.join(cmd[2:])}")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"pip download: {err}"
        wheels = list(Path(tmp).glob("molsets-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
            return f"pip download exited {proc.returncode}: {tail[0]}"
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                for split, spec in MOSES_FILES.items():
                    data = zf.read(spec["member"])
                    if hashlib.sha256(data).hexdigest() != spec["sha256"]:
                        return f"{spec['member']} in the wheel does not match its pinned sha256"
                    atomic_write(out[split], data)
        except (OSError, KeyError, zipfile.BadZipFile) as err:
            return f"reading the wheel: {err}"
    return None


def smiles_column_digest(data: bytes) -> tuple[int, str]:
    """``(rows, sha256)`` of a CSV's first column, header and blank lines dropped, values joined by ``\\n``.

    The public MOSES CSVs and the wheel's copies may differ in line endings or extra columns (``SPLIT``); this
    digest depends only on the molecules and their order.
    """
    values = [line.rstrip(b"\r").split(b",", 1)[0] for line in data.split(b"\n") if line.strip()]
    values = values[1:]  # the header
    return len(values), hashlib.sha256(b"\n".join(values)).hexdigest()


def _moses_from_urls(directory: Path) -> tuple[str | None, dict[str, Path]]:
    import urllib.request

    out = {}
    for split, spec in MOSES_FILES.items():
        target = directory / f"{split}.csv"
        try:
            if not target.is_file():
                with urllib.request.urlopen(spec["url"], timeout=60) as resp:
                    atomic_write(target, resp.read())
            rows, digest = smiles_column_digest(target.read_bytes())
        except OSError as err:
            return f"{spec['url']}: {err}", {}
        if rows != spec["rows"]:
            target.unlink(missing_ok=True)
            return f"{spec['url']} has {rows} rows, expected {spec['rows']}", {}
        if digest != spec["smiles_sha256"]:
            target.unlink(missing_ok=True)
            return f"{spec['url']}: its SMILES column does not match the pinned sha256 (a different MOSES copy)", {}
        out[split] = target
    return None, out

