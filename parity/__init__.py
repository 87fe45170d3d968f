"""parity: layer-by-layer numerical parity between an HF PLoRA model and its TurboMind deployment."""

__version__ = "0.1.0"
