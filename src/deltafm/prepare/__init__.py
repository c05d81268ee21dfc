"""Data preparation for latent models: ``deltafm train-autoencoder`` and ``deltafm prepare-latents``."""
