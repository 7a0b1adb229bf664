"""Learned (neural network) attacks on the confidence vector.

* ML-Leaks (Salem et al. 2019, "ML-Leaks: Model and Data Independent Membership Inference
  Attacks and Defenses"): one attack model for all classes on the top-3 sorted probabilities.
* NSH-style (Nasr, Shokri, Houmansadr 2018/2019): the attack model also sees the true label
  (one-hot) and the true-class probability.

Features are log-probabilities (clipped at 1e-30), because an overfit model's member and
non-member confidences differ in how many nines follow 0.99, which raw probabilities squash.
The attack model is a small torch MLP (seeded inside a forked RNG) trained with binary
cross-entropy on shadow outputs in minibatches; its decision threshold is then fitted on all the
shadow outputs. How long it trains is each attack's default, chosen by measurement on the leaky
benchmark, undefended and through MemGuard, over several seeds:

* ML-Leaks takes a fixed 400 Adam steps (20 epochs of 1,024-row minibatches). Stopping it early
  on a validation split fits the shadow data as well but weakens what the model finds through
  MemGuard (an inverted signal: MemGuard's noise, aimed at the defender's own classifier, moves
  members the other way for this one); the longer-trained model keeps it.
* The NSH-style models (and the adaptive attack built on them) stop early: trained in 256-row
  minibatches until the loss on a held-out fifth of the sampled shadow rows stops improving,
  keeping the best weights, they are stronger than with a fixed step count, undefended and
  through MemGuard.

Either way a step sees a minibatch, not every training row: the full-batch steps this replaced
cost a pass over all 20,000 rows each.
"""

from __future__ import annotations

import numpy as np

from purifier.attacks.base import ConfidenceAttack
from purifier.attacks.metric import true_class_prob

SCORE_CHUNK = 65_536  # rows featurised at a time: bounds the (rows, features) temporaries


def _logp(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p, 1e-30, 1.0))


class NNAttack(ConfidenceAttack):
    """ML-Leaks: MLP on the top-k sorted log-probabilities (k = 3 by default).

    Args:
        max_train: shadow rows the model trains on (a random sample when there are more).
        validation: share of the sampled shadow rows held out for early stopping (at most
            `max_validation` rows); 0 trains for `max_epochs` and keeps the last weights.
        batch_size, lr: Adam minibatches.
        max_epochs, patience: stop `patience` epochs after the validation loss last improved.
    """

    name = "nn"
    DEFAULTS = {"validation": 0.0, "batch_size": 1024, "lr": 3e-3, "max_epochs": 20}

    def __init__(self, *, top_k: int = 3, hidden: tuple[int, ...] = (64, 64), max_train: int = 20_000,
                 validation: float | None = None, max_validation: int = 5_000, batch_size: int | None = None,
                 lr: float | None = None, max_epochs: int | None = None, patience: int = 5, seed: int = 0):
        super().__init__(seed=seed)
        d = self.DEFAULTS
        self.validation = float(d["validation"] if validation is None else validation)
        self.batch_size = int(d["batch_size"] if batch_size is None else batch_size)
        self.lr = float(d["lr"] if lr is None else lr)
        self.max_epochs = int(d["max_epochs"] if max_epochs is None else max_epochs)
        self.top_k, self.hidden, self.max_train = top_k, hidden, max_train
        self.max_validation, self.patience = max_validation, patience

    def features(self, probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        k = min(self.top_k, probs.shape[1])
        return _logp(-np.sort(-probs, axis=1)[:, :k])

    def _fit_scorer(self, probs, labels, membership):
        import torch

        from purifier.models.training import seeded, train_epochs

        rng = np.random.default_rng(self.seed)
        n_val = min(int(self.validation * len(labels)), self.max_validation)
        idx = rng.permutation(len(labels))[: n_val + self.max_train]
        f = self.features(probs[idx], labels[idx])
        self.mean, self.std = f.mean(axis=0), f.std(axis=0) + 1e-6
        x = torch.from_numpy(((f - self.mean) / self.std).astype(np.float32))
        t = torch.from_numpy(membership[idx].astype(np.float32))
        x_val, t_val, x, t = x[:n_val], t[:n_val], x[n_val:], t[n_val:]
        with seeded(self.seed) as gen:
            layers, width = [], x.shape[1]
            for h in self.hidden:
                layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
                width = h
            self.model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
            opt = torch.optim.Adam(self.model.parameters(), lr=self.lr, weight_decay=1e-4)
            loss_fn = torch.nn.BCEWithLogitsLoss()

            def step(i):
                opt.zero_grad()
                loss_fn(self.model(x[i])[:, 0], t[i]).backward()
                opt.step()
                return {}

            best, best_loss, since, epochs = None, float("inf"), 0, 0
            while epochs < self.max_epochs and since < self.patience:
                train_epochs(step, len(t), epochs=1, batch_size=self.batch_size, generator=gen)
                epochs += 1
                if n_val == 0:  # nothing held out: train for max_epochs
                    continue
                with torch.no_grad():
                    loss = float(loss_fn(self.model(x_val)[:, 0], t_val))
                if loss < best_loss:
                    best_loss, since = loss, 0
                    best = {k: v.clone() for k, v in self.model.state_dict().items()}
                else:
                    since += 1
            if best is not None:
                self.model.load_state_dict(best)
        self.model.eval()
        self.details = {**self.details, "epochs": epochs, "train_rows": len(t), "validation_rows": n_val,
                        **({"validation_loss": round(best_loss, 5)} if best is not None else {})}

    def score(self, outputs, labels):
        import torch

        from purifier.threads import single_threaded

        out = np.empty(len(labels))
        with single_threaded(), torch.no_grad():
            for s in range(0, len(labels), SCORE_CHUNK):  # a loop over chunks of rows
                f = (self.features(outputs[s:s + SCORE_CHUNK], labels[s:s + SCORE_CHUNK]) - self.mean) / self.std
                # the logit: keeps the ranking of rows a sigmoid would round to 1.0
                out[s:s + len(f)] = self.model(torch.from_numpy(f.astype(np.float32)))[:, 0].double().numpy()
        return out


class NNLabelAttack(NNAttack):
    """NSH-style: sorted log-probabilities, log p_y and the one-hot true label."""

    name = "nn_label"
    DEFAULTS = {"validation": 0.2, "batch_size": 256, "lr": 1e-3, "max_epochs": 100}

    def features(self, probs, labels):
        onehot = np.arange(probs.shape[1]) == np.asarray(labels)[:, None]
        return np.concatenate([_logp(-np.sort(-probs, axis=1)), _logp(true_class_prob(probs, labels))[:, None],
                               onehot], axis=1)
