"""Unit tests of FlexMDM's loss and sampler glue (insertion_diffusion/models/flexmdm.py), on a tiny backbone."""

from __future__ import annotations

import math

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from model_rows import mixed_rows
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from insertion_diffusion.data.star import StarGraphDataModule
from insertion_diffusion.losses import bregman_rate
from insertion_diffusion.models.flexmdm import FlexMDM
from insertion_diffusion.nn.transformer import TransformerConfig
from insertion_diffusion.process.insertion import (
    parse_time_sampling,
    partial_state,
    sample_event_times,
    stratified_times,
    training_times,
)
from insertion_diffusion.sampling import SamplerConfig
from insertion_diffusion.tokenizers import IntegerTokenizer

TOK = IntegerTokenizer(10)
PAD, MASK, BOS, EOS = TOK.pad_id, TOK.mask_id, TOK.bos_id, TOK.eos_id
MAXLEN = 16


def tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    cfg = TransformerConfig(num_layers=1, d_model=32, num_heads=2, d_cond=16, dropout=0.0)
    kwargs.setdefault("sampler", SamplerConfig(steps=16))
    return FlexMDM(TOK, max_length=MAXLEN, backbone=cfg, **kwargs).eval()


def batch(prompt_lens=(3, 1, 4, 2, 0, 5), target_lens=(5, 8, 0, 3, 6, 2), L=MAXLEN, seed=0):
    return mixed_rows(prompt_lens, target_lens, L, seed)


