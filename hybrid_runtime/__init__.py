"""Hybrid CPU-GPU inference runtime for activation-sparse LLaMA-family models."""
__version__ = "0.1.0"
