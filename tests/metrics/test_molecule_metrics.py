"""Molecule metrics on small hand-checked sets, and exact equality of a 2-process (gloo) and a 1-process run."""

from __future__ import annotations

import itertools
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rdkit import Chem, DataStructs
from rdkit.Chem import rdFingerprintGenerator

from insertion_diffusion.chem import scoring
from insertion_diffusion.chem.convert import split_smiles
from insertion_diffusion.chem.diagnose import INVALID_REASONS
from insertion_diffusion.chem.tokenizer import RegexTokenizer
from insertion_diffusion.metrics.molecules import MoleculeGenerationMetrics, molecule_metrics

ETHANOL, BENZENE, ASPIRIN = "CCO", "c1ccccc1", "CC(=O)Oc1ccccc1C(=O)O"
L_ALA, D_ALA = "C[C@H](N)C(=O)O", "C[C@@H](N)C(=O)O"
IBUPROFEN, SALICYLIC = "CC(C)Cc1ccc(C(C)C(=O)O)cc1", "O=C(O)c1ccccc1O"  # QED >= 0.6 and SA <= 4

# (generated text, strict canonical SMILES, GenMol canonical SMILES)
ROWS = [
    ("CCO", ETHANOL, ETHANOL),
    ("OCC", ETHANOL, ETHANOL),  # another spelling: a duplicate
    ("C1=CC=CC=C1", BENZENE, BENZENE),  # Kekulé spelling of benzene
    (L_ALA, L_ALA, L_ALA),
    (D_ALA, D_ALA, D_ALA),  # stereoisomer: a different molecule
    (ASPIRIN, ASPIRIN, ASPIRIN),
    ("CC(C)Cc1ccc(cc1)C(C)C(=O)O", IBUPROFEN, IBUPROFEN),
    ("OC(=O)C(C)c1ccc(CC(C)C)cc1", IBUPROFEN, IBUPROFEN),  # the same high-quality molecule again
    (SALICYLIC, SALICYLIC, SALICYLIC),
    ("CC(C", None, None),  # unclosed branch
    ("C1CC", None, None),  # unclosed ring
    ("CCO.Cl", "CCO.Cl", ETHANOL),  # disconnected: strict keeps both fragments, GenMol the largest
    ("", None, None),  # empty generation
]
TRAIN = frozenset({ETHANOL, ASPIRIN})
TEXTS = [r[0] for r in ROWS]
TOKENIZER = RegexTokenizer.from_corpus(split_smiles(t) for t in TEXTS + ["c13ccccc14.CC2=O.C4(=O)O.O23"])


def ids(texts):
    return [TOKENIZER.encode(t) if t else [] for t in texts]


def values(metrics) -> dict[str, float]:
    return {k.split("/")[-1]: float(v) for k, v in metrics.compute().items()}


def qed_sa(smiles):
    mol = Chem.MolFromSmiles(smiles)
    return scoring.qed(mol), scoring.sa_score(mol)


def rdkit_diversity(smiles):
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=1024)
    fps = [gen.GetFingerprint(Chem.MolFromSmiles(s)) for s in smiles]
    sims = [DataStructs.TanimotoSimilarity(a, b) for a, b in itertools.combinations(fps, 2)]
    return 1.0 - sum(sims) / len(sims)


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def test_hand_computed_values():
    m = molecule_metrics("val/", TOKENIZER, "smiles", TRAIN)
    m.update(ids(TEXTS[:5]), [], [], index=torch.arange(5))
    m.update(ids(TEXTS[5:]), [], [], index=torch.arange(5, len(TEXTS)))
    out = values(m)
    assert set(out) == {
        "num_generated", "validity", "validity_genmol", "uniqueness", "uniqueness_genmol", "novelty",
        "novelty_genmol", "qed", "qed_genmol", "sa", "sa_genmol", "quality", "quality_genmol", "diversity",
        "diversity_genmol", *(f"invalid_{r}" for r in INVALID_REASONS),
    }  # fmt: skip
    strict = [s for _, s, _ in ROWS if s]  # 10 valid rows
    genmol = [g for _, _, g in ROWS if g]
    u_strict = {ETHANOL, BENZENE, L_ALA, D_ALA, ASPIRIN, IBUPROFEN, SALICYLIC, "CCO.Cl"}
    u_genmol = u_strict - {"CCO.Cl"}
    assert set(strict) == u_strict and set(genmol) == u_genmol
    assert out["num_generated"] == 13
    assert out["validity"] == f32(10 / 13) and out["validity_genmol"] == f32(10 / 13)
    # the three invalid rows: an unclosed branch, an unclosed ring, an empty generation
    reasons = {r: out[f"invalid_{r}"] for r in INVALID_REASONS}
    assert reasons == {"empty": f32(1 / 13), "syntax": 0.0, "branch": f32(1 / 13), "ring": f32(1 / 13),
                       "valence": 0.0, "aromaticity": 0.0, "other": 0.0}  # fmt: skip
    assert out["uniqueness"] == f32(8 / 10)  # ethanol x2 (+ spelling), ibuprofen x2
    assert out["uniqueness_genmol"] == f32(7 / 10)  # CCO.Cl -> ethanol is one more duplicate
    assert out["novelty"] == f32(6 / 8)  # ethanol, aspirin are training molecules
    assert out["novelty_genmol"] == f32(5 / 7)
    # quality: ibuprofen and salicylic acid, each counted once, over all 13 generated rows
    assert out["quality"] == f32(2 / 13) and out["quality_genmol"] == f32(2 / 13)
    assert out["qed"] == pytest.approx(sum(qed_sa(s)[0] for s in strict) / 10, abs=1e-6)
    assert out["sa"] == pytest.approx(sum(qed_sa(s)[1] for s in strict) / 10, abs=1e-6)
    assert out["qed_genmol"] == pytest.approx(sum(qed_sa(s)[0] for s in genmol) / 10, abs=1e-6)
    assert out["diversity"] == pytest.approx(rdkit_diversity(sorted(u_strict)), abs=1e-6)
    assert out["diversity_genmol"] == pytest.approx(rdkit_diversity(sorted(u_genmol)), abs=1e-6)


