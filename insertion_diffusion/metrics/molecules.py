"""De novo molecule generation metrics (torchmetrics; identical on 1 or N ranks).

One metric object, :class:`MoleculeGenerationMetrics`, computes every value from one set of per-row states;
:func:`molecule_metrics` wraps it in a ``MetricCollection`` with a prefix (``val/``, ``test/``). Every generated
row is decoded twice (:func:`insertion_diffusion.chem.convert.decode_to_smiles`): **strict** (the whole string
must parse and sanitise, every fragment kept) and **GenMol** (lenient SAFE decoding, largest fragment kept).

With ``G`` generated rows (after dropping padded duplicates), ``V`` the valid rows (duplicates kept), ``U`` the
set of distinct canonical SMILES among them and ``T`` the canonical training set:

=====================  =================================================================================
key                    definition
=====================  =================================================================================
``validity``           ``|V_strict| / G``
``validity_genmol``    ``|V_genmol| / G``
``uniqueness``         ``|U_strict| / |V_strict|``                 (MOSES: unique among valid)
``novelty``            ``|U_strict - T| / |U_strict|``             (MOSES; only with a training set)
``qed``, ``sa``        mean QED / SA over ``V_strict`` (duplicates kept)
``quality``            ``|{m in U_strict : QED(m) >= 0.6 and SA(m) <= 4}| / G``   (GenMol's formula)
``diversity``          ``1 - mean Tanimoto`` over distinct pairs of ``U_strict`` (Morgan r=2, 1,024 bits)
``fcd``, ``fcd_n``     FCD of ``V_strict`` (duplicates kept) against the reference; ``fcd_n = |V_strict|``
``fcd_ref_n``          size of the FCD reference sample (``nan`` for precomputed statistics that do not say)
``num_generated``      ``G``
``invalid_<reason>``   rows whose strict decoding fails for that reason / ``G``; the reasons (``empty``,
                       ``syntax``, ``branch``, ``ring``, ``valence``, ``aromaticity``, ``other``; see
                       :mod:`insertion_diffusion.chem.diagnose`) partition the invalid rows, so they add up
                       to ``1 - validity``
=====================  =================================================================================

Every strict set metric has a ``_genmol`` twin computed on the GenMol-decoded molecules instead
(``uniqueness_genmol``, ``novelty_genmol``, ``qed_genmol``, ``sa_genmol``, ``quality_genmol``,
``diversity_genmol``); ``quality_genmol`` is the number GenMol and LoFlexMDM report as "quality". A ratio with an
empty denominator is 0; a mean over no molecules (or a diversity over fewer than 2) is ``nan``.

**Distributed evaluation.** Each row's strict and GenMol canonical SMILES travel as UTF-8 bytes in one flat
``uint8`` state with their lengths, next to the row's dataset ``index``, its scores and packed fingerprints; all
states are list states reduced by ``cat``. ``compute()`` sees the rows of every rank, keeps the *first*
occurrence of every index (rank order, then update order), which drops the rows a ``DistributedSampler`` repeats
to pad the last batch, and computes the set metrics over that union. Means use exactly rounded sums
(``math.fsum``) and order-sensitive computations (diversity, FCD) sort their molecules first, so the values
are identical whatever the number of ranks or the batch split (FCD, a float32 network output, only when the
processes use the same number of torch threads). Without an ``index`` (direct use), rows get
negative running indices that are unique per rank and are never de-duplicated.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

from insertion_diffusion.chem import scoring
from insertion_diffusion.chem.convert import REPRESENTATIONS, SMILES_FORMS, decode_to_smiles
from insertion_diffusion.chem.diagnose import INVALID_REASONS, diagnose
from insertion_diffusion.tokenizers import Tokenizer, as_tokenizer

__all__ = ["MOLECULE_METRIC_KEYS", "MoleculeGenerationMetrics", "decode_rows", "decode_texts", "molecule_metrics"]

QED_THRESHOLD = 0.6
SA_THRESHOLD = 4.0
# Columns of the per-row float64 state.
_INDEX, _LEN_STRICT, _LEN_GENMOL, _QED_STRICT, _SA_STRICT, _QED_GENMOL, _SA_GENMOL, _REASON = range(8)
_NUM_COLS = 8

MOLECULE_METRIC_KEYS = (
    "num_generated",
    "validity",
    "validity_genmol",
    "uniqueness",
    "uniqueness_genmol",
    "novelty",
    "novelty_genmol",
    "qed",
    "qed_genmol",
    "sa",
    "sa_genmol",
    "quality",
    "quality_genmol",
    "diversity",
    "diversity_genmol",
    "fcd",
    "fcd_n",
    "fcd_ref_n",
    *(f"invalid_{reason}" for reason in INVALID_REASONS),
)
"""Every key :class:`MoleculeGenerationMetrics` can return (novelty without a training set and FCD without a
reference are left out)."""


def decode_texts(texts: Sequence[str], representation: str) -> tuple[list[str | None], list[str | None]]:
    """Strict and GenMol canonical SMILES (or None) of each text.

    For SMILES text the GenMol decoding is the strict parse followed by "keep the largest fragment", so it is
    derived from the strict result when that is invalid or has a single fragment (one parse instead of two).
    """
    strict = [decode_to_smiles(t, representation, "strict") for t in texts]
    if representation in SMILES_FORMS:
        genmol = [
            s if s is None or "." not in s else decode_to_smiles(t, representation, "genmol")
            for t, s in zip(texts, strict)
        ]
    else:
        genmol = [decode_to_smiles(t, representation, "genmol") for t in texts]
    return strict, genmol


def decode_rows(
    preds: Sequence[Sequence[int]], tokenizer: Tokenizer, representation: str
) -> tuple[list[str], list[str | None], list[str | None]]:
    """Token-id rows -> (texts, strict canonical SMILES or None, GenMol canonical SMILES or None)."""
    texts = [tokenizer.decode(p) for p in preds]
    strict, genmol = decode_texts(texts, representation)
    return texts, strict, genmol


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def _mean(values: Iterable[float]) -> float:
    """Exactly rounded mean of the finite values (order independent); ``nan`` if there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return math.fsum(finite) / len(finite) if finite else math.nan


