"""The textbook convolutional VAE for MNIST, in plain PyTorch: the reference for bench/quality.py.

Written the way tutorials write it (PyTorch's examples/vae, Keras' "Convolutional VAE"), with
no latentpipe imports and no tricks: a conv encoder 1->32->64 (4x4, stride 2: 28->14->7), a
linear layer to a 20-d diagonal Gaussian, the reparameterisation trick, a mirrored decoder
(linear -> 64x7x7 -> transposed convs 64->32->1), loss = BCE summed over pixels and images +
analytic KL, Adam(lr 1e-3), batch 128, shuffled every epoch. The decoder returns logits and
the loss uses ``binary_cross_entropy_with_logits``: the same objective as sigmoid + BCE, but
without the log(0) clamp.

    .venv/bin/python bench/textbook_vae.py --steps 300     # trains, prints the held-out -ELBO

`bench/quality.py` trains it for the same number of steps as latentpipe's own trainer and
evaluates both with `pipeline.evaluate.likelihood` through `EvaluatorView`.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

LATENT_DIM = 20


class TextbookConvVAE(nn.Module):
    def __init__(self, latent_dim: int = LATENT_DIM):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, 4, stride=2, padding=1),  # 28 -> 14
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1),  # 14 -> 7
            nn.ReLU(),
            nn.Flatten(),
        )
        self.fc_mu = nn.Linear(64 * 7 * 7, latent_dim)
        self.fc_logvar = nn.Linear(64 * 7 * 7, latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 64 * 7 * 7),
            nn.ReLU(),
            nn.Unflatten(1, (64, 7, 7)),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),  # 7 -> 14
            nn.ReLU(),
            nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1),  # 14 -> 28, logits
        )

    def encode(self, x):
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z):
        return self.decoder(z)

    def forward(self, x):
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar


def loss_function(logits, x, mu, logvar):
    """BCE + KL, both summed over pixels and over the batch (the tutorial's convention)."""
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def train_textbook(
    images: torch.Tensor, steps: int, batch_size: int = 128, lr: float = 1e-3, seed: int = 0
) -> TextbookConvVAE:
    """Train on ``images`` ((N, 1, 28, 28) in [0, 1]) for exactly ``steps`` Adam steps."""
    torch.manual_seed(seed)
    model = TextbookConvVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DataLoader(
        TensorDataset(images),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    model.train()
    step = 0
    while step < steps:
        for (x,) in loader:
            optimizer.zero_grad()
            logits, mu, logvar = model(x)
            loss = loss_function(logits, x, mu, logvar)
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    return model.eval()


class EvaluatorView(nn.Module):
    """The interface `pipeline.evaluate.likelihood` calls, around a `TextbookConvVAE`.

    ``encode(x, y) -> (mu, logvar)``, ``decode(z, y) -> logits`` and ``log_likelihood(x, out)``
    = ``-BCE`` summed over pixels per image (the Bernoulli log-likelihood the model trained on).
    Labels must be None: the model is unconditional.
    """

    def __init__(self, model: TextbookConvVAE):
        super().__init__()
        self.model = model

    def encode(self, x, y=None):
        assert y is None, "the textbook VAE is unconditional"
        return self.model.encode(x)

    def decode(self, z, y=None):
        return self.model.decode(z)

    def log_likelihood(self, x, logits):
        bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        return -bce.flatten(1).sum(dim=1)


def main() -> None:
    from pipeline.data.mnist import load_mnist_split, to_unit_tensor
    from pipeline.evaluate.likelihood import negative_elbo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    train_x = to_unit_tensor(load_mnist_split("train")[0])
    test_x = to_unit_tensor(load_mnist_split("test")[0])
    started = time.perf_counter()
    model = train_textbook(train_x, args.steps)
    nelbo = negative_elbo(EvaluatorView(model), test_x, generator=torch.Generator().manual_seed(0))
    print(f"{args.steps} steps in {time.perf_counter() - started:.0f} s: -ELBO {nelbo:.2f} nats")


if __name__ == "__main__":
    main()
