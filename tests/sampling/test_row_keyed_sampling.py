"""Evaluation sampling is keyed by each row's ``index``: a row generates the same sequence whichever batch (and so
whichever ``eval_batch_size`` or process) it is in. Also the two draws behind it, ``categorical`` and ``poisson``
with a :class:`RowRNG`, against their distributions."""

from __future__ import annotations

import math

import pytest
import torch

from insertion_diffusion.data.star import StarGraphDataModule
from insertion_diffusion.models import ARM, MDLM, FlexMDM, LoFlexMDM
from insertion_diffusion.models.base import select_rows
from insertion_diffusion.nn.transformer import TransformerConfig
from insertion_diffusion.process.rng import RowRNG, categorical, poisson
from insertion_diffusion.sampling import ARSamplerConfig, MDLMSamplerConfig, SamplerConfig

SAMPLERS = {
    FlexMDM: SamplerConfig(steps=12, trim=True),
    LoFlexMDM: SamplerConfig(steps=12, trim=True),
    MDLM: MDLMSamplerConfig(steps=12),
    ARM: ARSamplerConfig(),
}


@pytest.fixture(scope="module")
def star(tmp_path_factory):
    dm = StarGraphDataModule(preset="easy", data_dir=str(tmp_path_factory.mktemp("star")), num_train=8, num_val=8,
                             num_test=8, eval_batch_size=8)
    dm.prepare_data()
    dm.setup("validate")
    return dm, next(iter(dm.val_dataloader()))


@pytest.mark.parametrize("cls", list(SAMPLERS), ids=lambda c: c.__name__)
def test_a_row_samples_the_same_in_any_batch(cls, star):
    dm, batch = star
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=1, d_model=32, num_heads=2, d_cond=16, dropout=0.0)
    # Plain sampling at temperature 1: every step draws tokens, firings and insertions from the noise.
    model = cls(dm.tokenizer, dm.max_length, backbone=cfg, sampler=SAMPLERS[cls]).eval()
    with torch.no_grad():
        _, whole, _ = model.generate(batch)
        parts = {}
        for rows in ([0, 2, 4, 6], [7, 5, 3, 1]):  # other batches, another order
            keep = torch.zeros(len(whole), dtype=torch.bool)
            keep[rows] = True
            sub = select_rows(batch, keep)
            _, generated, _ = model.generate(sub, batch_idx=3)
            parts.update(zip(sub["index"].tolist(), generated))
        model.eval_seed = 1
        _, reseeded, _ = model.generate(batch)
    assert [parts[i] for i in batch["index"].tolist()] == whole
    assert reseeded != whole  # the noise matters: another eval_seed samples differently


def test_categorical_with_row_noise_follows_the_probabilities():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3])
    n = 40_000
    draws = categorical(probs.expand(n, 4) * 3.0, RowRNG(7, torch.arange(n)), "c")  # unnormalised is fine
    freq = torch.bincount(draws, minlength=4).double() / n
    assert freq[1] == 0
    assert torch.allclose(freq, probs.double(), atol=4 * math.sqrt(0.25 / n))
    again = categorical(probs.expand(n, 4), RowRNG(7, torch.arange(n)), "c")
    assert torch.equal(draws, again)


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.7, 3.0, 12.0, 150.0])
def test_poisson_with_row_noise_has_the_poisson_mean_and_variance(rate):
    n = 40_000
    counts = poisson(torch.full((n, 2), rate), RowRNG(3, torch.arange(n)), "p")
    assert counts.dtype == torch.long and counts.shape == (n, 2)
    mean, var = counts.double().mean().item(), counts.double().var().item()
    tol = 5 * math.sqrt(max(rate, 1e-3) / (2 * n))
    assert abs(mean - rate) < tol and abs(var - rate) < 10 * tol
    if rate == 0.0:
        assert counts.max() == 0


def test_poisson_caps_with_either_noise_source():
    rate = torch.full((64,), 50.0)
    for source in (RowRNG(0, torch.arange(64)), torch.Generator().manual_seed(0)):
        counts = poisson(rate, source, "p", cap=10)
        assert counts.max() == 10 and counts.min() == 10  # P(N < 10) ~ 1e-12 at rate 50
    assert poisson(rate, RowRNG(0, torch.arange(64)), "p").float().mean().item() == pytest.approx(50.0, abs=3.0)
