"""Why a generated molecule string is invalid: one reason per string, for the metrics' ``invalid_*`` breakdown.

A small model's invalid SMILES fail in a few distinct ways, and they point at different fixes: an unclosed ring or
branch is a long-range pairing error of the sequence model, a valence or aromaticity error is local chemistry.
:func:`invalid_reason` names the first failure in the order a reader of the string meets them:

==================  ==========================================================================================
reason              meaning
==================  ==========================================================================================
``empty``           nothing was generated (blank text)
``syntax``          not SMILES grammar: unknown characters, whitespace inside, a dangling bond (``CC=``), a ring
                    bond that closes on its own atom (``C11``), a bracket atom RDKit rejects
``branch``          unbalanced parentheses (``CC(C``, ``CC)C``)
``ring``            a ring-closure label left open (``C1CC``)
``valence``         an atom with more bonds than its valence allows (RDKit ``AtomValenceException``)
``aromaticity``     aromatic atoms that cannot be kekulised, or an aromatic atom outside a ring
``other``           anything else the strict decoding refuses (e.g. a dummy atom ``*``, a SAFE string whose
                    attachment points do not pair up into one molecule)
==================  ==========================================================================================

SAFE text is SMILES text (fragments joined by ring-closure labels), so it is diagnosed the same way; bracket-SAFE is
converted to SAFE first. The reasons partition the invalid strings: their fractions add up to ``1 - validity``.
"""

from __future__ import annotations

from rdkit import Chem, rdBase

from insertion_diffusion.chem.convert import _ring_label, bracket_to_safe, decode_to_smiles, split_smiles

__all__ = ["INVALID_REASONS", "invalid_reason", "diagnose"]

INVALID_REASONS = ("empty", "syntax", "branch", "ring", "valence", "aromaticity", "other")
"""Every reason :func:`diagnose` can return, in a fixed order (the metric's state stores the position)."""

_PROBLEMS = {
    "AtomValenceException": "valence",
    "KekulizeException": "aromaticity",
    "AtomKekulizeException": "aromaticity",
}


def diagnose(text: str | None, representation: str = "smiles") -> str:
    """The reason ``text`` is not a molecule, assuming the strict decoding already refused it.

    Never returns "valid": a string that passes every check here (RDKit parses and sanitises it) but was refused
    by the caller's decoding is ``"other"``.
    """
    if text is None:
        return "empty"
    if not isinstance(text, str):
        raise TypeError(f"diagnose() takes the generated text as a str, got {type(text).__name__}")
    text = text.strip()
    if not text:
        return "empty"
    if any(c.isspace() for c in text):
        return "syntax"
    if representation == "bracket_safe":
        try:
            text = bracket_to_safe(text)
        except Exception:
            return "syntax"
    try:
        tokens = split_smiles(text)
    except ValueError:
        return "syntax"
    depth = 0
    for tok in tokens:
        depth += (tok == "(") - (tok == ")")
        if depth < 0:
            return "branch"
    if depth:
        return "branch"
    open_labels: set[int] = set()
    for tok in tokens:
        label = _ring_label(tok)
        if label is not None:
            open_labels ^= {label}  # a label opens a ring bond, its next use closes it, then it may be reused
    if open_labels:
        return "ring"
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(text, sanitize=False)
        if mol is None:
            return "syntax"
        mol.UpdatePropertyCache(strict=False)
        problems = Chem.DetectChemistryProblems(mol)
    for problem in problems:
        reason = _PROBLEMS.get(problem.GetType())
        if reason is not None:
            return reason
    return "other"


def invalid_reason(text: str | None, representation: str = "smiles") -> str | None:
    """None if ``text`` decodes strictly to a molecule, else the reason it does not (see :data:`INVALID_REASONS`)."""
    if decode_to_smiles(text, representation, "strict") is not None:
        return None
    return diagnose(text, representation)
