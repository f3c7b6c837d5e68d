"""Classic VAEs (MLP, conv, conditional): shapes, the textbook layout, exact ELBO terms."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.textbook import (
    MLPVAE,
    ClassicVAEConfig,
    ConditionalConvVAE,
    ConditionalVAE,
    ConvVAE,
    elbo_terms,
    gaussian_kl,
    gaussian_log_likelihood,
)

MODELS = [MLPVAE, ConvVAE, ConditionalVAE, ConditionalConvVAE]
CONDITIONAL = {ConditionalVAE, ConditionalConvVAE}


def _config(cls, likelihood="bernoulli", **kw) -> ClassicVAEConfig:
    num_classes = 10 if cls in CONDITIONAL else 0
    return ClassicVAEConfig(num_classes=num_classes, likelihood=likelihood, **kw)


def test_mlp_vae_is_the_pytorch_examples_vae():
    model = MLPVAE(ClassicVAEConfig())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    shapes = sorted(tuple(m.weight.shape) for m in linears)
    # fc1 784->400, fc21/fc22 400->20, fc3 20->400, fc4 400->784 (weights are out x in).
    assert shapes == sorted([(400, 784), (20, 400), (20, 400), (400, 20), (784, 400)])
    assert sum(p.numel() for p in model.parameters()) == 652_824


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_shapes_and_loss(cls, likelihood):
    torch.manual_seed(0)
    model = cls(_config(cls, likelihood))
    x = torch.rand(3, 1, 28, 28)
    y = torch.tensor([0, 4, 9]) if cls in CONDITIONAL else None
    out, mu, logvar = model(x, y)
    assert out.shape == x.shape and mu.shape == logvar.shape == (3, 20)
    assert model.decode(mu, y).shape == x.shape
    images = model.sample(5, None if y is None else torch.arange(5), torch.Generator())
    assert images.shape == (5, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    terms = elbo_terms(model, x, y, beta=0.5)
    assert set(terms) == {"loss", "recon", "kl", "nelbo"}
    assert torch.allclose(terms["loss"], terms["recon"] + 0.5 * terms["kl"])
    terms["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_conv_vae_small_config_and_validation():
    cfg = ClassicVAEConfig(image_size=16, in_channels=3, latent_dim=4, hidden_dims=[])
    cfg.conv_channels = [4, 8]
    model = ConvVAE(cfg)
    assert model(torch.rand(2, 3, 16, 16))[0].shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="divisible"):
        ConvVAE(ClassicVAEConfig(image_size=30))
    with pytest.raises(ValueError, match="not a valid Likelihood"):
        MLPVAE(ClassicVAEConfig(likelihood="laplace"))
    with pytest.raises(ValueError, match="shape"):
        model.encode(torch.rand(2, 1, 16, 16))


@pytest.mark.parametrize("cls", [ConditionalVAE, ConditionalConvVAE], ids=lambda c: c.__name__)
def test_conditional_generation(cls):
    torch.manual_seed(0)
    model = cls(_config(cls))
    labels = torch.tensor([3, 3, 7])
    images = model.generate(labels, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 28, 28)
    # Same prior draws, other labels: the label must reach the decoder.
    other = model.generate(torch.tensor([1, 1, 2]), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(images, other)
    x = torch.rand(2, 1, 28, 28)
    mu_a, _ = model.encode(x, torch.tensor([0, 0]))
    mu_b, _ = model.encode(x, torch.tensor([5, 5]))
    assert not torch.allclose(mu_a, mu_b)  # ... and the encoder
    with pytest.raises(ValueError, match="needs y"):
        model(x)
    with pytest.raises(ValueError, match="labels must be in"):
        model(x, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="expected 2 labels"):
        model(x, torch.tensor([0]))


def test_unconditional_rejects_labels_and_generate():
    model = MLPVAE(ClassicVAEConfig())
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.rand(1, 1, 28, 28), torch.tensor([1]))
    with pytest.raises(ValueError, match="conditional"):
        model.generate(torch.tensor([1]))
    with pytest.raises(ValueError, match="num_classes > 0"):
        ConditionalVAE(ClassicVAEConfig())


def _constant_model(likelihood="bernoulli", mu=0.0, logvar=0.0, out=0.0, **kw) -> MLPVAE:
    """An MLPVAE whose posterior is N(mu, e^logvar) and whose decoder outputs `out` for any z."""
    model = MLPVAE(ClassicVAEConfig(likelihood=likelihood, **kw))
    with torch.no_grad():
        for layer, bias in [(model.fc_mu, mu), (model.fc_logvar, logvar), (model.decoder[-1], out)]:
            layer.weight.zero_()
            layer.bias.fill_(bias)
    return model


def test_elbo_terms_golden_bernoulli():
    model = _constant_model(mu=0.5, logvar=math.log(2.0), out=1.0)
    x = torch.rand(4, 1, 28, 28)
    terms = elbo_terms(model, x, beta=2.0)
    # Decoder ignores z: recon is exactly BCE(logit 1) summed over 784 pixels.
    recon = -(x * F.logsigmoid(torch.tensor(1.0)) + (1 - x) * F.logsigmoid(torch.tensor(-1.0)))
    assert terms["recon"].item() == pytest.approx(recon.sum((1, 2, 3)).mean().item(), rel=1e-6)
    kl = 20 * 0.5 * (0.25 + 2.0 - 1.0 - math.log(2.0))
    assert terms["kl"].item() == pytest.approx(kl, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(terms["recon"].item() + 2 * kl, rel=1e-6)


def test_gaussian_likelihood_golden_and_fixed_sigma():
    model = _constant_model("gaussian", out=0.25, gaussian_sigma=0.5, learn_sigma=False)
    assert "log_sigma" not in dict(model.named_parameters())
    x = torch.full((2, 1, 28, 28), 0.75)
    per_pixel = 0.5 * 1.0**2 + math.log(0.5) + 0.5 * math.log(2 * math.pi)
    assert elbo_terms(model, x)["recon"].item() == pytest.approx(784 * per_pixel, rel=1e-6)
    learned = MLPVAE(ClassicVAEConfig(likelihood="gaussian"))
    assert learned.log_sigma.requires_grad
    mean, x = torch.rand(3, 5), torch.rand(3, 5)
    ref = torch.distributions.Normal(mean, 0.3).log_prob(x).sum(1)
    assert torch.allclose(gaussian_log_likelihood(x, mean, torch.tensor(math.log(0.3))), ref)


def test_kl_matches_torch_distributions():
    mu, logvar = torch.randn(6, 4), torch.randn(6, 4)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(4), torch.ones(4))
    ref = torch.distributions.kl_divergence(q, p).sum(1)
    assert torch.allclose(gaussian_kl(mu, logvar), ref, atol=1e-5)


def test_beta_schedule():
    from pipeline.train.loss_schedule import beta_schedule

    assert beta_schedule(0, 4.0, 100) == 0.0
    assert beta_schedule(25, 4.0, 100) == pytest.approx(1.0)
    assert beta_schedule(100, 4.0, 100) == beta_schedule(10_000, 4.0, 100) == 4.0
    assert beta_schedule(0, 0.5, 0) == 0.5