def test_compute_loss_is_finite_and_seeded():
    model = tiny()
    b, _ = batch()
    loss, logs = model.compute_loss(b, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    assert set(logs) == {"loss_unmask", "loss_insert", "masked_token_acc"}
    torch.testing.assert_close(logs["loss_unmask"] + logs["loss_insert"], loss.detach())
    again, _ = model.compute_loss(b, generator=torch.Generator().manual_seed(0))
    other, _ = model.compute_loss(b, generator=torch.Generator().manual_seed(1))
    assert again.item() == loss.item()
    assert other.item() != loss.item()
    assert 0.0 <= logs["masked_token_acc"][0].item() <= 1.0


@pytest.mark.parametrize("time_sampling", ["uniform", "early:0.5", "early:0.5:0.25"])
def test_compute_loss_matches_manual_reconstruction(time_sampling):
    """Rebuild FlexMDM's loss from the forward process: (1/(B L)) sum_rows w(t) [sum_masked lambda_um(t) CE
    + insert_weight sum_{allowed gaps} lambda_in(t) D(|G_j|, g_j)], allowed = real gaps not left of prompt/BOS;
    w = 1 under uniform times, the inverse mixture density under early:<p>."""
    model = tiny(time_sampling=time_sampling)
    b, prompts = batch()
    z1, fixed, attn = b["input_ids"], b["fixed"], b["attention_mask"]
    B, L = z1.shape
    loss, _ = model.compute_loss(b, generator=torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    if time_sampling == "uniform":
        t, w = stratified_times(B, model.time_eps, generator=g), torch.ones(B)
    else:
        early, share = parse_time_sampling(time_sampling)
        t, w = training_times(B, model.time_eps, generator=g, early=early, share=share)
        assert (w - 1).abs().min() > 1e-3  # every row carries a weight other than 1
    t_in, t_um = sample_event_times(z1.shape, model.insertion, model.unmasking, generator=g)
    st = partial_state(z1, fixed, attn, t, t_in, t_um, MASK, PAD)
    with torch.no_grad():
        logits, gap_pred = model(st.x, t, st.valid)
    total = 0.0
    for r in range(B):
        lam = w[r].item() / (1.0 - t[r].item())  # linear schedules: both hazards are 1 / (1 - t)
        n_head = len(prompts[r])
        for j in range(st.lengths[r].item()):
            if st.is_mask[r, j]:
                total += lam * F.cross_entropy(logits[r, j], st.target[r, j]).item()
            if j >= n_head:  # gaps of generated tokens and of EOS; never left of prompt/BOS
                total += model.insert_weight * bregman_rate(st.gap[r, j] * lam, gap_pred[r, j] * lam).item()
            else:
                assert st.gap[r, j].item() == 0
    assert loss.item() == pytest.approx(total / (B * L), rel=1e-4)


def test_masked_token_accuracy_counts_only_masked_positions():
    model = tiny()
    # Make the token head always predict token 7: accuracy = fraction of masked targets equal to 7.
    with torch.no_grad():
        model.token_head.out.bias[7] = 100.0
    b, _ = batch()
    z1 = b["input_ids"]
    b["input_ids"] = torch.where(b["fixed"] | ~b["attention_mask"], z1, torch.full_like(z1, 7))
    _, logs = model.compute_loss(b, generator=torch.Generator().manual_seed(0))
    assert logs["masked_token_acc"][0].item() == 1.0
    b["input_ids"] = torch.where(b["fixed"] | ~b["attention_mask"], z1, torch.full_like(z1, 8))
    _, logs = model.compute_loss(b, generator=torch.Generator().manual_seed(0))
    assert logs["masked_token_acc"][0].item() == 0.0


def test_distribution_head_loss():
    model = tiny(insertion_head="distribution")
    b, _ = batch()
    loss, logs = model.compute_loss(b, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss > 0
    # Uniform gap logits at init: the insertion term is lambda * log(MAXLEN + 1) per allowed gap.
    assert logs["loss_insert"].item() > 0
    x = b["input_ids"][:, :8]
    valid = b["attention_mask"][:, :8]
    logits, gap_out = model(x, torch.full((6,), 0.5), valid)
    assert gap_out.shape == (6, 8, MAXLEN + 1)
    torch.testing.assert_close(model.expected_gap(gap_out), torch.full((6, 8), MAXLEN / 2))


def test_initial_rates():
    model = tiny()
    b, _ = batch()
    x, valid = b["input_ids"], b["attention_mask"]
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.9, 0.99])
    logits, ins, um = model.rates(x, t, valid)
    assert logits.shape == (6, MAXLEN, TOK.vocab_size)
    assert ins.shape == um.shape == (6, MAXLEN)
    lam = 1.0 / (1.0 - t)
    torch.testing.assert_close(um, lam[:, None].expand(6, MAXLEN))
    # Expected gap head starts at softplus(-2) everywhere.
    torch.testing.assert_close(ins, (F.softplus(torch.tensor(-2.0)) * lam)[:, None].expand(6, MAXLEN))
    assert (logits == 0).all()  # uniform token head at init


@pytest.mark.parametrize("spec", ["linear", "poly:0.25"])
def test_integrated_rates_are_hazard_integrals(spec):
    """rates(..., t_next) = multiplier * (Lambda(t_next) - Lambda(t)): finite at t = 0 even where the hazard
    diverges (poly:0.25), and -> rates(t) * dt as the step shrinks."""
    model = tiny(insertion_schedule=spec, unmasking_schedule=spec, sampler=SamplerConfig(steps=16, integrate_hazard=True))
    b, _ = batch()
    x, valid = b["input_ids"], b["attention_mask"]
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.9, 0.99])
    dt = 1e-3
    _, ins, um = model.rates(x, t, valid, t + dt)
    assert torch.isfinite(ins).all() and torch.isfinite(um).all()
    sched = model.insertion
    g = F.softplus(torch.tensor(-2.0))
    torch.testing.assert_close(ins[:, 0], g * (sched.cumulative_hazard(t + dt) - sched.cumulative_hazard(t)))
    t, dt = t[1:5], 1e-4  # away from t = 0 (diverging hazard) and t -> 1 (fast-changing hazard)
    _, ins, um = model.rates(x[1:5], t, valid[1:5], t + dt)
    _, ins_rate, um_rate = model.rates(x[1:5], t, valid[1:5])
    torch.testing.assert_close(ins, ins_rate * dt, rtol=2e-3, atol=1e-7)
    torch.testing.assert_close(um, um_rate * dt, rtol=2e-3, atol=1e-7)


def test_early_insertion_schedule_needs_integrated_hazards():
    """poly:<p < 1> has an unbounded hazard at t = 0: refused without integrate_hazard (at construction, and at
    sampling if the sampler is swapped later); with it, the very first step already inserts masks."""
    with pytest.raises(ValueError, match=r"model.insertion_schedule=poly:0.25.*integrate_hazard: true"):
        tiny(insertion_schedule="poly:0.25", sampler=SamplerConfig(steps=8))
    # without an explicit sampler (as in load_from_checkpoint) the default integrates hazards
    assert FlexMDM(TOK, max_length=MAXLEN, insertion_schedule="poly:0.25").sampler_cfg.integrate_hazard
    assert not FlexMDM(TOK, max_length=MAXLEN).sampler_cfg.integrate_hazard
    model = tiny(insertion_schedule="poly:0.25", sampler=SamplerConfig(steps=8, integrate_hazard=True))
    with torch.no_grad():
        model.gap_head.mlp[-1].bias.fill_(2.0)  # expect ~2 tokens per gap
    b, _ = batch()
    out = model.sample_full(b, torch.Generator().manual_seed(0))
    assert (out.insert_step == 0).any()
    model.sampler_cfg = SamplerConfig(steps=8)
    with pytest.raises(ValueError, match="integrate_hazard"):
        model.sample(b)