def _rows(
    texts: Sequence[str], index: Sequence[int], representation: str, n_bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row states of decoded texts: float64 ``(n, 8)`` rows (the last: the strict failure's position in
    ``INVALID_REASONS``, -1 when valid), the flat UTF-8 bytes of the canonical SMILES
    (strict then GenMol, valid ones only, row by row) and the packed strict/GenMol fingerprints ``(n, 2 * nb)``."""
    n = len(texts)
    strict, genmol = decode_texts(texts, representation)
    unique = sorted({s for s in strict + genmol if s is not None})
    scores = scoring.score_smiles(unique, n_bits=n_bits, n_jobs=1)
    lookup = {s: i for i, s in enumerate(unique)}
    nb = n_bits // 8
    rows = np.full((n, _NUM_COLS), math.nan)
    fps = np.zeros((n, 2 * nb), dtype=np.uint8)
    chunks: list[bytes] = []
    for r, (s, g) in enumerate(zip(strict, genmol)):
        rows[r, _INDEX] = index[r]
        rows[r, _REASON] = -1 if s is not None else INVALID_REASONS.index(diagnose(texts[r], representation))
        for smi, len_col, q_col, sa_col, fp_off in (
            (s, _LEN_STRICT, _QED_STRICT, _SA_STRICT, 0),
            (g, _LEN_GENMOL, _QED_GENMOL, _SA_GENMOL, nb),
        ):
            if smi is None:
                rows[r, len_col] = -1
                continue
            data = smi.encode("utf-8")
            chunks.append(data)
            k = lookup[smi]
            rows[r, len_col] = len(data)
            rows[r, q_col] = scores.qed[k]
            rows[r, sa_col] = scores.sa[k]
            fps[r, fp_off : fp_off + nb] = scores.fingerprints[k]
    flat = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
    return rows, flat, fps


def _rows_star(args: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _rows(*args)


class MoleculeGenerationMetrics(Metric):
    """Validity, uniqueness, novelty, QED, SA, quality, internal diversity and (optionally) FCD of generations.

    ``update(preds, refs=None, prompts=None, index=None)`` takes the generated token ids (``list[list[int]]``,
    special tokens stripped); ``refs`` and ``prompts`` are ignored; ``index`` is the rows' dataset index
    (``batch["index"]``). Decoding and per-molecule scoring (QED, SA, fingerprints) happen on the rank that
    generated the row (in ``update``, or when held-back rows are flushed, see ``n_jobs``); ``compute()`` returns a dict (see the module docstring for the definitions).

    Args:
        tokenizer: turns ids into text in ``representation``.
        representation: ``"smiles"``, ``"safe"`` or ``"bracket_safe"``.
        train_canonical: canonical SMILES of the training set, for novelty (omitted when ``None``).
        fcd_reference: reference for FCD: SMILES, a file, or precomputed statistics
            (see :func:`insertion_diffusion.chem.scoring.fcd_reference_stats`); statistics are computed once, at
            the first ``compute()``. ``None`` leaves FCD out.
        fcd_device: device ChemNet runs on.
        qed_threshold, sa_threshold: quality's thresholds (GenMol: QED >= 0.6, SA <= 4).
        n_bits: Morgan fingerprint length for diversity.
        genmol_variants: also return the ``_genmol`` twins of the set metrics (``validity_genmol`` always).
        n_jobs: processes that decode and score rows. With 1 (default) every ``update`` scores its batch at
            once; with more, rows are held back until ``flush_rows`` of them (or ``compute()``) and then scored
            on a pool, which pays off only for large evaluations (about 1.5 ms a molecule on one core, mostly
            QED). Values do not depend on it.
        flush_rows: rows held back before a pooled flush (``n_jobs > 1`` only).
    """

    is_differentiable = False
    higher_is_better: bool | None = None
    full_state_update = False

    mol_rows: list[Tensor]
    mol_bytes: list[Tensor]
    mol_fps: list[Tensor]

    def __init__(
        self,
        tokenizer: Tokenizer | dict,
        representation: str = "smiles",
        train_canonical: Iterable[str] | None = None,
        fcd_reference: Any = None,
        fcd_device: str = "cpu",
        qed_threshold: float = QED_THRESHOLD,
        sa_threshold: float = SA_THRESHOLD,
        n_bits: int = scoring.FP_BITS,
        genmol_variants: bool = True,
        n_jobs: int = 1,
        flush_rows: int = 4096,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if representation not in REPRESENTATIONS:
            raise ValueError(f"unknown representation {representation!r}; use one of {list(REPRESENTATIONS)}")
        if n_bits <= 0 or n_bits % 8:
            raise ValueError(f"n_bits must be a positive multiple of 8, got {n_bits}")
        self.tokenizer = as_tokenizer(tokenizer)
        self.representation = representation
        self.train_canonical = None if train_canonical is None else frozenset(train_canonical)
        if isinstance(fcd_reference, (str, os.PathLike)) and not os.path.isfile(fcd_reference):
            raise FileNotFoundError(f"FCD reference file not found: {os.fspath(fcd_reference)!r}")
        self.fcd_reference = fcd_reference
        self.fcd_device = fcd_device
        self._fcd_stats: dict[str, Any] | None = None
        self.qed_threshold = float(qed_threshold)
        self.sa_threshold = float(sa_threshold)
        self.n_bits = int(n_bits)
        self.genmol_variants = bool(genmol_variants)
        if n_jobs < 1 or flush_rows < 1:
            raise ValueError(f"n_jobs and flush_rows must be >= 1, got {n_jobs} and {flush_rows}")
        self.n_jobs = int(n_jobs)
        self.flush_rows = int(flush_rows)
        self._counter = 0
        self._pending_texts: list[str] = []
        self._pending_index: list[int] = []
        self.add_state("mol_rows", default=[], dist_reduce_fx="cat")
        self.add_state("mol_bytes", default=[], dist_reduce_fx="cat")
        self.add_state("mol_fps", default=[], dist_reduce_fx="cat")

    # --- update -------------------------------------------------------------------------------------------
    def _row_indices(self, n: int, index: Tensor | Sequence[int] | None) -> list[int]:
        if index is not None:
            idx = index.tolist() if isinstance(index, Tensor) else [int(i) for i in index]
            if len(idx) != n:
                raise ValueError(f"molecule metrics: got {n} generations but {len(idx)} indices")
            if any(i < 0 for i in idx):
                raise ValueError("molecule metrics: row indices must be >= 0")
            return idx
        world, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        start = self._counter
        self._counter += n
        return [-1 - ((start + i) * world + rank) for i in range(n)]

    def update(
        self,
        preds: Sequence[Sequence[int]],
        refs: Sequence[Sequence[int]] | None = None,
        prompts: Sequence[Sequence[int]] | None = None,
        index: Tensor | Sequence[int] | None = None,
    ) -> None:
        idx = self._row_indices(len(preds), index)
        self._pending_texts.extend(self.tokenizer.decode(p) for p in preds)
        self._pending_index.extend(idx)
        if self.n_jobs == 1 or len(self._pending_texts) >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        """Decode and score the rows received since the last flush (on ``n_jobs`` processes) into the states."""
        texts, idx = self._pending_texts, self._pending_index
        self._pending_texts, self._pending_index = [], []
        if not texts:
            return
        jobs = scoring.resolve_jobs(self.n_jobs, len(texts))
        args = [
            (t, i, self.representation, self.n_bits)
            for t, i in zip(scoring.split_evenly(texts, jobs), scoring.split_evenly(idx, jobs))
        ]
        parts = scoring.parallel_map(_rows_star, args, jobs)
        self.mol_rows.append(torch.from_numpy(np.concatenate([p[0] for p in parts])).to(self.device))
        self.mol_bytes.append(torch.from_numpy(np.concatenate([p[1] for p in parts])).to(self.device))
        self.mol_fps.append(torch.from_numpy(np.concatenate([p[2] for p in parts])).to(self.device))

    # --- distributed --------------------------------------------------------------------------------------
    def sync(self, *args: Any, **kwargs: Any) -> None:
        """Give a rank that saw no rows empty states of the right dtype and width before gathering (the base
        class would send a float32 placeholder that cannot be concatenated with the other ranks' states).
        Rows still waiting to be scored are scored first, on this rank."""
        self._flush()
        nb = 2 * self.n_bits // 8
        for name, shape, dtype in (
            ("mol_rows", (0, _NUM_COLS), torch.float64),
            ("mol_bytes", (0,), torch.uint8),
            ("mol_fps", (0, nb), torch.uint8),
        ):
            if isinstance(getattr(self, name), list) and not getattr(self, name):
                setattr(self, name, [torch.zeros(shape, dtype=dtype, device=self.device)])
        super().sync(*args, **kwargs)

    def reset(self) -> None:
        super().reset()
        self._counter = 0
        self._pending_texts, self._pending_index = [], []

    # --- compute ------------------------------------------------------------------------------------------
    def _gathered(self) -> tuple[np.ndarray, bytes, np.ndarray]:
        nb = 2 * self.n_bits // 8

        def cat(state: list[Tensor] | Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
            if isinstance(state, list):
                state = dim_zero_cat(state) if state else torch.zeros(shape, dtype=dtype)
            return state.detach().cpu().numpy()

        rows = cat(self.mol_rows, (0, _NUM_COLS), torch.float64).reshape(-1, _NUM_COLS)
        data = cat(self.mol_bytes, (0,), torch.uint8).tobytes()
        fps = cat(self.mol_fps, (0, nb), torch.uint8).reshape(-1, nb)
        return rows, data, fps

    def records(self) -> list[dict[str, Any]]:
        """The (de-duplicated) rows seen so far, in gathered order: ``index``, ``smiles``/``smiles_genmol``
        (canonical or None), ``qed``/``sa``/``qed_genmol``/``sa_genmol`` and packed fingerprints ``fp``/
        ``fp_genmol``, and ``invalid_reason`` (None, or why the strict decoding failed). Call inside
        ``compute()`` (after the states are gathered) or in a single process."""
        self._flush()
        rows, data, fps = self._gathered()
        nb = self.n_bits // 8
        out: list[dict[str, Any]] = []
        seen: set[int] = set()
        offset = 0
        for r in range(rows.shape[0]):
            smiles: list[str | None] = []
            for col in (_LEN_STRICT, _LEN_GENMOL):
                length = int(rows[r, col])
                if length < 0:
                    smiles.append(None)
                    continue
                smiles.append(data[offset : offset + length].decode("utf-8"))
                offset += length
            index = int(rows[r, _INDEX])
            if index in seen:
                continue
            seen.add(index)
            out.append(
                {
                    "index": index,
                    "smiles": smiles[0],
                    "smiles_genmol": smiles[1],
                    "qed": float(rows[r, _QED_STRICT]),
                    "sa": float(rows[r, _SA_STRICT]),
                    "qed_genmol": float(rows[r, _QED_GENMOL]),
                    "sa_genmol": float(rows[r, _SA_GENMOL]),
                    "fp": fps[r, :nb],
                    "fp_genmol": fps[r, nb:],
                    "invalid_reason": None if rows[r, _REASON] < 0 else INVALID_REASONS[int(rows[r, _REASON])],
                }
            )
        if offset != len(data):
            raise RuntimeError(f"molecule metrics: corrupt byte state ({offset} of {len(data)} bytes consumed)")
        return out

    def _set_metrics(self, recs: list[dict[str, Any]], suffix: str, with_fcd: bool) -> dict[str, float]:
        key = "" if suffix == "" else "_genmol"
        generated = len(recs)
        valid = [r for r in recs if r["smiles" + key] is not None]
        first: dict[str, dict[str, Any]] = {}
        for r in valid:
            first.setdefault(r["smiles" + key], r)
        unique = sorted(first)
        out = {
            "uniqueness": _ratio(len(unique), len(valid)),
            "qed": _mean(r["qed" + key] for r in valid),
            "sa": _mean(r["sa" + key] for r in valid),
            "quality": _ratio(
                sum(
                    1
                    for s in unique
                    if first[s]["qed" + key] >= self.qed_threshold and first[s]["sa" + key] <= self.sa_threshold
                ),
                generated,
            ),
        }
        if self.train_canonical is not None:
            out["novelty"] = _ratio(sum(1 for s in unique if s not in self.train_canonical), len(unique))
        if unique:
            fps = np.stack([first[s]["fp" + key] for s in unique])
            out["diversity"] = scoring.internal_diversity(fps)
        else:
            out["diversity"] = math.nan
        if with_fcd:
            smiles = sorted(r["smiles" + key] for r in valid)
            out["fcd"] = self._fcd(smiles)
            out["fcd_n"] = float(len(smiles))
            ref_n = self._fcd_stats.get("n") if self._fcd_stats is not None else None
            out["fcd_ref_n"] = math.nan if ref_n is None else float(ref_n)
        return {f"{k}{suffix}": v for k, v in out.items()}

    def _fcd(self, smiles: list[str]) -> float:
        if self._fcd_stats is None:
            self._fcd_stats = scoring.fcd_reference_stats(self.fcd_reference, device=self.fcd_device)
        return scoring.frechet_chemnet_distance(smiles, self._fcd_stats, device=self.fcd_device)

    def compute(self) -> dict[str, Tensor]:
        recs = self.records()
        generated = len(recs)
        values: dict[str, float] = {
            "num_generated": float(generated),
            "validity": _ratio(sum(r["smiles"] is not None for r in recs), generated),
            "validity_genmol": _ratio(sum(r["smiles_genmol"] is not None for r in recs), generated),
        }
        reasons = Counter(r["invalid_reason"] for r in recs)
        for reason in INVALID_REASONS:
            values[f"invalid_{reason}"] = _ratio(reasons[reason], generated)
        values.update(self._set_metrics(recs, "", with_fcd=self.fcd_reference is not None))
        if self.genmol_variants:
            values.update(self._set_metrics(recs, "_genmol", with_fcd=False))
        return {k: torch.tensor(values[k], dtype=torch.float32) for k in MOLECULE_METRIC_KEYS if k in values}


def molecule_metrics(
    prefix: str = "",
    tokenizer: Tokenizer | dict | None = None,
    representation: str = "smiles",
    train_canonical: Iterable[str] | None = None,
    fcd_reference: Any = None,
    **kwargs: Any,
) -> MetricCollection:
    """The molecule metrics under ``prefix`` (e.g. ``"val/"``): ``val/validity``, ``val/quality_genmol``, ...

    Keyword arguments beyond these go to :class:`MoleculeGenerationMetrics` (``fcd_device``, thresholds,
    ``n_bits``, ``genmol_variants``).
    """
    if tokenizer is None:
        raise ValueError("molecule_metrics needs the tokenizer that produced the generated ids")
    metric = MoleculeGenerationMetrics(
        tokenizer=tokenizer,
        representation=representation,
        train_canonical=train_canonical,
        fcd_reference=fcd_reference,
        **kwargs,
    )
    return MetricCollection({"molecules": metric}, prefix=prefix, compute_groups=False)
