"""deltafm.adapters.diffusers_fm: ΔFM in diffusers' SD3/FLUX conventions (σ = 1 noise, target ε − x).

The acceptance check runs a tiny random ``diffusers.SD3Transformer2DModel`` on a batch built exactly as diffusers'
SD3 training scripts build it (σ from ``compute_density_for_timestep_sampling`` mapped to the scheduler's discrete
sigmas, noisy input (1 − σ)·x + σ·ε, timestep σ·1000) and compares the adapter's loss with deltafm's own
``DeltaFMObjective`` called with the same noise and t = 1 − σ through a wrapper model
x_t, t ↦ −transformer(x_t, (1 − t)·1000). Equality is bit for bit when every σ is a multiple of 2⁻¹⁰ (then
1 − (1 − σ) = σ in float32, so both sides feed the transformer the same tensors), and to float32 rounding for
the scheduler's own sigmas (there 1 − (1 − σ) may differ from σ in the last bit).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel  # noqa: E402
from diffusers.training_utils import (  # noqa: E402
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from deltafm.adapters import (  # noqa: E402
    RunningMean,
    add_bias_correction,
    correct_prediction,
    delta_fm_loss_diffusers,
    deltafm_to_diffusers,
    diffusers_to_deltafm,
    sigma_to_t,
    sigma_to_timestep,
    t_to_sigma,
    timestep_to_sigma,
    u_bar_diffusers,
)
from deltafm.correction import bias_correct, to_delta_optimum  # noqa: E402
from deltafm.losses import contrastive_loss_parts  # noqa: E402
from deltafm.objective import DeltaFMObjective  # noqa: E402
from deltafm.paths import LinearPath  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
            pos_embed_max_size=16)
B = 6


@pytest.fixture(scope="module")
def transformer() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(**TINY)


@pytest.fixture(scope="module")
def scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's training scheduler


def script_batch(scheduler, seed: int = 0, scheme: str = "logit_normal", dyadic: bool = False) -> dict:
    """A batch built as diffusers' SD3 scripts build it; ``dyadic`` rounds σ to multiples of 2⁻¹⁰."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 8, 8, generator=g) + 0.3
    noise = torch.randn(B, 4, 8, 8, generator=g)
    u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=B, logit_mean=0.0, logit_std=1.0,
                                              mode_scale=1.29, generator=g)
    indices = (u * scheduler.config.num_train_timesteps).long()
    sigmas = scheduler.sigmas[indices].reshape(B, 1, 1, 1)
    timesteps = scheduler.timesteps[indices]
    if dyadic:
        sigmas = torch.round(sigmas * 1024) / 1024
        timesteps = sigma_to_timestep(sigmas)
    return dict(x=x, noise=noise, sigmas=sigmas, timesteps=timesteps, noisy=(1.0 - sigmas) * x + sigmas * noise,
                text=torch.randn(B, 5, 16, generator=g), pooled=torch.randn(B, 8, generator=g),
                labels=torch.tensor([0, 1, 2, 0, 1, 2]))


def predict(transformer, batch: dict) -> torch.Tensor:
    return transformer(hidden_states=batch["noisy"], timestep=batch["timesteps"], encoder_hidden_states=batch["text"],
                       pooled_projections=batch["pooled"], return_dict=False)[0]


class AsDeltaFM(nn.Module):
    """deltafm's model(x_t, t, cond) → −transformer(hidden_states=x_t, timestep=(1 − t)·1000, text).sample."""

    def __init__(self, transformer: nn.Module, text: torch.Tensor, pooled: torch.Tensor) -> None:
        super().__init__()
        self.transformer, self.text, self.pooled = transformer, text, pooled

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        out = self.transformer(hidden_states=x_t, timestep=sigma_to_timestep(t_to_sigma(t)),
                               encoder_hidden_states=self.text, pooled_projections=self.pooled).sample
        return -out


def scripts_mse(pred, target, weighting):
    """diffusers' loss line, verbatim."""
    return torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1).mean()


