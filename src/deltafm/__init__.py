"""deltafm: Contrastive Flow Matching (ΔFM) for PyTorch."""

__version__ = "0.1.0"
