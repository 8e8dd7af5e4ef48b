"""Molecule string conversions: canonical SMILES, SAFE and bracket-SAFE, and lenient/strict decoding.

Four text representations of a molecule are supported (:data:`REPRESENTATIONS`):

``smiles``
    RDKit canonical isomeric SMILES.
``kekule_smiles``
    The same canonical SMILES written in Kekulé form: aromatic rings as alternating single and double bonds
    (``C1=CC=CC=C1``), no lower-case atoms. A model then never has to count aromatic atoms into a kekulisable
    ring; RDKit perceives the aromaticity again when the text is parsed, so decoding is the SMILES decoding.
``safe``
    SAFE (Noutahi et al. 2023): the molecule cut into BRICS fragments written one after the other, separated by
    ``.``; the cut bonds become ring-closure digits shared by two fragments. Produced by ``safe-mol`` 0.2.1
    (``safe.encode(..., allow_empty=True)``). A SAFE string is itself a valid SMILES string.
``bracket_safe``
    SAFE with the *attachment* ring-closure labels (those that join two fragments) renumbered ``1, 2, ...``
    and written as single tokens ``<1>``, ``<2>``, ... as in GenMol V2, so that a model can tell an
    inter-fragment attachment from an intra-fragment ring closure. ``safe-mol`` 0.2.1 has no such mode, so
    :func:`safe_to_bracket` / :func:`bracket_to_safe` implement it here. Labels of 10 and more are written
    ``<10>`` (GenMol writes ``<%10>``; both are accepted when decoding).

Decoding (:func:`decode_to_smiles`) has two modes (:data:`DECODE_MODES`):

``strict``
    the whole string must parse and sanitise; every fragment is kept; SAFE is decoded without fixing
    unmatched attachment points (an unmatched label makes the string invalid).
``genmol``
    GenMol's lenient protocol: SAFE is decoded fragment by fragment, dropping fragments that do not decode on
    their own, then decoded with ``fix=True`` (unmatched attachment points capped); finally only the largest
    fragment (by heavy atoms) is kept. For SMILES: parse, then keep the largest fragment.

Every function returns ``None`` for an input it cannot handle (never raises on bad molecule text); only an
unknown representation or mode raises ``ValueError``, and a missing ``safe-mol`` raises ``ImportError`` with
the install command. A molecule containing a dummy atom ``*`` (an open attachment point) is not accepted as
a molecule anywhere in this module.
"""

from __future__ import annotations

import re
from collections import Counter
from types import ModuleType

from rdkit import Chem, rdBase

__all__ = [
    "DECODE_MODES",
    "REPRESENTATIONS",
    "SAFE_INSTALL",
    "SMILES_FORMS",
    "SMILES_REGEX",
    "bracket_to_safe",
    "canonical_smiles",
    "decode_to_smiles",
    "encode_canonical",
    "encode_molecule",
    "largest_fragment",
    "safe_to_bracket",
    "split_smiles",
]

REPRESENTATIONS: tuple[str, ...] = ("smiles", "kekule_smiles", "safe", "bracket_safe")
SMILES_FORMS: tuple[str, ...] = ("smiles", "kekule_smiles")
"""The representations that are plain SMILES text (decoded by RDKit alone; no safe-mol needed)."""
DECODE_MODES: tuple[str, ...] = ("strict", "genmol")

SAFE_INSTALL = "pip install --no-deps safe-mol==0.2.1 datamol==0.13.0 && pip install loguru pandas"

SMILES_REGEX = (
    r"<%?\d+>"  # bracket-SAFE attachment point
    r"|\[[^\[\]]+\]"  # bracket atom: [nH], [C@@H], [N+], [13C], [Na+], [*:1]
    r"|%\(\d+\)"  # RDKit extended ring closure %(123)
    r"|%\d{2}"  # two-digit ring closure %12
    r"|->|<-"  # dative bonds (RDKit writes them for some metal complexes)
    r"|Br|Cl"  # two-letter organic-subset atoms
    r"|[BCNOSPFI]|[bcnosp]"  # one-letter organic-subset atoms (aromatic in lower case)
    r"|[()\.=#\-+\\/:~@?*$]"  # branches, fragment separator, bonds, dummy atom
    r"|\d"  # one-digit ring closure
)
"""The SMILES / SAFE / bracket-SAFE token regex (one token per match; tried left to right)."""

_TOKEN_RE = re.compile(SMILES_REGEX)
_RING_RE = re.compile(r"^(?:\d|%\d{2}|%\(\d+\))$")
_BRACKET_RE = re.compile(r"^<%?(\d+)>$")


