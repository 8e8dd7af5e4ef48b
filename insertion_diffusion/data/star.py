"""Star-graph path finding (method.md 8.1; evaluation.md 1.3): generation, on-disk cache, tokenisation, metrics.

A star has ``degree`` arms that share one centre node. Every arm is a directed chain of ``n`` nodes (the centre
counted); the centre sits at position ``j`` of the chain with at least ``min_plan_length`` nodes after it. The
source is the first node of arm 0 and the goal its last node, so the source-to-goal path runs along arm 0 through
the centre. The ``simple`` generator (easy preset) puts the centre first on every arm (source = centre).

Rows are ``[u1 v1 u2 v2 ... source goal][BOS][p0 p1 p1 p2 ...][EOS][PAD...]`` (``target_format="edges"``) or
``[... source goal][BOS][p0 p1 p2 ...][EOS][PAD...]`` (``"nodes"``); node ``v`` is the token ``str(v)``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import networkx as nx
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import MetricCollection

from insertion_diffusion.data.base import SequenceDataModule, encode_rows
from insertion_diffusion.data.corpus import atomic_write
from insertion_diffusion.metrics.star import ExactMatch, TokenAccuracy, ValidPathRate
from insertion_diffusion.tokenizers import IntegerTokenizer

__all__ = [
    "FORMAT_VERSION",
    "PRESETS",
    "StarGraphDataModule",
    "StarPreset",
    "generate_splits",
    "sample_star",
    "unique_path",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump when the generator or the record format changes: caches written by another version are rebuilt."""

SPLIT_BUILD_ORDER = ("test", "val", "train")
TARGET_FORMATS = ("edges", "nodes")
# parsing 50k JSON rows dominates setup time, so each stage loads only the splits it uses
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


@dataclass(frozen=True)
class StarPreset:
    """Generation parameters of one star set.

    Attributes:
        generator: ``"simple"`` (centre first on every arm, source = centre) or ``"asymmetric"``.
        degree: number of arms.
        min_arm_nodes: fewest nodes on an arm, centre included.
        max_arm_nodes: most nodes on an arm, centre included.
        num_ids: node ids are drawn without replacement from ``0 .. num_ids - 1``.
        min_plan_length: nodes an arm keeps after the centre (asymmetric generator only).
        prompt_block: prompt width of the reference setup (edges, source, goal, padding).
        target_block: target width of the reference setup (BOS, path edges, EOS, padding).
    """

    generator: str
    degree: int
    min_arm_nodes: int
    max_arm_nodes: int
    num_ids: int
    min_plan_length: int
    prompt_block: int
    target_block: int

    def __post_init__(self) -> None:
        if self.generator not in ("simple", "asymmetric"):
            raise ValueError(f"StarPreset.generator must be 'simple' or 'asymmetric', got {self.generator!r}")
        if not 2 <= self.min_arm_nodes <= self.max_arm_nodes:
            raise ValueError(
                f"StarPreset arm lengths need 2 <= min_arm_nodes <= max_arm_nodes, got "
                f"{self.min_arm_nodes}..{self.max_arm_nodes}"
            )
        if self.generator == "asymmetric" and self.min_arm_nodes < self.min_plan_length + 1:
            raise ValueError(
                f"StarPreset: min_arm_nodes={self.min_arm_nodes} leaves no room for min_plan_length="
                f"{self.min_plan_length} nodes after the centre; use min_arm_nodes >= {self.min_plan_length + 1}"
            )
        if self.max_nodes > self.num_ids:
            raise ValueError(
                f"StarPreset: a star can have {self.max_nodes} distinct nodes but only num_ids={self.num_ids} ids "
                f"exist; raise num_ids to >= {self.max_nodes}"
            )

    @property
    def max_nodes(self) -> int:
        """Most distinct nodes in one graph (the shared centre counted once)."""
        return 1 + self.degree * (self.max_arm_nodes - 1)

    @property
    def max_edges(self) -> int:
        return self.degree * (self.max_arm_nodes - 1)

    def max_target_tokens(self, target_format: str) -> int:
        path_edges = self.max_arm_nodes - 1
        return 2 * path_edges if target_format == "edges" else path_edges + 1

    def max_row_tokens(self, target_format: str) -> int:
        """Longest possible row: edges + source + goal + BOS + target + EOS."""
        return 2 * self.max_edges + 2 + 1 + self.max_target_tokens(target_format) + 1