def check_samples(out, fixed, b, prompts):
    x_in = b["input_ids"]
    B = x_in.shape[0]
    assert out.shape[0] == B and out.shape[1] <= MAXLEN
    assert not (out == MASK).any()
    for r in range(B):
        row = out[r].tolist()
        n = sum(v != PAD for v in row)
        assert all(v != PAD for v in row[:n]) and all(v == PAD for v in row[n:])
        head = prompts[r]
        assert row[: len(head)] == head  # fixed prompt and BOS intact, at the start
        assert row[n - 1] == EOS
        assert all(v >= TOK.num_special for v in row[len(head) : n - 1])
        assert [v for v, f in zip(row, fixed[r].tolist()) if f] == head + [EOS]


def test_sample_untrained_model_keeps_prompt_and_fills_masks():
    model = tiny()
    b, prompts = batch()
    out, fixed = model.sample(b, generator=torch.Generator().manual_seed(0))
    check_samples(out, fixed, b, prompts)


def test_sample_with_large_insertion_rate_and_confidence():
    model = tiny(sampler=SamplerConfig(steps=12, confidence="top_prob", top_p=0.9))
    with torch.no_grad():
        model.gap_head.mlp[2].bias.fill_(3.0)  # expected gap ~3 everywhere: fills up to max_length
    b, prompts = batch()
    out, fixed = model.sample(b, generator=torch.Generator().manual_seed(1))
    check_samples(out, fixed, b, prompts)
    lengths = (out != PAD).sum(1)
    assert (lengths <= MAXLEN).all()
    assert (lengths > torch.tensor([len(p) + 1 for p in prompts])).all()


def test_sample_is_seeded():
    model = tiny()
    with torch.no_grad():
        model.gap_head.mlp[2].bias.fill_(1.0)
    b, _ = batch()
    a, _ = model.sample(b, generator=torch.Generator().manual_seed(3))
    a2, _ = model.sample(b, generator=torch.Generator().manual_seed(3))
    c, _ = model.sample(b, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, a2)
    assert not torch.equal(a, c)


def test_sampler_settings_and_schedules_from_config():
    model = tiny(insertion_schedule="poly:2", unmasking_schedule="cosine")
    assert model.insertion.name == "poly:2" and model.unmasking.name == "cosine"
    assert model.sampler_settings()["steps"] == 16
    b, _ = batch()
    loss, _ = model.compute_loss(b, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"insertion_head": "poisson"}, "model.insertion_head"),
        ({"time_eps": 0.5}, "model.time_eps"),
        ({"time_eps": -0.1}, "model.time_eps"),
        ({"insertion_schedule": "sqrt"}, "model.insertion_schedule"),
        ({"unmasking_schedule": "poly:x"}, "model.unmasking_schedule"),
    ],
)
def test_invalid_arguments_name_the_key(kwargs, word):
    with pytest.raises(ValueError, match=word.replace(".", r"\.")):
        tiny(**kwargs)


def test_loss_gradient_flows_to_gap_head_with_the_right_sign():
    """The initial gap prediction (0.13) is below every non-empty gap: one step raises it on average."""
    model = tiny().train()
    b, _ = batch(prompt_lens=(1,) * 8, target_lens=(12,) * 8)
    loss, _ = model.compute_loss(b, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert model.gap_head.mlp[2].bias.grad.item() < 0
    assert math.isfinite(model.gap_head.mlp[2].bias.grad.item())


def test_sequence_nll_is_a_seeded_nonnegative_bound_per_row():
    model = tiny()
    b, _ = batch()
    b["index"] = torch.arange(6)
    with torch.no_grad():
        a, again = model.sequence_nll(b), model.sequence_nll(b)
    assert a.shape == (6,) and torch.isfinite(a).all() and (a >= 0).all()
    assert torch.equal(a, again)  # evaluation noise depends on the rows and eval_seed only
    b["index"] = b["index"] + 100
    with torch.no_grad():
        assert not torch.equal(model.sequence_nll(b), a)


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_validate_writes_the_sample_table_to_tensorboard(tmp_path):
    """A real ``Trainer.validate`` on tiny star data with a TensorBoardLogger: the ``val/samples`` markdown table
    (base.py) is in the event file, one row per logged sample, references decoded from the data."""
    dm = StarGraphDataModule(preset="easy", data_dir=str(tmp_path / "data"), num_train=8, num_val=6, num_test=1,
                             batch_size=6)
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=1, d_model=32, num_heads=2, d_cond=16, dropout=0.0)
    model = FlexMDM(dm.tokenizer, dm.max_length, backbone=cfg, sampler=SamplerConfig(steps=4), num_logged_samples=3)
    logger = TensorBoardLogger(tmp_path, name="tb", version="v0")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    trainer.validate(model, datamodule=dm, verbose=False)

    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    tag = "val/samples/text_summary"  # SummaryWriter.add_text appends "/text_summary" to the tag
    assert tag in acc.Tags()["tensors"]
    assert acc.SummaryMetadata(tag).plugin_data.plugin_name == "text"
    (event,) = acc.Tensors(tag)
    assert event.step == 0
    lines = event.tensor_proto.string_val[0].decode().splitlines()
    assert lines[:2] == ["| prompt | generated | reference |", "|---|---|---|"]
    rows = [line.strip("|").split(" | ") for line in lines[2:]]
    assert len(rows) == 3 and all(len(r) == 3 for r in rows)
    val = next(iter(dm.val_dataloader()))
    for r, (prompt, _, reference) in enumerate(rows):
        ids, fixed, attn = val["input_ids"][r], val["fixed"][r], val["attention_mask"][r]
        assert reference.strip() == dm.tokenizer.decode(ids[attn & ~fixed].tolist())
        assert prompt.strip()  # every star row is conditional


