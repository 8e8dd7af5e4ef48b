"""SMILES canonicalisation, SAFE / bracket-SAFE round trips and strict vs GenMol decoding."""

from __future__ import annotations

import os
import random

import pytest
from rdkit import RDConfig

from insertion_diffusion.chem.convert import (
    REPRESENTATIONS,
    bracket_to_safe,
    canonical_smiles,
    decode_to_smiles,
    encode_molecule,
    safe_to_bracket,
    split_smiles,
)

pytest.importorskip("safe", reason="safe-mol is not installed")


def nci_smiles(n: int, seed: int = 0) -> list[str]:
    path = os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")
    with open(path) as f:
        smiles = [line.split("\t")[0] for line in f if line.strip()]
    return random.Random(seed).sample(smiles, n)


def test_canonical_smiles_is_canonical_and_keeps_stereo():
    assert canonical_smiles("OCC") == canonical_smiles("C(O)C") == "CCO"
    assert canonical_smiles("C1=CC=CC=C1") == "c1ccccc1"
    assert canonical_smiles("C[C@@H](O)CC") == "CC[C@@H](C)O"
    assert canonical_smiles("C[C@H](O)CC") == "CC[C@H](C)O"
    assert canonical_smiles("F/C=C/F") == "F/C=C/F"
    assert canonical_smiles("F/C=C\\F") == "F/C=C\\F"
    assert canonical_smiles("[Na+].[Cl-]") == "[Cl-].[Na+]"
    assert canonical_smiles("  CCO\r") == "CCO"


@pytest.mark.parametrize(
    "bad", ["", "   ", "C1CC", "C(C", "xyz", "c1cccc1", "CCO name", "*CC", "C%", "[Xx]", "CN(C)(C)(C)C"]
)
def test_invalid_strings_give_none(bad):
    assert canonical_smiles(bad) is None
    for rep in REPRESENTATIONS:
        assert encode_molecule(bad, rep) is None
        assert decode_to_smiles(bad, rep, "strict") is None


def test_non_string_gives_none():
    assert canonical_smiles(None) is None  # type: ignore[arg-type]
    assert decode_to_smiles(None, "smiles") is None  # type: ignore[arg-type]


@pytest.mark.parametrize("rep", REPRESENTATIONS)
def test_round_trip_on_nci(rep):
    smiles = nci_smiles(40)
    encoded = 0
    for smi in smiles:
        text = encode_molecule(smi, rep)
        if text is None:
            continue
        encoded += 1
        canon = canonical_smiles(smi)
        assert decode_to_smiles(text, rep, "strict") == canon
        assert "".join(split_smiles(text)) == text
        if rep == "bracket_safe":
            assert bracket_to_safe(text) and decode_to_smiles(bracket_to_safe(text), "safe") == canon
    assert encoded >= 38


def test_kekule_form_writes_aromatic_rings_with_alternating_bonds():
    assert encode_molecule("CC(=O)Oc1ccccc1C(=O)O", "kekule_smiles") == "CC(=O)OC1=CC=CC=C1C(=O)O"
    assert encode_molecule("c1ccc2[nH]ccc2c1", "kekule_smiles") == "C1=CC=C2NC=CC2=C1"
    assert decode_to_smiles("C1=CC=C2NC=CC2=C1", "kekule_smiles") == canonical_smiles("c1ccc2[nH]ccc2c1")
    assert decode_to_smiles("c1ccccc1", "kekule_smiles") == "c1ccccc1"  # aromatic text still decodes
    assert encode_molecule("not a molecule", "kekule_smiles") is None


def test_bracket_safe_form():
    smi = "S(SC1=NC2=CC=CC=C2S1)C3=NC4=C(S3)C=CC=C4"
    safe_text = encode_molecule(smi, "safe")
    bracket = encode_molecule(smi, "bracket_safe")
    assert "<1>" in bracket and "<2>" in bracket and "<3>" not in bracket
    assert safe_to_bracket(safe_text) == bracket
    # attachment labels are renumbered from 1; intra-fragment ring closures are untouched
    assert split_smiles(bracket).count("<1>") == 2
    assert decode_to_smiles(bracket, "bracket_safe") == canonical_smiles(smi)
    # GenMol writes two-digit labels as <%10>; both spellings decode
    assert bracket_to_safe("C<%10>.O<%10>") == bracket_to_safe("C<10>.O<10>") == "C%10.O%10"
    assert decode_to_smiles("C<10>.O<10>", "bracket_safe") == "CO"
    # a molecule SAFE cannot cut has no attachment points
    assert encode_molecule("c1ccccc1", "bracket_safe") == "c1ccccc1"


def test_strict_vs_genmol_on_disconnected_and_partly_invalid():
    # disconnected but valid: strict keeps every fragment, genmol keeps the largest
    assert decode_to_smiles("CCO.c1ccccc1", "smiles", "strict") == "CCO.c1ccccc1"
    assert decode_to_smiles("CCO.c1ccccc1", "smiles", "genmol") == "c1ccccc1"
    assert decode_to_smiles("CC.CCCC", "safe", "genmol") == "CCCC"
    # SMILES with an invalid part: both fail (there is no fragment-wise fixing for SMILES)
    assert decode_to_smiles("CCO.C1CC", "smiles", "genmol") is None
    full = "c1ccc2sc5nc2c1.c16nc2ccccc2s1.S5S6"
    whole = "c1ccc2sc(SSc3nc4ccccc4s3)nc2c1"
    assert decode_to_smiles(full, "safe", "strict") == whole
    assert decode_to_smiles(full, "safe", "genmol") == whole
    # an invalid extra fragment: strict fails, genmol drops it
    assert decode_to_smiles(full + ".C(((", "safe", "strict") is None
    assert decode_to_smiles(full + ".C(((", "safe", "genmol") == whole
    # an unmatched attachment point: strict fails, genmol caps it and keeps the largest piece
    partial = "c1ccc2sc5nc2c1.c16nc2ccccc2s1.S5"
    assert decode_to_smiles(partial, "safe", "strict") is None
    assert decode_to_smiles(partial, "safe", "genmol") == "Sc1nc2ccccc2s1"
    bracket = "c1ccc2sc<1>nc2c1.c1<2>nc2ccccc2s1.S<1>"
    assert decode_to_smiles(bracket, "bracket_safe", "strict") is None
    assert decode_to_smiles(bracket, "bracket_safe", "genmol") == "Sc1nc2ccccc2s1"
    assert decode_to_smiles("C<1", "bracket_safe", "genmol") is None


def test_unknown_representation_or_mode():
    with pytest.raises(ValueError, match="smiles.*safe.*bracket_safe"):
        encode_molecule("C", "selfies")
    with pytest.raises(ValueError, match="strict.*genmol"):
        decode_to_smiles("C", "smiles", mode="lenient")


def test_split_smiles_errors_name_position():
    expected = ["Cl", "[C@@H]", "1", "C", "C", "%12", "C", "Br", ".", "[Na+]"]
    assert split_smiles("Cl[C@@H]1CC%12CBr.[Na+]") == expected
    with pytest.raises(ValueError, match=r"'H' at position 1"):
        split_smiles("CH")
    # RDKit writes dative bonds for some metal complexes (one NCI molecule)
    assert split_smiles("C->[Fe+2]<-C") == ["C", "->", "[Fe+2]", "<-", "C"]
