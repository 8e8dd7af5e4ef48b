"""MoleculeDataModule: bad inputs and exact drop counts, splits and subsets, cache reuse/rebuild, batches, CLI."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_helpers import run_cli

import insertion_diffusion.cli as cli_mod
from insertion_diffusion.chem.convert import canonical_smiles, decode_to_smiles
from insertion_diffusion.chem.tokenizer import RegexTokenizer
from insertion_diffusion.data import MoleculeDataModule
from insertion_diffusion.data.base import encode_rows
from insertion_diffusion.data.corpus import DROP_REASONS, clean_molecules, read_corpus
from insertion_diffusion.data.molecules import layout_rows, nci_path

ROOT = Path(__file__).resolve().parents[2]
# molecules over a handful of common tokens, so that no validation/test molecule has a token training lacks
GOOD = [
    "CCN", "CCCC", "C1CCCCC1", "CC(C)O", "OCCO", "CCOC", "C=CC", "CC(=O)O", "NCCN", "CCCN", "CC(C)C", "CCCCO",
    "C1CCOC1", "C1CCNCC1", "CC(N)=O", "CCC=O", "OC1CCCC1", "CC(C)(C)O", "NCC(=O)O", "COC=O",
]
# a more varied set (aromatics, halogens, stereo, salts) where exact counts are not asserted
VARIED = [
    "c1ccccc1", "CC(=O)Nc1ccc(O)cc1", "C[C@@H](N)C(=O)O", "F/C=C/F", "CCCl", "CCBr", "c1ccncc1", "CC#N",
    "c1ccoc1", "[Na+].[Cl-]", "O=C(O)c1ccccc1O", "CN1CCN(c2ccc(Cl)cc2)CC1", "COc1ccc(CCN)cc1", *GOOD,
]


def counts(**nonzero: int) -> dict[str, int]:
    out = dict.fromkeys(DROP_REASONS, 0)
    out.update(nonzero)
    return out


def write(path: Path, lines: list[bytes], newline: bytes = b"\n", final_newline: bool = True) -> Path:
    data = newline.join(lines) + (newline if final_newline else b"")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def make(tmp_path: Path, corpus: Path, **kwargs) -> MoleculeDataModule:
    args = {"source": "path", "path": str(corpus), "cache_dir": str(tmp_path / "cache"), "val_size": 2,
            "test_size": 2, "num_proc": 1, "batch_size": 4, **kwargs}
    return MoleculeDataModule(**args)


# --- bad inputs ------------------------------------------------------------------------------------------
def test_every_bad_line_is_counted_exactly(tmp_path):
    lines = [
        b"smiles name",  # header
        b"CCO ethanol",
        b"",  # blank
        b"   \t ",  # blank (whitespace only)
        b"OCC ethanol-again",  # duplicate of CCO
        b"C1CC broken-ring",  # unparsable
        b"\xff\xfe\xfa not-utf8",  # not_utf8
        b"C" * 10_000,  # a 10,000-character line: a valid alkane, far too long
        b"Xx" * 5_000,  # a 10,000-character line that is not a molecule
        *[s.encode() + b" mol" for s in GOOD],
    ]
    corpus = write(tmp_path / "mols.smi", lines, newline=b"\r\n", final_newline=False)
    dm = make(tmp_path, corpus)
    assert dm.drop_counts == counts(header=1, blank=2, duplicate=1, unparsable=2, not_utf8=1, too_long=1)
    kept = 1 + len(GOOD)
    assert sum(dm.split_sizes.values()) == kept
    assert dm.split_sizes == {"train": kept - 4, "val": 2, "test": 2}
    manifest = json.loads((dm.cache_dir / "manifest.json").read_text())
    assert manifest["counts"] == dm.drop_counts
    assert manifest["lines_read"] == {"mols.smi": len(lines)}
    # every kept molecule is canonical, once
    texts = [t for s in ("train", "val", "test") for t in dm.split_texts(s)]
    assert sorted(texts) == sorted({canonical_smiles(s) for s in ["CCO", *GOOD]})


def test_read_corpus_handles_crlf_bom_and_bad_bytes(tmp_path):
    corpus = write(tmp_path / "a.txt", [b"\xef\xbb\xbfCCO", b"CCN\r", b"\x80", b"", b"CCC"])
    out = read_corpus(str(corpus))
    assert out.smiles == ["CCO", "CCN", "CCC"] and out.lines == [1, 2, 5]
    assert out.counts == counts(not_utf8=1, blank=1)
    assert out.header is None


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"", "is empty"), (b"\n\n   \n", "is empty"), (b"\xff\xfe\n\xfa\n", "no readable line")],
)
def test_empty_or_unreadable_file_is_a_clear_error(tmp_path, content, match):
    corpus = tmp_path / "empty.smi"
    corpus.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        make(tmp_path, corpus)
    assert str(corpus) in str(info.value)


def test_nothing_valid_is_a_clear_error(tmp_path):
    corpus = write(tmp_path / "bad.smi", [b"SMILES", b"C1CC", b"c1cccc1", b"N(C)(C)(C)(C)C"])
    with pytest.raises(ValueError, match=r"no molecule remains after cleaning.*header=1, unparsable=3") as info:
        make(tmp_path, corpus)
    assert "data.column" in str(info.value) and "bad.smi" in str(info.value)
    long_only = write(tmp_path / "long.smi", [b"C" * 200, b"C" * 300])
    with pytest.raises(ValueError, match=r"too_long=2.*raise data.max_tokens"):
        make(tmp_path, long_only)


def test_too_small_corpus_names_the_sizes(tmp_path):
    corpus = write(tmp_path / "few.smi", [s.encode() for s in GOOD[:4]])
    with pytest.raises(ValueError, match=r"only 4 molecules remain.*= 4 of them are held out"):
        make(tmp_path, corpus)


def test_tables_with_header_column_names_and_gzip(tmp_path):
    rows = [b"id,SMILES,score", *[f"m{i},{s},0.5".encode() for i, s in enumerate(GOOD)]]
    csv_dm = make(tmp_path, write(tmp_path / "t.csv.gz", rows))
    assert csv_dm.drop_counts == counts(header=1)
    tsv = write(tmp_path / "t.tsv", [b"name\tmol", *[f"m{i}\t{s}".encode() for i, s in enumerate(GOOD)]])
    assert make(tmp_path, tsv, column="mol").drop_counts == counts(header=1)
    assert make(tmp_path, tsv, column=1).drop_counts == counts(header=1)
    with pytest.raises(ValueError, match=r"column 'smiles_col' is not in the first line.*\['name', 'mol'\]"):
        make(tmp_path, tsv, column="smiles_col")
    headerless = write(tmp_path / "h.csv", [f"{s},x".encode() for s in GOOD])
    assert make(tmp_path, headerless).drop_counts == counts()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "zinc"}, r"data\.source.*'nci', 'moses', 'path'"),
        ({"representation": "selfies"}, r"data\.representation.*'smiles', 'kekule_smiles', 'safe', 'bracket_safe'"),
        ({"val_size": -1}, r"data\.val_size must be >= 0"),
        ({"train_size": 0}, r"data\.train_size must be >= 1"),
        ({"max_tokens": 0}, r"data\.max_tokens must be >= 1"),
        ({"max_length": 1}, r"data\.max_length must be >= 2"),
        ({"num_proc": 0}, r"data\.num_proc must be >= 1"),
        ({"column": -2}, r"data\.column must be"),
        ({"source": "nci"}, r"data\.path is only used with data\.source: path"),
    ],
)
def test_bad_settings_name_the_key(tmp_path, kwargs, match):
    corpus = write(tmp_path / "ok.smi", [s.encode() for s in GOOD])
    with pytest.raises(ValueError, match=match):
        make(tmp_path, corpus, **kwargs)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.path .*nope\.smi"):
        make(tmp_path, tmp_path / "nope.smi")
    with pytest.raises(ValueError, match=r"unsupported file type '\.sdf'.*\.smi"):
        make(tmp_path, write(tmp_path / "x.sdf", [b"CCO"]))
    with pytest.raises(ValueError, match=r"data\.path is not set"):
        MoleculeDataModule(source="path", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not a readable gzip"):
        bad = tmp_path / "x.smi.gz"
        bad.write_bytes(b"not gzip")
        make(tmp_path, bad)


# --- splits and tokens ---------------------------------------------------------------------------------------
def test_unknown_tokens_in_eval_splits_are_dropped_and_reported(tmp_path):
    corpus = write(tmp_path / "si.smi", [*(s.encode() for s in GOOD), b"C[Si](C)(C)C tms"])
    for seed in range(40):
        dm = make(tmp_path, corpus, seed=seed, val_size=5, test_size=5)
        if dm.drop_counts["unknown_token"]:
            break
    else:
        pytest.fail("the [Si] molecule never landed in val/test")
    assert dm.drop_counts == counts(unknown_token=1)
    first = dm.manifest["unknown_token_first"]
    assert first["line"] == f"si.smi:{len(GOOD) + 1}" and first["tokens"] == ["[Si]"]
    assert dm.split_sizes["val"] + dm.split_sizes["test"] == 9
    assert "[Si]" not in dm.tokenizer.tokens


def test_random_subsets_differ_from_head_and_are_seeded(tmp_path):
    with open(nci_path()) as f:
        head = [next(f) for _ in range(400)]
    corpus = tmp_path / "nci400.smi"
    corpus.write_text("".join(head))
    first = [canonical_smiles(line.split("\t")[0]) for line in head[:60]]
    dm = make(tmp_path, corpus, train_size=40, val_size=10, test_size=10)
    # held-out molecules with a token the 40 training molecules lack are dropped, not replaced
    assert dm.split_sizes["train"] == 40
    assert dm.split_sizes["val"] + dm.split_sizes["test"] + dm.drop_counts["unknown_token"] == 20
    train = set(dm.split_texts("train"))
    assert train != set(first[:40]) and len(train - set(first)) > 20
    again = make(tmp_path, corpus, train_size=40, val_size=10, test_size=10)
    assert set(again.split_texts("train")) == train
    other = make(tmp_path, corpus, train_size=40, val_size=10, test_size=10, seed=7)
    assert set(other.split_texts("train")) != train
    # test and val are drawn first: a different train_size leaves them unchanged (up to unknown-token drops,
    # which depend on the training vocabulary)
    bigger = make(tmp_path, corpus, train_size=80, val_size=10, test_size=10)
    for split in ("val", "test"):
        assert set(dm.split_texts(split)) <= set(bigger.split_texts(split))
    # the splits are disjoint and train_canonical is the training split
    assert not (train & set(dm.split_texts("test"))) and not (train & set(dm.split_texts("val")))
    assert dm.train_canonical == frozenset(train)
    # only the lines needed were examined
    assert dm.manifest["lines_examined"]["nci400.smi"] < 400


def test_nci_defaults_and_max_length(tmp_path):
    dm = MoleculeDataModule(cache_dir=str(tmp_path), num_proc=1)
    assert dm.source == "nci" and dm.representation == "smiles"
    assert isinstance(dm.tokenizer, RegexTokenizer)
    # first_5K.smi has 4,999 lines (ids are not contiguous); every one is kept or counted
    assert dm.manifest["lines_read"] == {"first_5K.smi": 4999}
    assert sum(dm.split_sizes.values()) + sum(dm.drop_counts.values()) == 4999
    assert dm.split_sizes["val"] <= 1000 and dm.split_sizes["test"] <= 1000
    assert dm.max_length % 8 == 0 and dm.max_length >= int(dm.train_lengths.max()) + 1
    assert dm.max_length <= 136  # max_tokens 128 + EOS, rounded up
    assert dm.train_lengths.dtype == torch.long and len(dm.train_lengths) == dm.split_sizes["train"]
    assert isinstance(dm.train_canonical, frozenset) and len(dm.train_canonical) == dm.split_sizes["train"]
    assert dm.hparams["max_length"] == dm.max_length
    short = MoleculeDataModule(cache_dir=str(tmp_path), num_proc=1, max_length=40)
    assert short.max_length == 40 and int(short.train_lengths.max()) <= 39
    assert short.drop_counts["too_long"] > dm.drop_counts["too_long"]


def test_batches_match_encode_rows(tmp_path):
    corpus = write(tmp_path / "b.smi", [s.encode() for s in VARIED])
    dm = make(tmp_path, corpus)
    dm.setup()
    for split in ("train", "val", "test"):
        texts = dm.split_texts(split)
        expected = dm.encode_texts(texts)
        ds = dm.datasets[split]
        for i in range(len(ds)):
            item = ds[i]
            for key in ("input_ids", "fixed", "attention_mask"):
                assert torch.equal(item[key], expected[key][i]), (split, key, i)
            assert int(item["index"]) == i
            assert dm.tokenizer.decode(item["input_ids"]) == texts[i]
    lengths = [len(dm.tokenizer.tokenize(t)) for t in dm.split_texts("train")]
    assert dm.train_lengths.tolist() == lengths
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (4, dm.max_length)
    assert batch["fixed"].dtype == torch.bool and batch["attention_mask"].dtype == torch.bool
    assert (batch["fixed"].sum(1) == 1).all()  # EOS only: the prompt is empty


def test_layout_rows_equals_encode_rows():
    tok = RegexTokenizer(["C", "O", "N"])
    targets = [[4, 5], [6], [4, 4, 4, 5]]
    flat = np.array([t for row in targets for t in row], dtype=np.int16)
    lengths = np.array([len(r) for r in targets])
    ids = layout_rows(flat, lengths, 6, tok.pad_id, tok.eos_id)
    ref = encode_rows([[] for _ in targets], targets, tok, 6, bos=False)["input_ids"]
    assert ids.dtype == np.int16 and torch.equal(torch.from_numpy(ids).long(), ref)


@pytest.mark.parametrize("representation", ["safe", "bracket_safe", "kekule_smiles"])
def test_safe_representations(tmp_path, representation):
    if representation != "kekule_smiles":
        pytest.importorskip("safe")
    corpus = write(tmp_path / "s.smi", [s.encode() for s in VARIED])
    dm = make(tmp_path, corpus, representation=representation)
    assert dm.representation == representation
    texts = []
    for split in ("train", "val", "test"):
        for line in (dm.cache_dir / f"{split}.tsv").read_text().splitlines():
            text, canon, _ = line.split("\t")
            assert decode_to_smiles(text, representation) == canon
            texts.append(text)
    assert sum(dm.split_sizes.values()) + dm.drop_counts["unknown_token"] == len(VARIED)
    if representation == "bracket_safe":
        assert any("<1>" in t for t in texts)
    if representation == "kekule_smiles":  # aromatic rings written with alternating bonds: no aromatic atom token
        assert any("=" in t for t in texts) and not {"c", "n", "o", "s"} & set(dm.tokenizer.tokens)
        assert any(decode_to_smiles(t, "kekule_smiles").count("c") for t in texts)  # decoded back to aromatic


def test_parallel_cleaning_gives_the_same_result():
    with open(nci_path()) as f:
        smiles = [next(f).split("\t")[0] for _ in range(300)]
    one = clean_molecules(smiles, "smiles", 64, num_proc=1)
    two = clean_molecules(smiles, "smiles", 64, num_proc=2, min_parallel=0)
    assert one == two


# --- cache ---------------------------------------------------------------------------------------------------
def test_cache_is_reused(tmp_path, monkeypatch):
    corpus = write(tmp_path / "c.smi", [s.encode() for s in GOOD])
    first = make(tmp_path, corpus)
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.cache_dir.iterdir()}

    def no_build(self, identity):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(MoleculeDataModule, "_build", no_build)
    again = make(tmp_path, corpus, batch_size=8, num_proc=2)  # loader settings do not invalidate the cache
    assert again.cache_dir == first.cache_dir and again.tokenizer == first.tokenizer
    assert again.drop_counts == first.drop_counts and again.train_canonical == first.train_canonical
    assert torch.equal(again.train_lengths, first.train_lengths)
    assert {p.name: p.stat().st_mtime_ns for p in again.cache_dir.iterdir()} == mtimes
    again.setup("fit")
    assert len(again.datasets["train"]) == first.split_sizes["train"]


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda root, src: (root / "train.tsv").write_text("CC\tCC\tx:1\n"), "does not match its sha256"),
        (lambda root, src: (root / "val.ids.npy").unlink(), "val.ids.npy is missing"),
        (lambda root, src: (root / "manifest.json").write_text("{not json"), "manifest.json is unreadable"),
        (lambda root, src: src.write_bytes(src.read_bytes() + b"CCCCO\n"), "source file changed"),
    ],
)
def test_cache_is_rebuilt_when_stale_or_corrupt(tmp_path, damage, why):
    corpus = write(tmp_path / "c.smi", [s.encode() for s in GOOD])
    first = make(tmp_path, corpus)
    damage(first.cache_dir, corpus)
    with pytest.warns(UserWarning, match=f"rebuilding the cache.*{why}"):
        again = make(tmp_path, corpus)
    assert again.tokenizer.vocab_size >= first.tokenizer.vocab_size
    assert make(tmp_path, corpus).drop_counts == again.drop_counts  # and the rebuilt cache is valid


def test_unwritable_cache_dir_is_a_clear_error(tmp_path):
    corpus = write(tmp_path / "c.smi", [s.encode() for s in GOOD])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="choose a writable data.cache_dir"):
        make(tmp_path, corpus, cache_dir=str(blocker / "sub"))


# --- metrics and CLI -------------------------------------------------------------------------------------
def test_make_metrics(tmp_path):
    pytest.importorskip("insertion_diffusion.metrics.molecules")
    dm = make(tmp_path, write(tmp_path / "m.smi", [s.encode() for s in GOOD]))
    metrics = dm.make_metrics("val/")
    ids = [dm.tokenizer.encode(t) for t in dm.split_texts("val")]
    metrics.update(ids, ids, [[] for _ in ids])
    values = metrics.compute()
    assert float(values["val/validity"]) == 1.0


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["insertion-diffusion"])
    config = str(ROOT / "configs" / "molecules" / "nci_flexmdm.yaml")
    empty = tmp_path / "empty.smi"
    empty.write_bytes(b"")
    cases = [
        (["--data.init_args.source", "zinc"], "data.source"),
        (["--data.init_args.source", "path", "--data.init_args.path", str(tmp_path / "nope.smi")], "nope.smi"),
        (["--data.init_args.source", "path", "--data.init_args.path", str(empty)], "is empty"),
    ]
    for extra, expected in cases:
        with pytest.raises(SystemExit) as info:
            cli_mod.main(["fit", "--config", config, "--data.init_args.cache_dir", str(tmp_path), *extra])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("insertion-diffusion: error:") and expected in err[-1]
        assert "Traceback" not in "\n".join(err)


def test_tiny_fit_on_nci_through_the_cli(tmp_path):
    config = ROOT / "configs" / "molecules" / "nci_flexmdm.yaml"
    run_cli(
        [
            "fit", "--config", str(config), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
            "--trainer.val_check_interval", "2", "--data.init_args.cache_dir", str(tmp_path / "cache"),
            "--data.init_args.val_size", "8", "--data.init_args.test_size", "8",
            "--data.init_args.eval_batch_size", "8", "--model.init_args.sampler.steps", "4",
        ],
        cwd=tmp_path,
    )
    ckpts = list((tmp_path / "runs").rglob("last.ckpt"))
    assert ckpts
    # the cleaning record is logged with the run: drop counts by reason and split sizes
    (hparams,) = list((tmp_path / "runs").rglob("hparams.yaml"))
    logged = yaml.safe_load(hparams.read_text(encoding="utf-8"))
    manifest = json.loads(next((tmp_path / "cache").rglob("manifest.json")).read_text(encoding="utf-8"))
    assert logged["drop_counts"] == manifest["counts"] and set(manifest["counts"]) == set(DROP_REASONS)
    assert logged["split_sizes"] == manifest["sizes"] and logged["split_sizes"]["val"] == 8
    # the config's MoleculeSampleLogger scored the validation at step 2 and drew what was valid
    (samples,) = list((tmp_path / "runs").rglob("samples/val_step2.csv"))
    with open(samples, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert 0 < len(rows) <= 8 and {"smiles", "valid_strict", "qed"} <= set(rows[0])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(samples.parent.parent), size_guidance={"images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "val/length_generated" in tags["histograms"]
    # a grid image when a sample was valid, else a text note saying none was
    assert "val/molecules" in tags["images"] or "val/molecules/text_summary" in tags["tensors"]

    # predict: de novo records carry the decoded SMILES and provenance, and no (meaningless) reference
    out = tmp_path / "pred.jsonl"
    run_cli(
        [
            "predict", "--config", str(config), "--ckpt_path", str(ckpts[0]),
            "--data.init_args.cache_dir", str(tmp_path / "cache"), "--data.init_args.val_size", "8",
            "--data.init_args.test_size", "8", "--data.init_args.eval_batch_size", "8",
            "--model.init_args.sampler.steps", "4", "--predictions.output_path", str(out),
        ],
        cwd=tmp_path,
    )
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 8
    for rec in records:
        assert rec["prompt"] == "" and "reference" not in rec
        assert {"generated", "smiles", "smiles_genmol", "provenance"} <= set(rec)
        assert rec["provenance"]["checkpoint"] == str(ckpts[0])


def test_fcd_reference_test_split_reaches_the_test_metrics_only(tmp_path):
    from insertion_diffusion.data.molecules import MoleculeDataModule

    dm = MoleculeDataModule(source="nci", train_size=64, val_size=8, test_size=16, cache_dir=str(tmp_path),
                            fcd_reference="test")
    test_metric = dm.make_metrics("test/")["molecules"]
    val_metric = dm.make_metrics("val/")["molecules"]
    assert val_metric.fcd_reference is None
    assert isinstance(test_metric.fcd_reference, list) and 0 < len(test_metric.fcd_reference) <= 16
    with pytest.raises(ValueError, match="data.fcd_reference"):
        MoleculeDataModule(source="nci", cache_dir=str(tmp_path), fcd_reference="/no/such/file.smi")


def test_smiles_column_digest_ignores_layout_but_not_molecules():
    from insertion_diffusion.data.molecules import smiles_column_digest

    plain = b"SMILES\nCCO\nc1ccccc1\n"
    same = [b"SMILES\r\nCCO\r\nc1ccccc1\r\n", b"SMILES,SPLIT\nCCO,train\nc1ccccc1,train\n\n", plain.rstrip(b"\n")]
    assert all(smiles_column_digest(v) == smiles_column_digest(plain) for v in same)
    assert smiles_column_digest(plain)[0] == 2
    assert smiles_column_digest(b"SMILES\nCCN\nc1ccccc1\n") != smiles_column_digest(plain)
    assert smiles_column_digest(b"SMILES\nc1ccccc1\nCCO\n") != smiles_column_digest(plain)  # order matters


def test_public_csv_route_checks_rows_and_the_smiles_digest(tmp_path, monkeypatch):
    """The URL fallback (no network here: urlopen is replaced by canned bytes) keeps a file whose SMILES column
    matches the pin and rejects, and deletes, one with the right row count but other molecules."""
    import io
    import urllib.request

    from insertion_diffusion.data import molecules as mod

    good = b"SMILES,SPLIT\r\nCCO,train\r\nc1ccccc1,train\r\n"
    spec = {"member": "x/train.csv.gz", "sha256": "0" * 64, "url": "https://example.invalid/train.csv",
            "rows": 2, "smiles_sha256": mod.smiles_column_digest(good)[1]}
    monkeypatch.setattr(mod, "MOSES_FILES", {"train": spec})
    served = {"bytes": good}
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(served["bytes"]))
    error, files = mod._moses_from_urls(tmp_path)
    assert error is None and files["train"].read_bytes() == good

    files["train"].unlink()
    served["bytes"] = b"SMILES\nCCN\nc1ccccc1\n"
    error, files = mod._moses_from_urls(tmp_path)
    assert files == {} and "does not match the pinned sha256" in error
    assert not (tmp_path / "train.csv").exists()


def test_pinned_smiles_digests_match_the_wheel_files():
    """Where the wheel's MOSES files are cached (data_cache/molecules/moses), the URL route's pins agree with them."""
    from insertion_diffusion.data.molecules import MOSES_FILES, smiles_column_digest

    directory = ROOT / "data_cache" / "molecules" / "moses"
    if not all((directory / f"{split}.csv.gz").is_file() for split in MOSES_FILES):
        pytest.skip("MOSES wheel files not cached on this machine")
    for split, spec in MOSES_FILES.items():
        rows, digest = smiles_column_digest(gzip.decompress((directory / f"{split}.csv.gz").read_bytes()))
        assert (rows, digest) == (spec["rows"], spec["smiles_sha256"])
