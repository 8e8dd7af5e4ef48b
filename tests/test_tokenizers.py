"""Tokenizer invariants: special ids, vocabulary size, encode/decode, pickling and checkpoint round trips."""

from __future__ import annotations

import json
import pickle

import pytest

from insertion_diffusion.data.star import PRESETS, StarGraphDataModule
from insertion_diffusion.tokenizers import (
    BOS,
    EOS,
    MASK,
    PAD,
    SPECIAL_TOKENS,
    IntegerTokenizer,
    Tokenizer,
    as_tokenizer,
)


def _special_ids(tok: Tokenizer) -> list[int]:
    return [tok.pad_id, tok.mask_id, tok.bos_id, tok.eos_id]


@pytest.mark.parametrize("n", [1, 7, 20, 56])
def test_special_ids_distinct_and_disjoint_from_content(n: int) -> None:
    tok = IntegerTokenizer(n)
    specials = _special_ids(tok)
    assert len(set(specials)) == 4
    assert specials == [tok.stoi[PAD], tok.stoi[MASK], tok.stoi[BOS], tok.stoi[EOS]]
    content = tok.encode([str(v) for v in range(n)])
    assert len(set(content)) == n
    assert not set(content) & set(specials)
    # content ids are exactly the ids after the specials, in order
    assert content == list(range(tok.num_special, tok.num_special + n))


@pytest.mark.parametrize("n", [1, 20, 56])
def test_vocab_size_counts_content_plus_specials(n: int) -> None:
    tok = IntegerTokenizer(n)
    assert tok.num_special == len(SPECIAL_TOKENS) == 4
    assert tok.vocab_size == n + 4 == len(tok.itos) == len(tok.stoi)
    assert max(tok.stoi.values()) == tok.vocab_size - 1


def test_special_ids_stable_across_vocabularies() -> None:
    a, b = IntegerTokenizer(3), Tokenizer(["C", "c", "(", ")"])
    assert _special_ids(a) == _special_ids(b) == [0, 1, 2, 3]