def test_aspirin_alone():
    m = molecule_metrics("", TOKENIZER, "smiles")
    m.update(ids([ASPIRIN]), [], [])
    out = values(m)
    assert out["qed"] == pytest.approx(0.5501, abs=5e-5) and out["sa"] == pytest.approx(1.58, abs=5e-3)
    assert out["quality"] == 0.0  # QED 0.55 < 0.6
    assert "novelty" not in out and "fcd" not in out
    assert math.isnan(out["diversity"])  # one molecule: no pair


def test_quality_counts_unique_molecules_once():
    m = molecule_metrics("", TOKENIZER, "smiles")
    m.update(ids([IBUPROFEN, "OC(=O)C(C)c1ccc(CC(C)C)cc1", IBUPROFEN, "CC(C"]), [], [])
    out = values(m)
    assert out["quality"] == 0.25  # xlm-core's duplicate-counting formula would give 3/4
    assert out["uniqueness"] == f32(1 / 3) and out["validity"] == 0.75


def test_padded_duplicate_index_is_dropped():
    m = molecule_metrics("", TOKENIZER, "smiles", TRAIN)
    m.update(ids([BENZENE, ASPIRIN, "CC(C"]), [], [], index=[0, 1, 2])
    # A DistributedSampler repeats row 0 to pad the last batch: the repeat (whatever was generated) is dropped.
    m.update(ids([SALICYLIC, IBUPROFEN]), [], [], index=[3, 0])
    out = values(m)
    assert out["num_generated"] == 4
    assert out["validity"] == 0.75 and out["uniqueness"] == 1.0
    assert out["novelty"] == f32(2 / 3) and out["quality"] == 0.25  # salicylic acid only, not the dropped ibuprofen


def test_without_index_rows_are_never_deduplicated():
    m = molecule_metrics("", TOKENIZER, "smiles")
    m.update(ids([BENZENE, BENZENE]), [], [])
    m.update(ids([BENZENE]), [], [])
    out = values(m)
    assert out["num_generated"] == 3 and out["uniqueness"] == f32(1 / 3)
    m.reset()
    m.update(ids([BENZENE]), [], [])
    assert values(m)["num_generated"] == 1


def test_safe_strict_versus_genmol_validity():
    # aspirin as SAFE; one fragment with open attachment points (strict: invalid; GenMol: capped -> benzene);
    # a broken string (invalid for both).
    texts = ["c13ccccc14.CC2=O.C4(=O)O.O23", "c13ccccc14", "CC(C"]
    m = molecule_metrics("", TOKENIZER, "safe")
    m.update(ids(texts), [], [])
    out = values(m)
    assert out["validity"] == f32(1 / 3) and out["validity_genmol"] == f32(2 / 3)
    assert out["uniqueness_genmol"] == 1.0
    assert out["qed_genmol"] == pytest.approx((qed_sa(ASPIRIN)[0] + qed_sa(BENZENE)[0]) / 2, abs=1e-6)


def test_pooled_flush_gives_the_same_values(monkeypatch):
    serial = molecule_metrics("", TOKENIZER, "smiles", TRAIN)
    serial.update(ids(TEXTS), [], [], index=list(range(len(TEXTS))))
    expected = values(serial)
    real = scoring.resolve_jobs  # pool even for a handful of rows
    monkeypatch.setattr(scoring, "resolve_jobs", lambda n_jobs, n_items, min_per_job=1: real(n_jobs, n_items, 1))
    pooled = molecule_metrics("", TOKENIZER, "smiles", TRAIN, n_jobs=2, flush_rows=5)
    for start in range(0, len(TEXTS), 3):
        pooled.update(ids(TEXTS[start : start + 3]), [], [], index=list(range(start, min(start + 3, len(TEXTS)))))
    metric = pooled["molecules"]
    assert len(metric.mol_rows) == 2 and len(metric._pending_texts) == 1  # two flushes of 6 rows, 1 row held back
    got = values(pooled)
    assert all(got[k] == expected[k] or (math.isnan(got[k]) and math.isnan(expected[k])) for k in expected)