def split_smiles(text: str) -> list[str]:
    """Split SMILES / SAFE / bracket-SAFE text into regex tokens.

    Raises:
        ValueError: naming the first characters the regex does not cover and their position.
    """
    tokens: list[str] = []
    pos = 0
    for match in _TOKEN_RE.finditer(text):
        if match.start() != pos:
            break
        tokens.append(match.group())
        pos = match.end()
    if pos != len(text):
        end = pos + 1
        while end < len(text) and end - pos < 20 and not _TOKEN_RE.match(text, end):
            end += 1
        raise ValueError(
            f"cannot tokenise {text[:60]!r}{'...' if len(text) > 60 else ''}: characters {text[pos:end]!r} at "
            f"position {pos} are not SMILES tokens"
        )
    return tokens


# --- RDKit helpers -------------------------------------------------------------------------------------
def _parse(smiles: str) -> Chem.Mol | None:
    """RDKit parse + sanitise, quietly; None for blank text, whitespace inside, a parse failure or no atoms."""
    if not isinstance(smiles, str):
        return None
    smiles = smiles.strip()
    if not smiles or any(c.isspace() for c in smiles):
        return None  # RDKit would silently read "CCO name" as CCO
    with rdBase.BlockLogs():
        try:
            mol = Chem.MolFromSmiles(smiles)
        except Exception:  # pragma: no cover - RDKit reports failures as None, but be defensive
            return None
    if mol is None or mol.GetNumAtoms() == 0:
        return None
    if any(atom.GetAtomicNum() == 0 for atom in mol.GetAtoms()):
        return None
    return mol


def _to_smiles(mol: Chem.Mol) -> str | None:
    with rdBase.BlockLogs():
        try:
            out = Chem.MolToSmiles(mol)  # canonical, isomeric
        except Exception:  # pragma: no cover
            return None
    return out or None


def _kekule_smiles(canon: str, verify: bool) -> str | None:
    """Canonical SMILES -> its canonical Kekulé form (None if RDKit cannot kekulise it or, with ``verify``, the
    Kekulé text does not parse back to ``canon``)."""
    # Kekulised from the canonical text, not from the caller's molecule: which bonds become double depends on the
    # input atom order, and the canonical text fixes it, so every spelling of a molecule gives one Kekulé string.
    mol = _parse(canon)
    if mol is None:
        return None
    with rdBase.BlockLogs():
        try:
            Chem.Kekulize(mol, clearAromaticFlags=True)
            text = Chem.MolToSmiles(mol, kekuleSmiles=True)
        except Exception:
            return None
    if not text or (verify and canonical_smiles(text) != canon):
        return None
    return text


def canonical_smiles(smiles: str) -> str | None:
    """RDKit canonical isomeric SMILES of ``smiles`` (parsed and sanitised), or None if it is not a molecule."""
    mol = _parse(smiles)
    return None if mol is None else _to_smiles(mol)


def largest_fragment(mol: Chem.Mol) -> Chem.Mol:
    """The connected component with the most heavy atoms (the first such one on ties)."""
    frags = Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=False)
    if len(frags) <= 1:
        return mol
    return max(frags, key=lambda m: m.GetNumHeavyAtoms())


# --- SAFE ----------------------------------------------------------------------------------------------
def _safe() -> ModuleType:
    """Import ``safe`` (safe-mol) lazily; a clear ImportError with the install command when missing."""
    try:
        import safe
    except ImportError as err:
        raise ImportError(
            f"the 'safe' and 'bracket_safe' representations need safe-mol (import failed: {err}); install it "
            f"with: {SAFE_INSTALL}"
        ) from err
    return safe


def _check(representation: str, mode: str | None = None) -> None:
    if representation not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {representation!r}; use one of {list(REPRESENTATIONS)}")
    if mode is not None and mode not in DECODE_MODES:
        raise ValueError(f"unknown decoding mode {mode!r}; use one of {list(DECODE_MODES)}")


def _ring_label(token: str) -> int | None:
    """The ring-closure number of a token (``1``, ``%12``, ``%(123)``), else None."""
    if not _RING_RE.match(token):
        return None
    return int(token.strip("%()"))


def _format_ring(label: int) -> str:
    if label < 10:
        return str(label)
    if label < 100:
        return f"%{label}"
    return f"%({label})"


def safe_to_bracket(safe_str: str) -> str:
    """Rewrite SAFE's attachment ring closures as ``<k>`` tokens (GenMol V2 bracket-SAFE).

    A ring-closure label is an attachment point when it occurs an odd number of times inside one
    ``.``-separated fragment (an intra-fragment ring opens and closes inside its fragment). Attachment labels
    are renumbered ``1, 2, ...`` in increasing order of their SAFE label; intra-fragment labels are kept.

    Raises:
        ValueError: if the text does not tokenise.
    """
    tokens = split_smiles(safe_str)
    counts: Counter[tuple[int, int]] = Counter()
    fragment = 0
    for tok in tokens:
        if tok == ".":
            fragment += 1
            continue
        label = _ring_label(tok)
        if label is not None:
            counts[(fragment, label)] += 1
    attach = sorted({label for (_, label), n in counts.items() if n % 2})
    if not attach:
        return safe_str
    renumber = {label: k for k, label in enumerate(attach, start=1)}
    out = []
    for tok in tokens:
        label = _ring_label(tok)
        out.append(f"<{renumber[label]}>" if label in renumber else tok)
    return "".join(out)


