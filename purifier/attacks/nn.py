"""Learned (neural network) attacks on the confidence vector.

* ML-Leaks (Salem et al. 2019, "ML-Leaks: Model and Data Independent Membership Inference
  Attacks and Defenses"): one attack model for all classes on the top-3 sorted probabilities.
* NSH-style (Nasr, Shokri, Houmansadr 2018/2019): the attack model also sees the true label
  (one-hot) and the true-class probability.

Features are log-probabilities (clipped at 1e-30), because an overfit model's member and
non-member confidences differ in how many nines follow 0.99, which raw probabilities squash.
The attack model is a small torch MLP (seeded inside a forked RNG), trained full-batch on shadow
outputs with binary cross-entropy; its decision threshold is then fitted on the same outputs.
"""

from __future__ import annotations

import numpy as np

from purifier.attacks.base import ConfidenceAttack
from purifier.attacks.metric import true_class_prob


def _logp(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p, 1e-30, 1.0))


class NNAttack(ConfidenceAttack):
    """ML-Leaks: MLP on the top-k sorted log-probabilities (k = 3 by default)."""

    name = "nn"

    def __init__(self, *, top_k: int = 3, hidden: tuple[int, ...] = (64, 64), steps: int = 400,
                 max_train: int = 20_000, seed: int = 0):
        super().__init__(seed=seed)
        self.top_k, self.hidden, self.steps, self.max_train = top_k, hidden, steps, max_train

    def features(self, probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        k = min(self.top_k, probs.shape[1])
        return _logp(-np.sort(-probs, axis=1)[:, :k])

    def _fit_scorer(self, probs, labels, membership):
        import torch

        rng = np.random.default_rng(self.seed)
        idx = rng.permutation(len(labels))[: self.max_train]
        f = self.features(probs[idx], labels[idx])
        self.mean, self.std = f.mean(axis=0), f.std(axis=0) + 1e-6
        x = torch.from_numpy(((f - self.mean) / self.std).astype(np.float32))
        t = torch.from_numpy(membership[idx].astype(np.float32))
        from purifier.models.training import seeded, train_epochs

        with seeded(self.seed) as gen:
            layers, width = [], x.shape[1]
            for h in self.hidden:
                layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
                width = h
            self.model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
            opt = torch.optim.Adam(self.model.parameters(), lr=3e-3, weight_decay=1e-4)
            loss_fn = torch.nn.BCEWithLogitsLoss()

            def step(idx):
                opt.zero_grad()
                loss_fn(self.model(x[idx])[:, 0], t[idx]).backward()
                opt.step()
                return {}

            # full-batch steps (a few thousand rows of a few features): one "epoch" per step
            train_epochs(step, len(t), epochs=self.steps, batch_size=len(t), generator=gen)
        self.model.eval()

    def score(self, outputs, labels):
        import torch

        f = (self.features(outputs, labels) - self.mean) / self.std
        with torch.no_grad():  # the logit: keeps the ranking of rows a sigmoid would round to 1.0
            return self.model(torch.from_numpy(f.astype(np.float32)))[:, 0].double().numpy()


class NNLabelAttack(NNAttack):
    """NSH-style: sorted log-probabilities, log p_y and the one-hot true label."""

    name = "nn_label"

    def features(self, probs, labels):
        onehot = np.eye(probs.shape[1])[labels]
        return np.concatenate([_logp(-np.sort(-probs, axis=1)), _logp(true_class_prob(probs, labels))[:, None],
                               onehot], axis=1)