# -- conventions ----------------------------------------------------------------------------------------------
def test_conventions_match_the_scheduler_and_the_linear_path(scheduler):
    sig = scheduler.sigmas
    assert torch.equal(sigma_to_timestep(sig), scheduler.timesteps)  # the scheduler's timesteps are σ·1000
    assert torch.allclose(timestep_to_sigma(scheduler.timesteps), sig, rtol=0, atol=1e-7)
    t = sigma_to_t(sig)
    assert torch.equal(t, 1 - sig)
    hi = sig >= 0.5  # Sterbenz: 1 − σ is exact there, so the round trip is too
    assert torch.equal(t_to_sigma(t)[hi], sig[hi])
    assert (t_to_sigma(t) - sig).abs().max() <= 2.0**-25
    dyadic = torch.arange(1025) / 1024
    assert torch.equal(t_to_sigma(sigma_to_t(dyadic)), dyadic)
    # the noisy input is deltafm's x_t at t = 1 − σ (bit for bit when 1 − σ is exact)
    x, eps = torch.randn(B, 4, 8, 8), torch.randn(B, 4, 8, 8)
    s = torch.tensor([0.0, 0.25, 0.5, 0.625, 0.75, 1.0])
    noisy = (1.0 - s.reshape(B, 1, 1, 1)) * x + s.reshape(B, 1, 1, 1) * eps
    assert torch.equal(LinearPath().interpolate(x, eps, sigma_to_t(s)), noisy)
    assert torch.equal(LinearPath().target(x, eps, sigma_to_t(s)), -(eps - x))


def test_diffusers_to_deltafm_and_back():
    pred, target, sig = torch.randn(B, 4, 8, 8), torch.randn(B, 4, 8, 8), torch.rand(B, 1, 1, 1) / 2 + 0.5
    v, u, t = diffusers_to_deltafm(pred, target, sig)
    assert torch.equal(v, -pred) and torch.equal(u, -target) and torch.equal(t, 1 - sig.reshape(B))
    p2, t2, s2 = deltafm_to_diffusers(v, u, t)
    assert torch.equal(p2, pred) and torch.equal(t2, target) and torch.equal(s2, sig) and s2.shape == (B, 1, 1, 1)
    assert torch.equal(diffusers_to_deltafm(pred, target, sig.reshape(B))[2], t)
    with pytest.raises(ValueError, match="same shape"):
        diffusers_to_deltafm(pred, target[:, :2], sig)
    with pytest.raises(ValueError, match="sigma must have shape"):
        diffusers_to_deltafm(pred, target, torch.rand(B, 2))
    with pytest.raises(ValueError, match="t must have shape"):
        deltafm_to_diffusers(v, u, t[:3])


# -- the loss --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_lambda_zero_is_the_scripts_mse_line_bit_for_bit(transformer, scheduler, scheme):
    b = script_batch(scheduler, seed=1)
    pred, target = predict(transformer, b), b["noise"] - b["x"]
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=b["sigmas"])
    out = delta_fm_loss_diffusers(pred, target, lam=0.0, weighting=weighting, generator=torch.Generator())
    assert torch.equal(out.loss, scripts_mse(pred, target, weighting))
    assert torch.equal(out.positive, out.loss.detach())
    assert out.neg_index is not None and out.negative > 0


