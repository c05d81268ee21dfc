"""Fine-tune an SD3 transformer with ΔFM, in diffusers' conventions: the diffusers SD3 training loop with its
MSE line replaced, then sampling through ``StableDiffusion3Pipeline`` with the bias correction.

The loop is the one of diffusers' ``examples/dreambooth/train_dreambooth_sd3.py`` (and the LoRA variant):
σ from ``compute_density_for_timestep_sampling`` mapped to the scheduler's discrete sigmas, noisy input
(1 − σ)·x + σ·ε, ``timestep`` = σ·1000, target ε − x, weights from ``compute_loss_weighting_for_sd3``,
optional output preconditioning. What changes is marked ``# ΔFM``:

* the loss line → :func:`deltafm.adapters.delta_fm_loss_diffusers` (a negative drawn from the batch);
* one line keeps the running mean of the latents (for ū = −E[x] of the correction);
* at sampling, :func:`deltafm.adapters.add_bias_correction` hooks the transformer:
  pred_FM = (1 − λ)·pred + λ·ū, inside the unchanged pipeline call.

Runs offline in seconds on a tiny random SD3 transformer with random stand-in latents and text embeddings::

    OMP_NUM_THREADS=1 .venv/bin/python examples/diffusers_sd3_deltafm.py --steps 20

With ``--pretrained PATH`` (a local SD3 folder: ``transformer/``, ``scheduler/``) the real transformer and
scheduler are loaded. Latents and text embeddings must then come from *your* pipeline: VAE latents of your
images, ``(latents - vae.config.shift_factor) * vae.config.scaling_factor``, and the ``prompt_embeds`` /
``pooled_prompt_embeds`` of ``pipe.encode_prompt`` — replace :func:`batches` with your data loader (the random
stand-ins only have the right shapes). Sampling returns latents; decode them with your VAE.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from torch import Tensor

from deltafm.adapters import (
    DiffusersLossOutput,
    RunningMean,
    add_bias_correction,
    delta_fm_loss_diffusers,
    u_bar_diffusers,
)

#: a tiny random SD3 transformer (22k parameters) that runs anywhere
TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
            pos_embed_max_size=16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained", type=Path, default=None, help="a local SD3 folder (transformer/, scheduler/)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lam", type=float, default=0.05, help="ΔFM's λ in [0, 1); 0 is the plain diffusers loss")
    p.add_argument("--negatives", default="uniform", choices=["uniform", "derangement", "hard"])
    p.add_argument("--weighting-scheme", default="logit_normal",
                   choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"])
    p.add_argument("--logit-mean", type=float, default=0.0)
    p.add_argument("--logit-std", type=float, default=1.0)
    p.add_argument("--mode-scale", type=float, default=1.29)
    p.add_argument("--precondition-outputs", type=int, default=1, choices=[0, 1],
                   help="the SD3 scripts' EDM-style output preconditioning (their default: 1)")
    p.add_argument("--sample-steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="save the transformer and the latent mean here")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[SD3Transformer2DModel, FlowMatchEulerDiscreteScheduler]:
    """The transformer and the training scheduler (SD3's shift 3.0 for the tiny one)."""
    if args.pretrained is None:
        return SD3Transformer2DModel(**TINY), FlowMatchEulerDiscreteScheduler(shift=3.0)
    transformer = SD3Transformer2DModel.from_pretrained(args.pretrained, subfolder="transformer")
    return transformer, FlowMatchEulerDiscreteScheduler.from_pretrained(args.pretrained, subfolder="scheduler")


def batches(transformer: SD3Transformer2DModel, args: argparse.Namespace,
            generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Stand-ins for your data: (model_input, prompt_embeds, pooled_prompt_embeds), shaped for ``transformer``.

    The latents have a per-channel mean away from 0, as real VAE latents do, so that ū = −E[x] matters.
    """
    cfg = transformer.config
    shape = (args.batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    offset = torch.linspace(-0.5, 0.5, cfg.in_channels).reshape(1, -1, 1, 1)
    for _ in range(args.steps):
        yield (torch.randn(shape, generator=generator) * 0.8 + offset,
               torch.randn(args.batch, 7, cfg.joint_attention_dim, generator=generator),
               torch.randn(args.batch, cfg.pooled_projection_dim, generator=generator))


def get_sigmas(scheduler: FlowMatchEulerDiscreteScheduler, timesteps: Tensor, n_dim: int, dtype: torch.dtype) -> Tensor:
    """The σ of each ``timestep``, shaped (B, 1, ..., 1) (the scripts' ``get_sigmas``)."""
    sigmas = scheduler.sigmas.to(device=timesteps.device, dtype=dtype)
    schedule_timesteps = scheduler.timesteps.to(timesteps.device)
    step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
    sigma = sigmas[step_indices].flatten()
    return sigma.reshape(-1, *([1] * (n_dim - 1)))


def train_step(transformer: SD3Transformer2DModel, noise_scheduler_copy: FlowMatchEulerDiscreteScheduler,
               batch: tuple[Tensor, Tensor, Tensor], args: argparse.Namespace, data_mean: RunningMean,
               generator: torch.Generator) -> DiffusersLossOutput:
    """One loss evaluation, line for line the diffusers SD3 script except for the lines marked ΔFM."""
    model_input, prompt_embeds, pooled_prompt_embeds = (t.to(args.device) for t in batch)
    noise = torch.randn_like(model_input)
    bsz = model_input.shape[0]
    u = compute_density_for_timestep_sampling(weighting_scheme=args.weighting_scheme, batch_size=bsz,
                                              logit_mean=args.logit_mean, logit_std=args.logit_std,
                                              mode_scale=args.mode_scale)
    indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
    timesteps = noise_scheduler_copy.timesteps[indices].to(device=model_input.device)
    sigmas = get_sigmas(noise_scheduler_copy, timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    model_pred = transformer(hidden_states=noisy_model_input, timestep=timesteps,
                             encoder_hidden_states=prompt_embeds, pooled_projections=pooled_prompt_embeds,
                             return_dict=False)[0]
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
    # The script's lines, for comparison:
    #   if args.precondition_outputs: model_pred = model_pred * (-sigmas) + noisy_model_input; target = model_input
    #   else: target = noise - model_input
    #   loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(bsz, -1), 1).mean()
    # ΔFM keeps the raw (velocity) prediction; preconditioning x̂ = x_t − σ·pred only rescales the weights by σ²:
    target = noise - model_input
    if args.precondition_outputs:
        weighting = weighting * sigmas**2  # ΔFM: ‖x̂ − x‖² = σ²‖pred − target‖²
    out = delta_fm_loss_diffusers(model_pred, target, lam=args.lam, weighting=weighting,  # ΔFM: the loss line
                                  negatives=args.negatives, generator=generator)
    data_mean.update(model_input)  # ΔFM: E[x] for the sampling-time correction
    return out


@torch.no_grad()
def sample(transformer: SD3Transformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler,
           text: tuple[Tensor, Tensor], args: argparse.Namespace, u_bar: Tensor | None) -> Tensor:
    """Latents from the unchanged ``StableDiffusion3Pipeline`` call; ``u_bar`` given: with the bias correction."""
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=copy.deepcopy(scheduler), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    handle = add_bias_correction(transformer, args.lam, u_bar) if u_bar is not None else None  # ΔFM
    try:
        prompt_embeds, pooled = (t[:1].to(args.device) for t in text)
        size = transformer.config.sample_size * pipe.vae_scale_factor
        return pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled,
                    negative_prompt_embeds=torch.zeros_like(prompt_embeds),
                    negative_pooled_prompt_embeds=torch.zeros_like(pooled), height=size, width=size,
                    num_inference_steps=args.sample_steps, guidance_scale=args.guidance, output_type="latent",
                    generator=torch.Generator(args.device).manual_seed(args.seed)).images
    finally:
        if handle is not None:
            handle.remove()  # ΔFM: back to the raw transformer


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Train ``--steps`` steps, then sample with and without the correction; returns the logs and latents."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    transformer, noise_scheduler = build(args)
    transformer.to(args.device).train()
    noise_scheduler_copy = copy.deepcopy(noise_scheduler)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.lr)
    negatives_generator = torch.Generator(args.device).manual_seed(args.seed)  # ΔFM: reproducible negatives
    data_mean = RunningMean(reduce_dims=(2, 3))  # ΔFM: per-channel E[x], fits any resolution
    logs: dict[str, list[float]] = {"loss": [], "positive": [], "negative": []}
    text = None
    for step, batch in enumerate(batches(transformer, args, torch.Generator().manual_seed(args.seed + 1))):
        out = train_step(transformer, noise_scheduler_copy, batch, args, data_mean, negatives_generator)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        for k in logs:
            logs[k].append(float(getattr(out, k).detach()))
        print(f"step {step + 1}: loss {logs['loss'][-1]:.4f}  positive (the FM loss) {logs['positive'][-1]:.4f}  "
              f"negative {logs['negative'][-1]:.4f}")
        text = batch[1:]
    transformer.eval()
    assert text is not None, "--steps must be >= 1"
    u_bar = u_bar_diffusers(data_mean)  # ΔFM: ū = E[ε] − E[x] = −E[x]
    raw = sample(transformer, noise_scheduler, text, args, None)
    corrected = sample(transformer, noise_scheduler, text, args, u_bar)
    print(f"sampled latents {tuple(corrected.shape)}; the correction moved them by "
          f"{(corrected - raw).pow(2).mean().sqrt():.4f} (RMS)")
    if args.out is not None:
        from safetensors.torch import save_file

        transformer.save_pretrained(args.out / "transformer")
        save_file(data_mean.state_dict(), str(args.out / "deltafm_latent_mean.safetensors"),
                  metadata={"lam": str(args.lam), "negatives": args.negatives})
    return {"logs": logs, "samples": corrected, "samples_uncorrected": raw, "u_bar": u_bar, "data_mean": data_mean}


if __name__ == "__main__":
    main()