def test_encode_decode_round_trip() -> None:
    tok = IntegerTokenizer(20)
    text = "3 7 7 19 0 12"
    ids = tok.encode(text)
    assert ids == [tok.stoi[s] for s in text.split()]
    assert ids == [v + 4 for v in (3, 7, 7, 19, 0, 12)]
    assert tok.decode(ids) == text
    # a list of token strings encodes like the text; extra whitespace is not significant
    assert tok.encode(text.split()) == ids
    assert tok.encode("  3\t7 \n7 19 0 12 ") == ids
    assert tok.decode_tokens(ids) == text.split()
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_decode_skips_specials_by_default() -> None:
    tok = IntegerTokenizer(20)
    body = tok.encode("5 6 6 9")
    ids = [*body[:2], tok.bos_id, *body[2:], tok.mask_id, tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(ids) == "5 6 6 9"
    assert tok.decode_tokens(ids) == ["5", "6", "6", "9"]
    assert tok.decode(ids, skip_special=False) == f"5 6 {BOS} 6 9 {MASK} {EOS} {PAD} {PAD}"
    assert tok.decode([tok.pad_id, tok.mask_id, tok.bos_id, tok.eos_id]) == ""


def test_decode_accepts_tensor_ids() -> None:
    torch = pytest.importorskip("torch")
    tok = IntegerTokenizer(20)
    ids = torch.tensor([tok.bos_id, *tok.encode("1 2 3"), tok.eos_id])
    assert tok.decode(ids) == "1 2 3"


@pytest.mark.parametrize("bad", ["20", "-1", "x", "a b"])
def test_unknown_tokens_raise_key_error_naming_them(bad: str) -> None:
    tok = IntegerTokenizer(20)
    with pytest.raises(KeyError, match="unknown tokens") as info:
        tok.encode(f"1 {bad} 2")
    for t in bad.split():
        assert repr(t) in str(info.value)


def test_special_token_strings_encode_to_special_ids() -> None:
    tok = IntegerTokenizer(5)
    assert tok.encode(f"{BOS} 1 {EOS} {PAD} {MASK}") == [tok.bos_id, 5, tok.eos_id, tok.pad_id, tok.mask_id]


def test_invalid_vocabularies_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        Tokenizer(["a", "b", "a"])
    with pytest.raises(ValueError, match="collide"):
        Tokenizer(["a", MASK])
    with pytest.raises(ValueError, match="whitespace"):
        Tokenizer(["a b"])
    with pytest.raises(ValueError, match="whitespace"):
        Tokenizer([""])
    with pytest.raises(ValueError, match="num_values"):
        IntegerTokenizer(0)


def test_pickle_round_trip() -> None:
    tok = IntegerTokenizer(20)
    clone = pickle.loads(pickle.dumps(tok))
    assert type(clone) is IntegerTokenizer
    assert clone == tok and hash(clone) == hash(tok)
    assert clone.vocab_size == tok.vocab_size
    text = "0 19 4 4 11"
    assert clone.encode(text) == tok.encode(text)
    assert clone.decode(tok.encode(text)) == text


@pytest.mark.parametrize("tok", [IntegerTokenizer(20), Tokenizer(["C", "c", "=", "("])], ids=["integer", "base"])
def test_config_round_trip(tok: Tokenizer) -> None:
    config = tok.to_config()
    # checkpoints store it as plain data: it must survive JSON
    config = json.loads(json.dumps(config))
    clone = Tokenizer.from_config(config)
    assert type(clone) is type(tok)
    assert clone == tok and hash(clone) == hash(tok)
    assert clone.itos == tok.itos and clone.stoi == tok.stoi
    assert clone.to_config() == tok.to_config()
    assert as_tokenizer(config) == tok
    assert as_tokenizer(tok) is tok
    sample = tok.tokens[::-1]
    assert clone.encode(sample) == tok.encode(sample)


def test_changed_config_compares_unequal() -> None:
    tok = IntegerTokenizer(20)
    config = tok.to_config()
    assert Tokenizer.from_config(config) == tok
    # a different vocabulary size (e.g. another star preset)
    assert as_tokenizer(IntegerTokenizer(56).to_config()) != tok
    # same size, different tokens
    renamed = dict(config, tokens=[*config["tokens"][:-1], "99"])
    assert as_tokenizer(renamed) != tok
    # same tokens, different order (ids would be shuffled)
    swapped = dict(config, tokens=[config["tokens"][1], config["tokens"][0], *config["tokens"][2:]])
    assert as_tokenizer(swapped) != tok
    # same tokens, different class
    base = dict(config, class_path=f"{Tokenizer.__module__}.{Tokenizer.__qualname__}")
    assert as_tokenizer(base) != tok
    assert as_tokenizer(base).itos == tok.itos
    # the original config was not mutated
    assert Tokenizer.from_config(config) == tok


def test_as_tokenizer_rejects_other_objects() -> None:
    with pytest.raises(TypeError, match="to_config"):
        as_tokenizer({"tokens": ["a"]})
    with pytest.raises(TypeError, match="to_config"):
        as_tokenizer(["a", "b"])  # type: ignore[arg-type]


def test_star_easy_datamodule_tokenizer() -> None:
    spec = PRESETS["easy"]
    assert spec.num_ids == 20
    dm = StarGraphDataModule(preset="easy", data_dir="unused", num_train=1, num_val=0, num_test=0)
    tok = dm.tokenizer
    assert tok == IntegerTokenizer(spec.num_ids)
    assert tok.vocab_size == spec.num_ids + 4 == 24
    # every node value maps to a content id, offset past the specials
    assert dm._node_ids == [tok.stoi[str(v)] for v in range(spec.num_ids)] == list(range(4, 24))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_star_presets_tokenizers_differ_by_num_ids(preset: str) -> None:
    dm = StarGraphDataModule(preset=preset, data_dir="unused", num_train=1, num_val=0, num_test=0)
    assert dm.tokenizer.vocab_size == PRESETS[preset].num_ids + 4
    # the checkpoint vocabulary check: a tokenizer saved by another preset compares equal only if num_ids match
    saved = as_tokenizer(IntegerTokenizer(PRESETS["easy"].num_ids).to_config())
    assert (saved == dm.tokenizer) == (PRESETS[preset].num_ids == PRESETS["easy"].num_ids)


@pytest.mark.parametrize("bad", [-1, 24])
@pytest.mark.parametrize("skip_special", [True, False])
def test_decode_rejects_ids_outside_the_vocabulary(bad, skip_special):
    tok = IntegerTokenizer(20)
    with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
        tok.decode([5, bad], skip_special=skip_special)
