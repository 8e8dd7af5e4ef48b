"""Reading and cleaning molecule corpora: SMILES files in, canonical / encoded / tokenised molecules out.

Everything here is a pure function of its inputs (no Lightning), so that the DataModule stays small and the
cleaning rules can be tested on tiny files. Every line of a corpus either yields a molecule or is counted
under exactly one drop reason (:data:`DROP_REASONS`):

==================  ==================================================================================
``blank``           an empty line, or an empty SMILES cell
``header``          the first non-blank line, when it names the columns (e.g. ``SMILES``, ``smiles,id``)
``not_utf8``        the line's bytes are not UTF-8
``unparsable``      RDKit cannot parse and sanitise the SMILES (or the line lacks the SMILES column)
``unencodable``     SAFE / bracket-SAFE encoding failed or does not decode back to the same molecule
``too_long``        more tokens than the limit
``duplicate``       the canonical SMILES was already kept (in any split)
``unknown_token``   a validation/test molecule uses a token that the training split does not have
==================  ==================================================================================
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import multiprocessing
import os
import re
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from insertion_diffusion.chem.convert import canonical_smiles, encode_canonical, split_smiles

__all__ = [
    "DROP_REASONS",
    "SUPPORTED_SUFFIXES",
    "Corpus",
    "atomic_write",
    "clean_molecules",
    "clean_one",
    "corpus_format",
    "default_num_proc",
    "file_sha256",
    "read_corpus",
    "summarise",
    "zero_counts",
]

DROP_REASONS: tuple[str, ...] = (
    "blank",
    "header",
    "not_utf8",
    "unparsable",
    "unencodable",
    "too_long",
    "duplicate",
    "unknown_token",
)
SUPPORTED_SUFFIXES: tuple[str, ...] = (".smi", ".txt", ".csv", ".tsv")
HEADER_NAMES = frozenset({"smiles", "smi", "canonical_smiles", "isomeric_smiles", "molecule", "mol", "structure"})
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z_ .\-]*")
_CHUNK = 2048
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def zero_counts() -> dict[str, int]:
    return dict.fromkeys(DROP_REASONS, 0)


# --- files ---------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory, fsync, then ``os.replace`` (readers never see half a file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; a shared cache should be readable like any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def corpus_format(path: str | os.PathLike) -> tuple[str, bool]:
    """``(suffix, gzipped)`` of a corpus file; raises ValueError for an unsupported suffix."""
    name = Path(path).name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    suffix = Path(name).suffix
    if suffix not in SUPPORTED_SUFFIXES:
        allowed = ", ".join(f"{s}, {s}.gz" for s in SUPPORTED_SUFFIXES)
        raise ValueError(
            f"data.path {str(path)!r} has an unsupported file type {suffix or '(none)'!r}; use one of {allowed} "
            "(one SMILES per line, or a table with a SMILES column)"
        )
    return suffix, gz


@dataclass
class Corpus:
    """The SMILES cells of one file: ``smiles[i]`` came from 1-based line ``lines[i]``."""

    path: str
    smiles: list[str]
    lines: list[int]
    counts: dict[str, int] = field(default_factory=zero_counts)
    total_lines: int = 0
    column: int = 0
    header: list[str] | None = None


def _read_bytes(path: str, gz: bool) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"molecule corpus {path!r} does not exist; check data.path") from None
    except IsADirectoryError:
        raise ValueError(f"molecule corpus {path!r} is a directory; point data.path at a file") from None
    if gz:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(
                f"molecule corpus {path!r} is not a readable gzip file ({err}); re-compress it or drop the .gz"
            ) from None
    return data


def _split_cells(line: str, suffix: str) -> list[str]:
    if suffix in (".smi", ".txt"):
        return line.split()
    delimiter = "," if suffix == ".csv" else "\t"
    if '"' not in line:
        return [c.strip() for c in line.split(delimiter)]
    return [c.strip() for c in next(csv.reader([line], delimiter=delimiter), [])]


def _resolve_column(cells: list[str], column: int | str | None, path: str) -> tuple[int, bool]:
    """``(column index, first line is a header)`` from the first non-blank line's cells."""
    if isinstance(column, str):
        for match in (lambda c: c == column, lambda c: c.lower() == column.lower()):
            hits = [i for i, c in enumerate(cells) if match(c)]
            if hits:
                return hits[0], True
        raise ValueError(
            f"column {column!r} is not in the first line of {path!r} (found {cells[:20]}); set data.column to one "
            "of those names, to a 0-based column index, or leave it unset for the first column"
        )
    if column is None:
        named = [i for i, c in enumerate(cells) if c.lower() in HEADER_NAMES]
        if named:
            return named[0], True
        column = 0
    cell = cells[column] if column < len(cells) else ""
    is_header = bool(cell) and (
        cell.lower() in HEADER_NAMES or (_NAME_RE.fullmatch(cell) is not None and canonical_smiles(cell) is None)
    )
    return column, is_header