PRESETS: dict[str, StarPreset] = {
    # easy: 3 arms of 5 nodes from the centre (source); 12 edges, 4-edge paths, 20 ids.
    "easy": StarPreset("simple", 3, 5, 5, 20, 0, prompt_block=28, target_block=14),
    "medium": StarPreset("asymmetric", 3, 3, 6, 20, 2, prompt_block=36, target_block=16),
    "hard": StarPreset("asymmetric", 5, 6, 12, 56, 5, prompt_block=116, target_block=28),
}


# --- generation (pure functions of a local RNG) ---------------------------------------------------------
def sample_star(rng: random.Random, preset: StarPreset) -> tuple[list[tuple[int, int]], int, int]:
    """Draw one star: ``(shuffled directed edges, source, goal)``."""
    lengths = [rng.randint(preset.min_arm_nodes, preset.max_arm_nodes) for _ in range(preset.degree)]
    nodes = rng.sample(range(preset.num_ids), 1 + sum(n - 1 for n in lengths))
    centre, pool = nodes[0], iter(nodes[1:])
    edges: list[tuple[int, int]] = []
    source = goal = centre
    for arm_index, n in enumerate(lengths):
        junction = 0 if preset.generator == "simple" else rng.randint(0, n - 1 - preset.min_plan_length)
        arm = [next(pool) for _ in range(junction)] + [centre] + [next(pool) for _ in range(n - 1 - junction)]
        edges.extend(zip(arm, arm[1:]))
        if arm_index == 0:
            source, goal = arm[0], arm[-1]
    rng.shuffle(edges)
    return edges, source, goal


def unique_path(edges: list[tuple[int, int]], source: int, goal: int) -> list[int]:
    """The only simple directed path from ``source`` to ``goal``; raises ``RuntimeError`` if not exactly one."""
    graph = nx.DiGraph()
    graph.add_edges_from(edges)
    paths = list(itertools.islice(nx.all_simple_paths(graph, source, goal), 2))
    if len(paths) != 1:
        raise RuntimeError(
            f"star graph has {'no' if not paths else 'more than one'} simple path from {source} to {goal} "
            f"(edges {sorted(edges)}); the generator must produce exactly one"
        )
    return [int(v) for v in paths[0]]


def graph_key(edges: list[tuple[int, int]] | list[list[int]], source: int, goal: int) -> tuple:
    """Canonical identity of a problem: the sorted edge set plus source and goal."""
    return (tuple(sorted(tuple(e) for e in edges)), source, goal)


def generate_splits(preset: StarPreset, sizes: dict[str, int], seed: int) -> dict[str, list[dict[str, Any]]]:
    """Generate disjoint splits (test, then val, then train) from one ``random.Random(seed)``.

    Building test first keeps the test and val sets unchanged when only ``num_train`` changes. A graph whose
    canonical key (:func:`graph_key`) was already drawn for any split is skipped.
    """
    rng = random.Random(seed)
    seen: set[tuple] = set()
    out: dict[str, list[dict[str, Any]]] = {}
    for split in SPLIT_BUILD_ORDER:
        want, records, draws = sizes[split], [], 0
        max_draws = 20 * want + 1000
        while len(records) < want:
            if draws >= max_draws:
                raise RuntimeError(
                    f"star generation: only {len(records)} of {want} distinct {split} graphs after {draws} draws "
                    "(the preset has too few distinct graphs); lower the split sizes"
                )
            draws += 1
            edges, source, goal = sample_star(rng, preset)
            key = graph_key(edges, source, goal)
            if key in seen:
                continue
            seen.add(key)
            path = unique_path(edges, source, goal)
            records.append({"edges": [list(e) for e in edges], "source": source, "goal": goal, "path": path})
        out[split] = records
    return out