def test_smiles_genmol_shortcut_matches_convert():
    from insertion_diffusion.chem.convert import decode_to_smiles
    from insertion_diffusion.metrics.molecules import decode_texts

    texts = TEXTS + ["Cl.CCO", "[Na+].[O-]C(=O)c1ccccc1", "C.C", "c1ccccc1.", ".", "CC(C)(C)(C)(C)C"]
    strict, genmol = decode_texts(texts, "smiles")
    assert strict == [decode_to_smiles(t, "smiles", "strict") for t in texts]
    assert genmol == [decode_to_smiles(t, "smiles", "genmol") for t in texts]


def test_empty_and_all_invalid():
    m = molecule_metrics("", TOKENIZER, "smiles", TRAIN)
    out = values(m)
    assert out["num_generated"] == 0 and out["validity"] == 0.0 and math.isnan(out["qed"])
    assert all(out[f"invalid_{r}"] == 0.0 for r in INVALID_REASONS)
    m.update(ids(["CC(C", ""]), [], [])
    out = values(m)
    assert out["validity"] == 0.0 and out["uniqueness"] == 0.0 and out["novelty"] == 0.0
    assert out["invalid_branch"] == 0.5 and out["invalid_empty"] == 0.5
    assert math.isnan(out["qed"]) and math.isnan(out["diversity"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="representation"):
        MoleculeGenerationMetrics(TOKENIZER, "selfies")
    with pytest.raises(ValueError, match="tokenizer"):
        molecule_metrics("val/")
    with pytest.raises(FileNotFoundError, match="FCD reference file not found"):
        molecule_metrics("val/", TOKENIZER, "smiles", fcd_reference="no/such/reference.smi")
    m = MoleculeGenerationMetrics(TOKENIZER, "smiles")
    with pytest.raises(ValueError, match="2 generations but 1 indices"):
        m.update(ids([BENZENE, BENZENE]), [], [], index=[0])


# --- distributed ---------------------------------------------------------------------------------------
# 15 rows on 2 ranks the way a DistributedSampler (shuffle=False) deals them: rank r takes rows r, r + 2, ...
# of the index list padded to 16 with row 0 again; each rank updates in batches of 3 (uneven last batches).
DDP_TEXTS = TEXTS + ["CCN(CC)CC", ETHANOL]
FCD_REF = [ASPIRIN, IBUPROFEN, SALICYLIC, BENZENE, "CCN(CC)CC", "c1ccncc1", "CC(=O)Nc1ccc(O)cc1", "CCCCO"]


def _make_metric():
    return molecule_metrics("test/", TOKENIZER, "smiles", TRAIN, fcd_reference=FCD_REF)


def _rank_rows(rank: int, world: int) -> list[int]:
    order = list(range(len(DDP_TEXTS)))
    padded = order + order[: (-len(order)) % world]
    return padded[rank::world]


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        m = _make_metric()
        rows = _rank_rows(rank, world)
        for start in range(0, len(rows), 3):
            batch = rows[start : start + 3]
            texts = [DDP_TEXTS[i] for i in batch]
            if rank == 1 and start + 3 >= len(rows):
                texts[-1] = IBUPROFEN  # the padded repeat of row 0 was sampled with another seed
            m.update(ids(texts), [], [], index=torch.tensor(batch))
        out = {k: v.item() for k, v in m.compute().items()}
        # A rank that saw no rows at all still takes part in the gather.
        lonely = _make_metric()
        if rank == 0:
            lonely.update(ids(DDP_TEXTS), [], [], index=list(range(len(DDP_TEXTS))))
        out_lonely = {k: v.item() for k, v in lonely.compute().items()}
        queue.put((rank, (out, out_lonely)))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process():
    pytest.importorskip("fcd_torch")
    single = _make_metric()
    for start in range(0, len(DDP_TEXTS), 4):  # a different batch split on purpose
        rows = list(range(start, min(start + 4, len(DDP_TEXTS))))
        single.update(ids([DDP_TEXTS[i] for i in rows]), [], [], index=rows)
    expected = {k: v.item() for k, v in single.compute().items()}
    assert expected["test/num_generated"] == len(DDP_TEXTS) == 15
    assert "test/fcd" in expected and expected["test/fcd_n"] == 12
    assert expected["test/fcd_ref_n"] == len([s for s in FCD_REF if s])

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), queue), nprocs=2, join=True, start_method="spawn")
    results = dict(queue.get() for _ in range(2))
    assert _rank_rows(1, 2)[-1] == 0  # rank 1 really did see the padded repeat of row 0
    for rank, which in itertools.product((0, 1), (0, 1)):  # the normal metric, then the one rank 1 never fed
        got = results[rank][which]
        assert got.keys() == expected.keys()
        mismatched = {k: (got[k], expected[k]) for k in expected if not _same(got[k], expected[k])}
        assert not mismatched, f"rank {rank}, metric {which}: {mismatched}"


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))