def test_equals_deltafm_contrastive_loss_parts_bit_for_bit(transformer, scheduler):
    b = script_batch(scheduler, seed=2)
    pred, target = predict(transformer, b), b["noise"] - b["x"]
    out = delta_fm_loss_diffusers(pred, target, lam=0.3, generator=torch.Generator().manual_seed(5))
    j = out.neg_index
    assert j is not None and j.shape == (B,) and not bool((j == torch.arange(B)).any())
    v, u, _ = diffusers_to_deltafm(pred, target, b["sigmas"])
    ref = contrastive_loss_parts(v, u, u[j], lam=0.3)  # negating both sides changes no squared distance
    assert torch.equal(out.loss, ref.loss.mean())
    assert torch.equal(out.positive, ref.positive.mean()) and torch.equal(out.negative, ref.negative.mean())
    assert math.isclose(float(out.loss.detach()), float(out.positive - 0.3 * out.negative), rel_tol=1e-6)
    # without a process group the gathered pool is the local batch: the same draws, the same loss
    gathered = delta_fm_loss_diffusers(pred, target, lam=0.3, gather=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(gathered.neg_index, j) and torch.equal(gathered.loss, out.loss)


@pytest.mark.parametrize("kind", ["uniform", "derangement", "different_class"])
def test_equals_deltafm_objective_bit_for_bit_with_dyadic_sigmas(transformer, scheduler, kind):
    """The acceptance test: the same transformer, tensors and negative draws give the same loss, every bit."""
    b = script_batch(scheduler, seed=3, dyadic=True)
    pred, target = predict(transformer, b), b["noise"] - b["x"]
    labels = b["labels"] if kind == "different_class" else None
    out = delta_fm_loss_diffusers(pred, target, lam=0.2, negatives=kind, labels=labels,
                                  generator=torch.Generator().manual_seed(11))
    objective = DeltaFMObjective(lam=0.2, negatives=kind, label_dropout=0.0,
                                 num_classes=3 if kind == "different_class" else None)
    ref = objective(AsDeltaFM(transformer, b["text"], b["pooled"]), b["x"], labels,
                    generator=torch.Generator().manual_seed(11), noise=b["noise"], t=sigma_to_t(b["sigmas"].reshape(B)))
    assert torch.equal(ref.sample.x_t, b["noisy"])
    assert torch.equal(ref.pred, -pred)
    assert torch.equal(ref.neg_index, out.neg_index)
    assert torch.equal(out.loss, ref.loss)
    assert torch.equal(out.positive, ref.parts["positive"]) and torch.equal(out.negative, ref.parts["negative"])
    if kind == "different_class":
        assert not bool((labels[out.neg_index] == labels).any())


def test_equals_deltafm_objective_to_rounding_with_the_schedulers_sigmas(transformer, scheduler):
    b = script_batch(scheduler, seed=1)  # SD3's shifted sigmas, as drawn in the scripts
    sig = b["sigmas"].reshape(B)
    assert bool((t_to_sigma(sigma_to_t(sig)) != sig).any())  # this draw has a σ with 1 − (1 − σ) ≠ σ
    pred, target = predict(transformer, b), b["noise"] - b["x"]
    out = delta_fm_loss_diffusers(pred, target, lam=0.05, generator=torch.Generator().manual_seed(2))
    ref = DeltaFMObjective(lam=0.05, label_dropout=0.0)(
        AsDeltaFM(transformer, b["text"], b["pooled"]), b["x"], generator=torch.Generator().manual_seed(2),
        noise=b["noise"], t=sigma_to_t(b["sigmas"].reshape(B)))
    assert torch.equal(ref.neg_index, out.neg_index)
    # x_t differs from the noisy input by at most the rounding of 1 − (1 − σ) (≤ 2⁻²⁵ per unit of |ε − x|)
    assert (ref.sample.x_t - b["noisy"]).abs().max() <= 2.0**-22 * (b["noise"] - b["x"]).abs().max()
    torch.testing.assert_close(ref.pred, -pred, rtol=0, atol=1e-5)  # so the model's outputs differ by ~1e-7
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=0)


def test_anchor_time_and_own_time_negatives_coincide_on_the_linear_path(scheduler):
    b = script_batch(scheduler, seed=5)
    target = b["noise"] - b["x"]
    j = torch.tensor([1, 2, 3, 4, 5, 0])
    t_anchor, t_own = sigma_to_t(b["sigmas"].reshape(B)), sigma_to_t(b["sigmas"].reshape(B))[j]
    path = LinearPath()
    at_anchor = path.target(b["x"][j], b["noise"][j], t_anchor)  # ũ_i at the anchor's t (paper Eq. 6)
    at_own = path.target(b["x"][j], b["noise"][j], t_own)  # ũ_i = u_j at the negative's own t (reference code)
    assert torch.equal(at_anchor, at_own)
    assert torch.equal(at_anchor, -target[j])  # and both are what the adapter contrasts (negated)


