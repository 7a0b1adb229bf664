"""PURIFIER's confidence reformer: a CVAE conditioned on the predicted label, trained in torch.

Yang et al., "Purifier: Defending Data Inference Attacks via Transforming Confidence Scores"
(AAAI 2023) replace the 2020 preprint's autoencoder (arXiv 2005.03915, "Defending Model
Inversion and Membership Inference Attacks via Prediction Purification") by a conditional VAE:
the encoder sees [confidence; one-hot predicted label], the decoder [latent; one-hot label] and
ends in a softmax. It is trained on the target's outputs over the defender's *non-member*
reference set only, so whatever it is fed it answers with a vector that looks like a
non-member's output for that label.

Loss per row (averaged over the batch), s = clean confidence (C,), k = argmax s:

    ||G(s) - s||_2  +  lambda * CE(G(s), k)  +  kl_weight * KL(q(z|s,k) || N(0, I))
                    [+ beta * BCE(D(sort(G(s))), real)]   (2020 discriminator, optional)

The official code was never published; the sizes are our choice (see `layer_sizes`), chosen to
match the published bottlenecks (CIFAR10 10 -> 4, Purchase100 100 -> 10).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

PROBS_INPUT, NOISE_INPUT, OUTPUT = "probs", "noise", "purified"


def layer_sizes(n_classes: int) -> tuple[int, int]:
    """(hidden width, latent size) for C classes.

    latent = max(2, C // 10 + 2) keeps the published bottlenecks' order (10 classes -> 3,
    100 -> 12): small enough that the decoder cannot copy the fine detail of a near one-hot member
    vector. hidden = clamp(2 C, 32, 256) gives the decoder room to produce smooth class-conditional
    vectors (the 2020 paper's Purchase100 net is 50 wide) while the graph stays cheap: about 90k
    multiply-adds per row at 100 classes, a few microseconds at batch 1.
    """
    return min(max(2 * n_classes, 32), 256), max(2, n_classes // 10 + 2)


class CVAE(nn.Module):
    """Encoder [s; onehot] -> (mu, logvar) (N, L); decoder [z; onehot] -> softmax (N, C)."""

    def __init__(self, n_classes: int, hidden: int, latent: int):
        super().__init__()
        self.n_classes, self.latent = n_classes, latent
        self.encoder = nn.Sequential(nn.Linear(2 * n_classes, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden), nn.ReLU())
        self.to_mu = nn.Linear(hidden, latent)
        self.to_logvar = nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(nn.Linear(latent + n_classes, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, n_classes))

    def onehot(self, probs: torch.Tensor) -> torch.Tensor:
        # first index on ties, like numpy's argmax and ONNX ArgMax (select_last_index=0)
        return nn.functional.one_hot(torch.argmax(probs, dim=1), self.n_classes).to(probs.dtype)

    def encode(self, probs: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(torch.cat([probs, onehot], dim=1))
        # bounded log-variance: keeps exp() finite for inputs far from the reference distribution
        return self.to_mu(h), torch.clamp(self.to_logvar(h), -10.0, 4.0)

    def decode_logits(self, z: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z, onehot], dim=1))

    def forward(self, probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The served graph. probs (N, C), noise (N, L) standard normal (zeros = latent mean)
        -> purified probabilities (N, C)."""
        onehot = self.onehot(probs)
        mu, logvar = self.encode(probs, onehot)
        z = mu + torch.exp(0.5 * logvar) * noise
        return torch.softmax(self.decode_logits(z, onehot), dim=1)


def _discriminator(n_classes: int, hidden: int) -> nn.Module:
    """The 2020 preprint's discriminator: real reference vector vs purified, on sorted probabilities
    (sorting removes the label, which the reformer is not asked to hide)."""
    return nn.Sequential(nn.Linear(n_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def train_cvae(probs: np.ndarray, *, epochs: int, lr: float, lam: float, kl_weight: float, beta: float,
               batch_size: int, seed: int, device: str = "cpu", progress: bool = True) -> CVAE:
    """Fit the reformer on reference confidences `probs` (R, C) float; returns it in eval mode on CPU.

    Initialisation, shuffling and the reparameterisation noise draw from a forked torch RNG
    seeded with `seed`: the caller's global RNG state is untouched.
    """
    from purifier.devices import torch_device
    from purifier.models.training import seeded, train_epochs

    n_classes = probs.shape[1]
    hidden, latent = layer_sizes(n_classes)
    dev = torch_device(device)
    with seeded(seed) as gen:
        model = CVAE(n_classes, hidden, latent).to(dev)
        disc = _discriminator(n_classes, hidden).to(dev) if beta > 0 else None
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        opt_d = torch.optim.Adam(disc.parameters(), lr=lr) if disc is not None else None
        S = torch.from_numpy(np.ascontiguousarray(probs, np.float32)).to(dev)
        bce = nn.BCEWithLogitsLoss()
        model.train()

        def step(idx):
            s = S[idx]
            onehot = model.onehot(s)
            mu, logvar = model.encode(s, onehot)
            eps = torch.randn(mu.shape, generator=gen).to(dev)
            out_logits = model.decode_logits(mu + torch.exp(0.5 * logvar) * eps, onehot)
            out = torch.softmax(out_logits, dim=1)
            recon = torch.linalg.vector_norm(out - s, dim=1).mean()
            ce = nn.functional.cross_entropy(out_logits, onehot.argmax(dim=1))
            kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()
            loss = recon + lam * ce + kl_weight * kl
            if disc is not None:
                fake = torch.sort(out, dim=1).values
                loss = loss + beta * bce(disc(fake), torch.ones(len(s), 1, device=dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if disc is not None and opt_d is not None:
                real, fake = torch.sort(s, dim=1).values, fake.detach()
                d_loss = bce(disc(real), torch.ones(len(s), 1, device=dev)) + \
                    bce(disc(fake), torch.zeros(len(s), 1, device=dev))
                opt_d.zero_grad()
                d_loss.backward()
                opt_d.step()
            return {"recon": float(recon.detach()), "ce": float(ce.detach()), "kl": float(kl.detach())}

        train_epochs(step, len(S), epochs=epochs, batch_size=batch_size, generator=gen, device=dev,
                     label="purifier cvae", progress=progress)
    return model.cpu().eval()


def export_reformer(model: CVAE) -> bytes:
    """ONNX bytes of the served graph (probs, noise) -> purified, FP32, weights inside."""
    from purifier.models.onnx_runner import export_onnx

    example = (torch.full((2, model.n_classes), 1.0 / model.n_classes), torch.zeros(2, model.latent))
    return export_onnx(model, example, [PROBS_INPUT, NOISE_INPUT], [OUTPUT])


@torch.no_grad()
def torch_reformer(model: CVAE, probs: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The torch reference of the served graph (for parity checks): (N, C), (N, L) -> (N, C) float32."""
    return model(torch.from_numpy(np.ascontiguousarray(probs, np.float32)),
                 torch.from_numpy(np.ascontiguousarray(noise, np.float32))).numpy()