def read_corpus(path: str, column: int | str | None = None) -> Corpus:
    """Read the SMILES cells of a ``.smi`` / ``.txt`` / ``.csv`` / ``.tsv`` file (optionally ``.gz``).

    Bytes are split on ``\\n`` (a trailing ``\\r`` is dropped, so CRLF files work) and decoded line by line;
    lines that are not UTF-8 are counted, never fatal. ``.smi`` / ``.txt`` cells are whitespace separated
    (SMILES first, then e.g. a name); ``.csv`` / ``.tsv`` are comma / tab separated.

    Args:
        path: the corpus file.
        column: SMILES column: a name (the first line must then be a header), a 0-based index, or None for a
            column named like ``SMILES`` in a header, else the first column.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unsupported suffix, unreadable gzip, empty file, or a named column that is not there.
    """
    path = str(path)
    suffix, gz = corpus_format(path)
    data = _read_bytes(path, gz)
    raw = data.split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()  # the final newline ends the last line, it does not start a blank one
    out = Corpus(path=path, smiles=[], lines=[], total_lines=len(raw))
    counts = out.counts
    if not raw or not data.strip():
        raise ValueError(
            f"molecule corpus {path!r} is empty ({len(data)} bytes, {len(raw)} lines); give a file with one "
            "SMILES per line"
        )
    try:
        text_lines: list[str | None] = data.decode("utf-8").split("\n")[: len(raw)]
    except UnicodeDecodeError:
        text_lines = []
        for line in raw:
            try:
                text_lines.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                text_lines.append(None)
    resolved = False
    for number, line in enumerate(text_lines, start=1):
        if line is None:
            counts["not_utf8"] += 1
            continue
        if number == 1:
            line = line.lstrip("\ufeff")  # UTF-8 byte-order mark
        line = line.strip()
        if not line:
            counts["blank"] += 1
            continue
        cells = _split_cells(line, suffix)
        if not resolved:
            resolved = True
            out.column, is_header = _resolve_column(cells, column, path)
            if is_header:
                out.header = cells
                counts["header"] += 1
                continue
        if out.column >= len(cells):
            counts["unparsable"] += 1
            continue
        cell = cells[out.column]
        if not cell:
            counts["blank"] += 1
            continue
        out.smiles.append(cell)
        out.lines.append(number)
    if not resolved:
        raise ValueError(
            f"molecule corpus {path!r} has no readable line ({out.total_lines} lines: {_summary(counts)}); give a "
            "UTF-8 file with one SMILES per line"
        )
    return out


def _summary(counts: dict[str, int]) -> str:
    parts = [f"{k}={v}" for k, v in counts.items() if v]
    return ", ".join(parts) if parts else "nothing dropped"


# --- cleaning ------------------------------------------------------------------------------------------
def clean_one(smiles: str, representation: str, max_tokens: int) -> tuple[str, str, list[str]] | str:
    """``(canonical SMILES, representation text, tokens)`` or the drop reason."""
    canon = canonical_smiles(smiles)
    if canon is None:
        return "unparsable"
    text = encode_canonical(canon, representation)
    if text is None:
        return "unencodable"
    try:
        tokens = split_smiles(text)
    except ValueError:
        return "unencodable"
    if len(tokens) > max_tokens:
        return "too_long"
    return canon, text, tokens


def _clean_chunk(args: tuple[Sequence[str], str, int]) -> list[tuple[str, str, list[str]] | str]:
    smiles, representation, max_tokens = args
    return [clean_one(s, representation, max_tokens) for s in smiles]


def _pool_context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def clean_molecules(
    smiles: Sequence[str],
    representation: str,
    max_tokens: int,
    num_proc: int = 1,
    min_parallel: int = 20_000,
) -> list[tuple[str, str, list[str]] | str]:
    """:func:`clean_one` over ``smiles`` (in order), in ``num_proc`` processes when there are enough of them.

    Below ``min_parallel`` molecules a pool costs more than it saves (measured: a fork + pickling round trip
    per chunk), so the work stays in this process. The result does not depend on ``num_proc``.
    """
    n = len(smiles)
    if num_proc <= 1 or n < min_parallel:
        return _clean_chunk((smiles, representation, max_tokens))
    chunks = [(smiles[i : i + _CHUNK], representation, max_tokens) for i in range(0, n, _CHUNK)]
    out: list[tuple[str, str, list[str]] | str] = []
    with _pool_context().Pool(num_proc) as pool:
        for part in pool.imap(_clean_chunk, chunks):
            out.extend(part)
    return out


def summarise(counts: dict[str, int]) -> str:
    """``reason=count`` for the non-zero drop counts (``nothing dropped`` if none)."""
    return _summary(counts)


def default_num_proc() -> int:
    """min(2, CPUs): canonicalisation scales with processes, but this machine class has 2 cores."""
    return max(1, min(2, os.cpu_count() or 1))