def test_gradient_is_the_closed_form_and_reaches_the_transformer(scheduler):
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**TINY)
    b = script_batch(scheduler, seed=6)
    pred, target = predict(model, b), b["noise"] - b["x"]
    w = compute_loss_weighting_for_sd3(weighting_scheme="cosmap", sigmas=b["sigmas"])
    lam = 0.25
    out = delta_fm_loss_diffusers(pred, target, lam=lam, weighting=w, generator=torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad(out.loss, pred, retain_graph=True)
    j, d = out.neg_index, target[0].numel()
    expected = 2 * w / (B * d) * ((1 - lam) * pred - target + lam * target[j])
    torch.testing.assert_close(grad, expected.detach(), rtol=1e-5, atol=1e-9)
    out.loss.backward()
    for name in ("proj_out.weight", "pos_embed.proj.weight", "transformer_blocks.0.attn.to_q.weight"):
        g = model.get_parameter(name).grad
        assert g is not None and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0, name


def test_weighting_matches_a_hand_computation():
    g = torch.Generator().manual_seed(7)
    pred, target = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    w = torch.tensor([0.5, 1.0, 2.0, 4.0])
    j = torch.tensor([2, 0, 3, 1])
    lam = 0.1
    hand = 0.0
    for i in range(4):
        pos = sum(float(p - q) ** 2 for p, q in zip(pred[i].flatten(), target[i].flatten())) / 12
        neg = sum(float(p - q) ** 2 for p, q in zip(pred[i].flatten(), target[j[i]].flatten())) / 12
        hand += (float(w[i]) * pos - lam * float(w[i]) * neg) / 4
    a = delta_fm_loss_diffusers(pred, target, lam=lam, weighting=w.reshape(4, 1, 1, 1), neg_index=j)
    b = delta_fm_loss_diffusers(pred, target, lam=lam, weighting=w, neg_index=j)
    assert math.isclose(float(a.loss), hand, rel_tol=1e-5)
    assert torch.equal(a.loss, b.loss)  # (B,) and (B, 1, 1, 1) are the same weights
    assert torch.equal(a.neg_index, j)
    unweighted = delta_fm_loss_diffusers(pred, target, lam=lam, neg_index=j)
    assert torch.equal(delta_fm_loss_diffusers(pred, target, lam=lam, weighting=torch.ones(4), neg_index=j).loss,
                       unweighted.loss)
    none = delta_fm_loss_diffusers(pred, target, lam=lam, weighting=w, negatives="none")
    assert none.neg_index is None and float(none.negative) == 0.0 and torch.equal(none.loss, a.positive)


def test_preconditioned_outputs_are_the_velocity_loss_with_weights_times_sigma_squared(transformer, scheduler):
    """The SD3 scripts' default --precondition_outputs 1: x̂ = x_t − σ·pred regressed on x."""
    b = script_batch(scheduler, seed=8)
    raw, sig = predict(transformer, b), b["sigmas"]
    w = compute_loss_weighting_for_sd3(weighting_scheme="logit_normal", sigmas=sig)
    x_hat = raw * (-sig) + b["noisy"]
    target = b["noise"] - b["x"]
    out = delta_fm_loss_diffusers(raw, target, lam=0.0, weighting=w * sig**2, negatives="none")
    torch.testing.assert_close(out.loss, scripts_mse(x_hat, b["x"], w), rtol=1e-5, atol=0)
    j = torch.tensor([3, 4, 5, 0, 1, 2])
    neg = delta_fm_loss_diffusers(raw, target, lam=0.0, weighting=w * sig**2, neg_index=j).negative
    # the negative term contrasts x̂ with the data estimate x_t − σ·target_j of the negative's velocity
    torch.testing.assert_close(neg, scripts_mse(x_hat, b["noisy"] - sig * target[j], w).detach(), rtol=1e-5, atol=0)


def test_bad_inputs_raise_clear_errors():
    pred, target = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    for lam in (1.0, -0.1, float("nan"), 1.5):
        with pytest.raises(ValueError, match="lam must satisfy 0 <= lam < 1"):
            delta_fm_loss_diffusers(pred, target, lam=lam)
    with pytest.raises(ValueError, match="pred and target must have the same shape"):
        delta_fm_loss_diffusers(pred, target[:, :2], lam=0.05)
    with pytest.raises(ValueError, match="non-empty batch"):
        delta_fm_loss_diffusers(torch.randn(0, 3), torch.randn(0, 3), lam=0.05)
    for bad in (torch.ones(3), torch.ones(4, 3), torch.ones(4, 2, 1, 1), torch.ones(1, 1, 1, 1)):
        with pytest.raises(ValueError, match="weighting must have shape"):
            delta_fm_loss_diffusers(pred, target, lam=0.05, weighting=bad)
    with pytest.raises(ValueError, match="neg_index out of range"):
        delta_fm_loss_diffusers(pred, target, lam=0.05, neg_index=torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="neg_index must have shape"):
        delta_fm_loss_diffusers(pred, target, lam=0.05, neg_index=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="integer tensor"):
        delta_fm_loss_diffusers(pred, target, lam=0.05, neg_index=torch.tensor([1.0, 2.0, 3.0, 0.0]))
    with pytest.raises(ValueError, match="unknown negatives"):
        delta_fm_loss_diffusers(pred, target, lam=0.05, negatives="random")
    with pytest.raises(ValueError, match="need labels"):
        delta_fm_loss_diffusers(pred, target, lam=0.05, negatives="different_class")
    with pytest.raises(ValueError, match="labels must have shape"):
        delta_fm_loss_diffusers(pred, target, lam=0.05, negatives="different_class", labels=torch.zeros(3))
    with pytest.raises(ValueError, match="at least 2"):
        delta_fm_loss_diffusers(pred[:1], target[:1], lam=0.05)


# -- the correction --------------------------------------------------------------------------------------------
def test_running_mean_is_exact_and_per_channel():
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(n, 4, 8, 8, generator=g) + torch.arange(4.0).reshape(1, 4, 1, 1) for n in (3, 5, 2)]
    full, per_channel = RunningMean(), RunningMean(reduce_dims=(2, 3))
    for x in xs:
        full.update(x)
        per_channel.update(x)
    allx = torch.cat(xs).double()
    torch.testing.assert_close(full.mean, allx.mean(0, keepdim=True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_channel.mean, allx.mean((0, 2, 3), keepdim=True), rtol=1e-12, atol=1e-12)
    assert full.mean.shape == (1, 4, 8, 8) and per_channel.mean.shape == (1, 4, 1, 1)
    per_channel.update(torch.randn(2, 4, 16, 16))  # another resolution: fine per channel
    with pytest.raises(ValueError, match="another resolution"):
        full.update(torch.randn(2, 4, 16, 16))
    restored = RunningMean(reduce_dims=(2, 3))
    restored.load_state_dict(per_channel.state_dict())
    assert torch.equal(restored.mean, per_channel.mean)
    with pytest.raises(ValueError, match="reduced over"):
        RunningMean().load_state_dict(per_channel.state_dict())
    with pytest.raises(RuntimeError, match="no data yet"):
        _ = RunningMean().mean
    assert torch.equal(u_bar_diffusers(full), -full.mean)  # ū = E[ε] − E[x] with E[ε] = 0
    assert torch.equal(u_bar_diffusers(full.mean, noise_mean=torch.ones(1)), 1 - full.mean)


def test_correction_is_deltafms_bias_correction_negated_and_inverts_the_optimum():
    g = torch.Generator().manual_seed(10)
    v_fm, u_bar = torch.randn(3, 4, 8, 8, generator=g), torch.randn(1, 4, 1, 1, generator=g)
    lam = 0.05
    pred = torch.randn(3, 4, 8, 8, generator=g)
    assert torch.equal(correct_prediction(pred, lam, u_bar), -bias_correct(-pred, -u_bar, lam))
    # the ΔFM optimum of the FM prediction −v_fm, in diffusers' sign, comes back under the correction
    pred_delta = -to_delta_optimum(v_fm, u_bar, lam)
    torch.testing.assert_close(correct_prediction(pred_delta, lam, -u_bar), -v_fm, rtol=1e-6, atol=1e-6)
    # per anchor, the loss is stationary at (target_i − λ target_j)/(1 − λ), which the correction maps to target_i
    target = torch.randn(4, 3, 2, 2, generator=g)
    j = torch.tensor([1, 2, 3, 0])
    opt = ((target - lam * target[j]) / (1 - lam)).requires_grad_(True)
    (grad,) = torch.autograd.grad(delta_fm_loss_diffusers(opt, target, lam=lam, neg_index=j).loss, opt)
    assert float(grad.abs().max()) < 1e-7
    torch.testing.assert_close(correct_prediction(opt.detach(), lam, target[j]), target, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="lam must satisfy"):
        correct_prediction(pred, 1.0, u_bar)


def test_hook_corrects_every_output_form_and_comes_off(transformer, scheduler):
    b = script_batch(scheduler, seed=12)
    kwargs = dict(hidden_states=b["noisy"], timestep=b["timesteps"], encoder_hidden_states=b["text"],
                  pooled_projections=b["pooled"])
    with torch.no_grad():
        raw = transformer(**kwargs, return_dict=False)[0]
        u_bar = -torch.linspace(-1, 1, 4).reshape(1, 4, 1, 1)
        handle = add_bias_correction(transformer, 0.1, u_bar)
        try:
            expected = 0.9 * raw + 0.1 * u_bar
            assert torch.equal(transformer(**kwargs, return_dict=False)[0], expected)
            assert torch.equal(transformer(**kwargs).sample, expected)
        finally:
            handle.remove()
        assert torch.equal(transformer(**kwargs).sample, raw)


def test_hook_works_inside_the_sd3_pipeline_call(transformer):
    """The pipeline's Euler steps and CFG run on the corrected predictions of the hooked transformer."""
    from diffusers import StableDiffusion3Pipeline

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=sched, vae=None, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(13)
    latents, text, pooled = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g), torch.randn(1, 8)
    raw_calls, corrected_calls = [], []
    lam, u_bar = 0.2, torch.full((1, 4, 1, 1), -0.5)
    hooks = [transformer.register_forward_hook(lambda m, a, out: raw_calls.append(out[0])),
             add_bias_correction(transformer, lam, u_bar),
             transformer.register_forward_hook(lambda m, a, out: corrected_calls.append(out[0]))]
    try:
        with torch.no_grad():
            out = pipe(prompt_embeds=text, pooled_prompt_embeds=pooled, negative_prompt_embeds=torch.zeros_like(text),
                       negative_pooled_prompt_embeds=torch.zeros_like(pooled), height=64, width=64, latents=latents,
                       num_inference_steps=3, guidance_scale=2.0, output_type="latent").images
    finally:
        for h in hooks:
            h.remove()
    assert len(corrected_calls) == 3
    x = latents
    for k, (raw, corr) in enumerate(zip(raw_calls, corrected_calls)):
        assert torch.equal(corr, correct_prediction(raw, lam, u_bar))
        uncond, cond = corr.chunk(2)
        x = x + (sched.sigmas[k + 1] - sched.sigmas[k]) * (uncond + 2.0 * (cond - uncond))
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)


