#!/usr/bin/env bash
# The latent main job on the embedded Fashion-MNIST, end to end on a CPU (about 13 minutes on 2 cores):
#   1. train a small diffusers AutoencoderKL (28x28 gray -> 4x7x7 latents, scale = 1/std)  runs/ae-fmnist28/vae
#   2. encode Fashion-MNIST's training split with it (posterior mean and std)              runs/fmnist-latents
#   3. train SiT-N/1 with ΔFM on the latents; grids decoded with the VAE                   runs/fmnist-latent-sit-deltafm
# Each step resumes where it stopped when the script is run again (and skips what is finished).
# The same three commands run the paper's setting on a GPU cluster with SD-VAE: see docs/LATENTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DELTAFM=${DELTAFM:-.venv/bin/deltafm}
"$DELTAFM" train-autoencoder --image-size 28 --out runs/ae-fmnist28 --resume auto
"$DELTAFM" prepare-latents --dataset fashion-mnist --vae runs/ae-fmnist28/vae --image-size 28 --out runs/fmnist-latents
"$DELTAFM" train --preset fmnist-latent-sit-deltafm --out runs/fmnist-latent-sit-deltafm --resume auto
