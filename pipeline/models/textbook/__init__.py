"""The textbook VAEs, kept apart from the SD-class autoencoders: MLP, convolutional and
class-conditional VAEs with a vector latent (Kingma & Welling 2014; Sohn et al. 2015 for the
conditional ones), trained on the (beta-)ELBO and evaluated by likelihood (ELBO, IWAE NLL).
``model.kind``: mlp_vae | conv_vae | cvae | conv_cvae; they read only ``model.classic``.
"""

from pipeline.models.textbook.vae import (
    CLASSIC_MODELS,
    LIKELIHOODS,
    MLPVAE,
    ClassicVAE,
    ClassicVAEConfig,
    ConditionalConvVAE,
    ConditionalVAE,
    ConvVAE,
    Likelihood,
    bernoulli_log_likelihood,
    elbo_from_outputs,
    elbo_terms,
    gaussian_kl,
    gaussian_log_likelihood,
)

__all__ = [
    "CLASSIC_MODELS",
    "ClassicVAE",
    "ClassicVAEConfig",
    "ConditionalConvVAE",
    "ConditionalVAE",
    "ConvVAE",
    "LIKELIHOODS",
    "Likelihood",
    "MLPVAE",
    "bernoulli_log_likelihood",
    "elbo_from_outputs",
    "elbo_terms",
    "gaussian_kl",
    "gaussian_log_likelihood",
]