# -- the worked example -----------------------------------------------------------------------------------------
def _example():
    path = ROOT / "examples" / "diffusers_sd3_deltafm.py"
    spec = importlib.util.spec_from_file_location("diffusers_sd3_deltafm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("precondition", ["0", "1"])
def test_the_worked_example_trains_and_samples(tmp_path, precondition):
    res = _example().main(["--steps", "3", "--batch", "4", "--sample-steps", "2", "--lam", "0.1",
                           "--precondition-outputs", precondition, "--out", str(tmp_path)])
    logs = res["logs"]
    assert len(logs["loss"]) == 3 and all(math.isfinite(v) for v in logs["loss"])
    for loss, pos, neg in zip(logs["loss"], logs["positive"], logs["negative"]):
        assert math.isclose(loss, pos - 0.1 * neg, rel_tol=1e-5, abs_tol=1e-6)
    assert res["samples"].shape == (1, 4, 8, 8) and bool(torch.isfinite(res["samples"]).all())
    assert not torch.equal(res["samples"], res["samples_uncorrected"])  # the correction acted in the pipeline
    assert torch.equal(res["u_bar"], -res["data_mean"].mean) and res["u_bar"].shape == (1, 4, 1, 1)
    assert (tmp_path / "transformer" / "config.json").exists()
    assert (tmp_path / "deltafm_latent_mean.safetensors").exists()


def test_the_worked_example_loads_a_local_sd3_folder(tmp_path):
    """``--pretrained PATH`` reads ``transformer/`` and ``scheduler/`` (here: a tiny model saved there)."""
    torch.manual_seed(1)
    SD3Transformer2DModel(**TINY).save_pretrained(tmp_path / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(tmp_path / "scheduler")
    res = _example().main(["--pretrained", str(tmp_path), "--steps", "2", "--batch", "3", "--sample-steps", "2",
                           "--negatives", "derangement"])
    assert len(res["logs"]["loss"]) == 2 and res["samples"].shape == (1, 4, 8, 8)
