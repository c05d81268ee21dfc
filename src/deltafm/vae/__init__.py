"""Autoencoders for latent flow matching (diffusers ``AutoencoderKL``): load, encode to posterior moments,
decode model-space latents. diffusers is imported only when a VAE is loaded (extra ``deltafm[vae]``)."""

from deltafm.vae.autoencoder import Autoencoder, AutoencoderError, check_vae_folder, load_autoencoder, vae_identity

__all__ = ["Autoencoder", "AutoencoderError", "check_vae_folder", "load_autoencoder", "vae_identity"]
