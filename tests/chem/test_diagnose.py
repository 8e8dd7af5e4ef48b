"""Why an invalid molecule string is invalid: one hand-picked string per reason, for each representation."""

from __future__ import annotations

import pytest

from insertion_diffusion.chem.convert import encode_molecule
from insertion_diffusion.chem.diagnose import INVALID_REASONS, diagnose, invalid_reason

CASES = [
    ("", "empty"),
    ("   ", "empty"),
    ("CC O", "syntax"),  # whitespace inside
    ("CC=", "syntax"),  # dangling bond
    ("C11", "syntax"),  # ring bond onto its own atom
    ("CC&C", "syntax"),  # not a SMILES character
    ("[Xx]C", "syntax"),  # no such element
    ("CC(C", "branch"),
    ("CC)C", "branch"),
    ("C1CC(", "branch"),  # the branch is reported before the ring
    ("C1CC", "ring"),
    ("C1CC1C2CC", "ring"),  # label 1 closed, label 2 left open
    ("C%12CC", "ring"),
    ("C(C)(C)(C)(C)C", "valence"),
    ("O=O=O", "valence"),
    ("c1cccc1", "aromaticity"),  # five aromatic carbons cannot be kekulised
    ("cc", "aromaticity"),  # aromatic atoms outside a ring
    ("C*", "other"),  # a dummy atom parses and sanitises, but is not a molecule
]


@pytest.mark.parametrize(("text", "reason"), CASES)
def test_each_reason(text, reason):
    assert invalid_reason(text) == reason
    assert reason in INVALID_REASONS


@pytest.mark.parametrize("text", ["CCO", "c1ccccc1", "C1CC1C1CC1", "C%12CC%12", "CC(=O)Oc1ccccc1C(=O)O", "CCO.Cl"])
def test_valid_strings_have_no_reason(text):
    assert invalid_reason(text) is None


def test_safe_text_is_diagnosed_as_smiles():
    safe = encode_molecule("CC(=O)Oc1ccccc1C(=O)O", "safe")
    assert invalid_reason(safe, "safe") is None
    assert invalid_reason(safe + "(", "safe") == "branch"
    bracket = encode_molecule("CC(=O)Oc1ccccc1C(=O)O", "bracket_safe")
    assert invalid_reason(bracket, "bracket_safe") is None
    assert invalid_reason(bracket + "(", "bracket_safe") == "branch"


def test_diagnose_of_a_valid_string_is_other():
    # diagnose() assumes the caller's decoding refused the string; a sanitisable one is "other", never valid
    assert diagnose("CCO") == "other"


def test_none_is_empty_and_other_types_are_refused():
    assert invalid_reason(None) == "empty"
    with pytest.raises(TypeError, match="as a str, got int"):
        diagnose(42)
    with pytest.raises(ValueError, match="unknown representation 'selfies'"):
        invalid_reason("CCO", "selfies")
