"""Held-out evaluation of generative models: ELBO, importance-weighted NLL, bits per dimension."""

from pipeline.evaluate.likelihood import (
    bits_per_dim,
    dequantize,
    discretization_correction,
    iwae_nll,
    log_importance_weights,
    negative_elbo,
)

__all__ = [
    "bits_per_dim",
    "dequantize",
    "discretization_correction",
    "iwae_nll",
    "log_importance_weights",
    "negative_elbo",
]