def bracket_to_safe(text: str) -> str:
    """Inverse of :func:`safe_to_bracket`: ``<k>`` becomes ring closure ``k + (largest ring label used)``.

    Raises:
        ValueError: if the text does not tokenise.
    """
    tokens = split_smiles(text)
    if not any(t.startswith("<") for t in tokens):
        return text
    labels = [lab for lab in map(_ring_label, tokens) if lab is not None]
    offset = max(labels, default=0)
    out = []
    for tok in tokens:
        m = _BRACKET_RE.match(tok)
        out.append(_format_ring(int(m.group(1)) + offset) if m else tok)
    return "".join(out)


def _safe_decode(safe_mod: ModuleType, text: str, fix: bool) -> Chem.Mol | None:
    """safe.decode to a molecule (dummies removed when fixing); None on any failure."""
    try:
        with rdBase.BlockLogs():
            mol = safe_mod.decode(
                text, as_mol=True, canonical=True, fix=fix, remove_dummies=fix, ignore_errors=True
            )
    except Exception:
        return None
    if mol is None or mol.GetNumAtoms() == 0:
        return None
    return mol


def _safe_decode_strict(text: str) -> str | None:
    mol = _safe_decode(_safe(), text, fix=False)
    if mol is None or any(atom.GetAtomicNum() == 0 for atom in mol.GetAtoms()):
        return None
    smi = _to_smiles(mol)
    return None if smi is None else canonical_smiles(smi)


def _safe_decode_genmol(text: str) -> str | None:
    safe_mod = _safe()
    kept = [frag for frag in text.split(".") if frag and _safe_decode(safe_mod, frag, fix=True) is not None]
    if not kept:
        return None
    mol = _safe_decode(safe_mod, ".".join(kept), fix=True)
    if mol is None:
        return None
    smi = _to_smiles(mol)
    mol = _parse(smi) if smi else None
    return None if mol is None else _to_smiles(largest_fragment(mol))


# --- public API ------------------------------------------------------------------------------------------
def encode_molecule(smiles: str, representation: str, verify: bool = True) -> str | None:
    """SMILES -> ``representation`` text (canonical SMILES, SAFE or bracket-SAFE); None if impossible.

    Args:
        smiles: any SMILES RDKit can parse and sanitise.
        representation: one of :data:`REPRESENTATIONS`.
        verify: for SAFE forms, decode the result strictly and return None unless it gives back the same
            canonical SMILES (so that every training string is an exact encoding of its molecule).
    """
    _check(representation)
    canon = canonical_smiles(smiles)
    return None if canon is None else encode_canonical(canon, representation, verify)


def encode_canonical(canon: str, representation: str, verify: bool = True) -> str | None:
    """:func:`encode_molecule` for text that is already RDKit canonical SMILES (the cleaning pass has it), which
    saves one parse per molecule."""
    _check(representation)
    if representation == "smiles":
        return canon
    if representation == "kekule_smiles":
        return _kekule_smiles(canon, verify)
    safe_mod = _safe()
    try:
        with rdBase.BlockLogs():
            text = safe_mod.encode(canon, allow_empty=True)
    except Exception:
        return None
    if not text:
        return None
    if representation == "bracket_safe":
        try:
            text = safe_to_bracket(text)
        except ValueError:
            return None
    if verify and decode_to_smiles(text, representation, mode="strict") != canon:
        return None
    return text


def decode_to_smiles(text: str, representation: str, mode: str = "strict") -> str | None:
    """Generated text in ``representation`` -> canonical SMILES, or None if it is not a valid molecule.

    Args:
        text: the generated string (tokens joined without separators).
        representation: one of :data:`REPRESENTATIONS`.
        mode: ``strict`` (whole string, all fragments) or ``genmol`` (lenient; largest fragment), see the
            module docstring.
    """
    _check(representation, mode)
    if not isinstance(text, str):
        return None
    text = text.strip()
    if not text or any(c.isspace() for c in text):
        return None
    if representation in SMILES_FORMS:
        if mode == "strict":
            return canonical_smiles(text)
        mol = _parse(text)
        return None if mol is None else _to_smiles(largest_fragment(mol))
    if representation == "bracket_safe":
        try:
            text = bracket_to_safe(text)
        except ValueError:
            return None
    return _safe_decode_strict(text) if mode == "strict" else _safe_decode_genmol(text)