def test_predict_records_keep_the_reference_row_by_row():
    model = tiny()
    model.noise_seed = 0
    rows, _ = batch()
    n = rows["input_ids"].shape[0]
    plain = model.predict_step(dict(rows), 0)
    assert len(plain) == n and all("reference" in r for r in plain)
    flags = torch.tensor([True, False] * (n // 2))
    mixed = model.predict_step({**rows, "has_reference": flags}, 0)
    assert ["reference" in r for r in mixed] == flags.tolist()
    assert [r["generated"] for r in mixed] == [r["generated"] for r in plain]  # the flag changes the record only


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_val_steps_apply_to_the_validations_inside_fit_only(tmp_path):
    """``sampler.val_steps`` sets the network calls of every sampling inside ``fit`` (sanity check and periodic
    validation); ``validate`` and ``test`` run ``sampler.steps``."""
    dm = StarGraphDataModule(preset="easy", data_dir=str(tmp_path / "data"), num_train=8, num_val=4, num_test=4,
                             batch_size=4)
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=1, d_model=32, num_heads=2, d_cond=16, dropout=0.0)
    model = FlexMDM(dm.tokenizer, dm.max_length, backbone=cfg, sampler=SamplerConfig(steps=6, val_steps=3, trim=False))
    calls: list[int] = []
    rates, sample_full = model.rates, model.sample_full

    def counting_rates(*args, **kwargs):
        calls[-1] += 1
        return rates(*args, **kwargs)

    def counting_sample_full(*args, **kwargs):
        calls.append(0)
        return sample_full(*args, **kwargs)

    model.rates, model.sample_full = counting_rates, counting_sample_full
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=2, val_check_interval=2,
                        limit_val_batches=1, num_sanity_val_steps=1)
    trainer.fit(model, datamodule=dm)
    assert calls == [3, 3]  # the sanity check and the validation at step 2
    calls.clear()
    trainer.validate(model, datamodule=dm, verbose=False)
    trainer.test(model, datamodule=dm, verbose=False)
    assert calls == [6, 6]
    with pytest.raises(ValueError, match="sampler.val_steps must be >= 1"):
        SamplerConfig(val_steps=0)


@pytest.mark.parametrize("value", ["late", "early:1", "early:0", "early:x", ""])
def test_bad_time_sampling_names_the_key(value):
    with pytest.raises(ValueError, match=r"model\.time_sampling="):
        tiny(time_sampling=value)


@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_validation_logs_mean_generated_and_reference_lengths(tmp_path):
    """``val/length_generated`` and ``val/length_reference`` are the row means over the whole validation set (two
    batches of unequal size), from what ``generate`` returned."""
    dm = StarGraphDataModule(preset="easy", data_dir=str(tmp_path / "data"), num_train=8, num_val=6, num_test=1,
                             batch_size=4)
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=1, d_model=32, num_heads=2, d_cond=16, dropout=0.0)
    model = FlexMDM(dm.tokenizer, dm.max_length, backbone=cfg, sampler=SamplerConfig(steps=4))
    seen: list[tuple[int, int]] = []
    generate = model.generate

    def recording_generate(*args, **kwargs):
        prompts, generated, refs = generate(*args, **kwargs)
        seen.extend((len(g), len(r)) for g, r in zip(generated, refs))
        return prompts, generated, refs

    model.generate = recording_generate
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    (res,) = trainer.validate(model, datamodule=dm, verbose=False)
    assert len(seen) == 6
    gen_mean = sum(g for g, _ in seen) / 6
    ref_mean = sum(r for _, r in seen) / 6
    assert res["val/length_generated"] == pytest.approx(gen_mean, rel=1e-6)
    assert res["val/length_reference"] == pytest.approx(ref_mean, rel=1e-6)
    assert ref_mean > 0