# --- cache I/O -------------------------------------------------------------------------------------------
class _StaleCache(Exception):
    """The cache directory exists but cannot be trusted; the message says why."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class StarGraphDataModule(SequenceDataModule):
    """Star-graph path finding: generate (once, cached on disk), tokenise and batch the easy/medium/hard sets.

    ``prepare_data`` generates ``data_dir/star-<preset>-<hash>/{train,val,test}.jsonl`` plus a ``manifest.json``
    (parameters, format version, sha256 and line count per file); ``setup`` verifies and loads it. A cache
    whose manifest is missing, unreadable, stale or whose checksums do not match is rebuilt with a warning.

    Args:
        preset: which star set: ``easy`` (3 arms of 5 nodes, source = centre, 20 ids), ``medium`` (3 arms of
            3-6 nodes, min_plan_length 2, 20 ids) or ``hard`` (5 arms of 6-12 nodes, min_plan_length 5, 56 ids).
        data_dir: directory that holds the generated cache (created if missing).
        num_train: training graphs.
        num_val: validation graphs.
        num_test: test graphs (also used by ``predict``).
        target_format: ``edges`` (flattened path edges ``p0 p1 p1 p2 ...``, as in the paper) or ``nodes``
            (the path's node sequence ``p0 p1 p2 ...``).
        max_length: fixed row width; default: the preset's prompt block + target block (42 / 52 / 144),
            or the longest possible row if that is larger.
        generation_seed: seed of the graph generator; the same arguments always give identical splits.
        batch_size: rows per training batch.
        eval_batch_size: rows per validation / test / predict batch (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        seed: seeds the training shuffle.
    """

    def __init__(
        self,
        preset: str = "easy",
        data_dir: str = "data_cache",
        num_train: int = 50_000,
        num_val: int = 100,
        num_test: int = 5_000,
        target_format: str = "edges",
        max_length: int | None = None,
        generation_seed: int = 42,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
    ) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown star preset {preset!r}; set data.preset to one of {sorted(PRESETS)}")
        if target_format not in TARGET_FORMATS:
            raise ValueError(
                f"unknown target_format {target_format!r}; set data.target_format to one of {list(TARGET_FORMATS)}"
            )
        for name, value, low in (
            ("num_train", num_train, 1),
            ("num_val", num_val, 0),
            ("num_test", num_test, 0),
        ):
            if int(value) < low:
                raise ValueError(f"data.{name} must be >= {low}, got {value}")
        spec = PRESETS[preset]
        required = spec.max_row_tokens(target_format)
        if max_length is None:
            max_length = max(spec.prompt_block + spec.target_block, required)
        elif max_length < required:
            raise ValueError(
                f"data.max_length={max_length} is below the longest possible star-{preset} {target_format} example "
                f"({required} tokens incl. BOS and EOS); raise data.max_length to >= {required}"
            )
        super().__init__(
            tokenizer=IntegerTokenizer(spec.num_ids),
            max_length=max_length,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        self.save_hyperparameters()
        # Record the resolved length: the model's linked ``max_length`` hparam must agree with it.
        self.hparams["max_length"] = self.max_length
        self.preset = preset
        self.spec = spec
        self.data_dir = str(data_dir)
        self.sizes = {"train": int(num_train), "val": int(num_val), "test": int(num_test)}
        self.target_format = target_format
        self.generation_seed = int(generation_seed)
        self.records: dict[str, list[dict[str, Any]]] = {}
        self._fresh_records: dict[str, list[dict[str, Any]]] | None = None
        # node value -> token id (ids of the IntegerTokenizer are offset by the special tokens)
        self._node_ids = [self.tokenizer.stoi[str(v)] for v in range(spec.num_ids)]

    # --- cache -------------------------------------------------------------------------------------
    @property
    def generation_params(self) -> dict[str, Any]:
        """Everything the cached records depend on (the target format does not: it is applied at load)."""
        return {
            "format_version": FORMAT_VERSION,
            "preset": self.preset,
            **asdict(self.spec),
            "num_train": self.sizes["train"],
            "num_val": self.sizes["val"],
            "num_test": self.sizes["test"],
            "generation_seed": self.generation_seed,
        }

    @property
    def cache_dir(self) -> Path:
        digest = hashlib.sha256(json.dumps(self.generation_params, sort_keys=True).encode()).hexdigest()[:12]
        return Path(self.data_dir) / f"star-{self.preset}-{digest}"

    def _unwritable(self, path: Path, err: OSError) -> ValueError:
        return ValueError(
            f"cannot write the star-graph cache at {str(path)!r} ({type(err).__name__}: {err.strerror or err}); "
            "choose a writable data.data_dir"
        )

    def _verified_blobs(self) -> dict[str, bytes]:
        """The split files' bytes after checking the manifest; raises :class:`_StaleCache` naming the problem."""
        root = self.cache_dir
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise _StaleCache("manifest.json is missing (an interrupted or partial build)")
        try:
            manifest = json.loads(manifest_path.read_text())
            version, params, files = manifest["format_version"], manifest["params"], manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise _StaleCache(f"manifest.json is unreadable ({type(err).__name__}: {err})") from None
        if version != FORMAT_VERSION:
            raise _StaleCache(f"format version {version!r} differs from the current {FORMAT_VERSION}")
        expected = self.generation_params
        if params != expected:
            keys = sorted(k for k in set(params) | set(expected) if params.get(k) != expected.get(k))
            raise _StaleCache(f"generation parameters differ from the requested ones ({', '.join(keys)})")
        blobs = {}
        for split in SPLIT_BUILD_ORDER:
            name = f"{split}.jsonl"
            try:
                entry = files[name]
                data = (root / name).read_bytes()
                digest, lines = entry["sha256"], entry["lines"]
            except (OSError, KeyError, TypeError) as err:
                raise _StaleCache(f"{name} is missing or unlisted ({type(err).__name__}: {err})") from None
            if hashlib.sha256(data).hexdigest() != digest:
                raise _StaleCache(f"{name} does not match its sha256 in manifest.json (edited or truncated)")
            found = data.count(b"\n")
            if found != lines or found != self.sizes[split]:
                raise _StaleCache(f"{name} has {found} lines, expected {self.sizes[split]}")
            blobs[split] = data
        return blobs

    @staticmethod
    def _parse(blobs: dict[str, bytes], splits: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
        try:
            return {split: [json.loads(line) for line in blobs[split].splitlines()] for split in splits}
        except ValueError as err:
            raise _StaleCache(f"a split file is not valid JSON lines ({err})") from None

    def _build_cache(self) -> dict[str, list[dict[str, Any]]]:
        root = self.cache_dir
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise self._unwritable(root, err) from err
        log.info("generating star-%s graphs %s into %s", self.preset, self.sizes, root)
        records = generate_splits(self.spec, self.sizes, self.generation_seed)
        try:
            # the manifest goes first and comes back last, so a crash mid-build never leaves a "valid" cache
            (root / "manifest.json").unlink(missing_ok=True)
            files = {}
            for split in SPLIT_BUILD_ORDER:
                data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records[split]).encode()
                atomic_write(root / f"{split}.jsonl", data)
                files[f"{split}.jsonl"] = {
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "lines": len(records[split]),
                }
            manifest = {"format_version": FORMAT_VERSION, "params": self.generation_params, "files": files}
            atomic_write(
                root / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
            )
            _fsync_dir(root)
        except OSError as err:
            raise self._unwritable(root, err) from err
        return records

    def _load_or_build(self, parse: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
        """Verify the cache, (re)generating it when absent or untrustworthy.

        Returns every split when it had to generate them, else only the splits named in ``parse``.
        """
        if self.cache_dir.exists():
            try:
                return self._parse(self._verified_blobs(), parse)
            except _StaleCache as why:
                rank_zero_warn(f"StarGraphDataModule: rebuilding the cache in {self.cache_dir}: {why}")
        return self._build_cache()

    # --- Lightning hooks ---------------------------------------------------------------------------
    def prepare_data(self) -> None:
        # keep freshly generated records so that setup() in this process need not parse them back
        self._fresh_records = self._load_or_build(parse=()) or None

    def setup(self, stage: str | None = None) -> None:
        """Load (verifying checksums) and tokenise the splits ``stage`` needs; all three when ``stage`` is None."""
        wanted = [s for s in _STAGE_SPLITS.get(stage or "", SPLIT_BUILD_ORDER) if s not in self.datasets]
        if not wanted:
            return
        if self._fresh_records is not None:
            self.records.update(self._fresh_records)
            self._fresh_records = None
        missing = tuple(s for s in wanted if s not in self.records)
        if missing:
            self.records.update(self._load_or_build(parse=missing))
        for split in wanted:
            self.set_split(split, self.encode_records(self.records[split]))

    # --- formatting --------------------------------------------------------------------------------
    @staticmethod
    def prompt_nodes(record: dict[str, Any]) -> list[int]:
        """Flattened edges then ``source goal`` (node values, not token ids)."""
        return [*chain.from_iterable(record["edges"]), record["source"], record["goal"]]

    def target_nodes(self, record: dict[str, Any]) -> list[int]:
        """The path as flattened edges (``p0 p1 p1 p2 ...``) or as nodes, per ``target_format``."""
        path = record["path"]
        if self.target_format == "nodes":
            return list(path)
        return list(chain.from_iterable(zip(path, path[1:])))

    def encode_records(self, records: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Records -> ``input_ids`` / ``fixed`` / ``attention_mask`` rows of width ``max_length``."""
        prompts = [self.prompt_nodes(r) for r in records]
        targets = [self.target_nodes(r) for r in records]
        return encode_rows(
            prompts, targets, self.tokenizer, self.max_length, bos=True, token_map=self._node_ids
        )

    def make_metrics(self, prefix: str = "") -> MetricCollection:
        """``exact_match``, ``token_accuracy`` and ``valid_path`` under ``prefix`` (e.g. ``"val/"``)."""
        return MetricCollection(
            {
                "exact_match": ExactMatch(),
                "token_accuracy": TokenAccuracy(),
                "valid_path": ValidPathRate(target_format=self.target_format),
            },
            prefix=prefix,
            compute_groups=False,
        )
