"""Llama-family model and checkpoint loaders used by quant4's scripts and tests."""
from .llama import ModelArgs, Transformer

__all__ = ["ModelArgs", "Transformer"]
