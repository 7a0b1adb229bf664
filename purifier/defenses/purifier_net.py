"""PURIFIER: a learned confidence reformer served with ONNX Runtime, plus an opt-in label swapper.

Yang et al., "Purifier: Defending Data Inference Attacks via Transforming Confidence Scores"
(AAAI 2023), and the 2020 preprint (arXiv 2005.03915). The reformer G is a CVAE conditioned on
the predicted label (`purifier.defenses.cvae`), trained on the target's outputs over the
defender's non-member reference set; at serving time its encoder + decoder run as one ONNX graph
on whole batches. Per row s (C,), k = argmax s:

1. z-noise: e = KeyedPRF(secret, model).normal(s, "purifier-latent", L) (deterministic: the same
   query gets the same answer), or e = 0 in `noise="mean"` mode (the latent mean);
2. g = G(s, e);
3. label repair: if argmax g != k, the least L1 movement that makes k the top class again: clip
   every other entry to a level c and give the excess to k, with g_k = c (1 + 2^-7) so the label
   survives a cast to FP16 (`purifier.defenses.repair`);
4. budget (optional, `budget`=eps): out = s + t (g - s) with t = min(1, eps / ||g - s||_1), so
   ||out - s||_1 <= eps exactly; both ends share the top class, so the blend does too;
5. label swapper (optional): for indexed members, exchange the top two entries
   (`purifier.defenses.label_swap`); only those rows may change their label, and they are
   exempt from the budget (changing the label is the point);
6. `finalize`: dtype, simplex, and the clean row as a last resort.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from purifier.defenses import label_swap
from purifier.defenses.base import Defense, FitData, Knob
from purifier.defenses.keyed import KeyedPRF
from purifier.defenses.no_op import ReferenceSample
from purifier.defenses.repair import blend_to_budget, repair_top
from purifier.devices import check_device
from purifier.errors import ArtifactError, ConfigError, DefenseError

if TYPE_CHECKING:
    from purifier.defenses.cvae import CVAE
    from purifier.models.onnx_runner import OnnxClassifier

ONNX_FILE, INDEX_FILE = "reformer.onnx", "member_index.npy"
NOISE_MODES = ("keyed", "mean")


class PurifierNet(Defense):
    """The PURIFIER defense. Hyper-parameters (all keyword, with defaults):

    Args:
        epochs, lr, batch_size, seed: CVAE training (Adam).
        lam: weight of CE(G(s), argmax s) (the 2020 paper's lambda).
        kl_weight: weight of the KL term.
        beta: weight of the 2020 discriminator term (0 = off).
        noise: "keyed" (latent noise from the keyed PRF) or "mean" (zero noise, the latent mean).
        budget: optional per-row L1 budget eps (None = none).
        label_swap: enable the label swapper (needs the request's input rows).
        swap_fraction: fraction of correctly classified members to swap (None = q* from data).
        holdout: fraction of the reference set kept out of training to report on.
        device: "cpu" | "cuda" | "auto" for training and the ORT session (`serve_on` moves the
            session).
        secret: the PRF key (required for `noise="keyed"` and the swapper).
    """

    name = "purifier"
    knob = Knob("budget", (0.02, 0.05, 0.1, 0.2, 0.5, None), "larger", float, "L1 budget")  # None: no cap

    def __init__(self, *, epochs: int = 300, lr: float = 3e-3, batch_size: int = 64, seed: int = 0,
                 lam: float = 1.0, kl_weight: float = 1.0, beta: float = 0.0, noise: str = "keyed",
                 budget: float | None = None, label_swap: bool = False,
                 swap_fraction: float | None = None, holdout: float = 0.2, device: str = "cpu",
                 secret: bytes | None = None):
        super().__init__(secret=secret)
        if noise not in NOISE_MODES:
            raise ConfigError(f"noise: {noise!r} is not one of {', '.join(NOISE_MODES)}")
        if budget is not None and not budget > 0:
            raise ConfigError(f"budget: must be a positive L1 distance or None, got {budget}")
        if swap_fraction is not None and not 0.0 <= swap_fraction <= 1.0:
            raise ConfigError(f"swap_fraction: must lie in [0, 1] or be None, got {swap_fraction}")
        if not 0.0 <= holdout < 0.9:
            raise ConfigError(f"holdout: must lie in [0, 0.9), got {holdout}")
        for field, value in (("epochs", epochs), ("batch_size", batch_size)):
            if int(value) < 1:
                raise ConfigError(f"{field}: must be a positive integer, got {value}")
        for field, rate in (("lr", lr), ("lam", lam), ("kl_weight", kl_weight), ("beta", beta)):
            if not rate >= 0:
                raise ConfigError(f"{field}: must be >= 0, got {rate}")
        self.epochs, self.lr, self.batch_size, self.seed = int(epochs), float(lr), int(batch_size), int(seed)
        self.lam, self.kl_weight, self.beta = float(lam), float(kl_weight), float(beta)
        self.noise, self.budget, self.label_swap = noise, budget, bool(label_swap)
        self.swap_fraction, self.holdout, self.device = swap_fraction, float(holdout), device
        self.n_features: int | None = None
        self.key_check = ""
        self.realized_swap_fraction: float | None = None
        self.member_index = np.zeros(0, np.uint64)
        self.latent_dim = 0
        self.model: CVAE | None = None  # the torch CVAE, present only after fit (parity checks)
        self._session: OnnxClassifier | None = None
        self._session_device = device
        self._onnx_bytes: bytes | None = None
        self.fit_report: dict = {}

    @property
    def needs_inputs(self) -> bool:  # the sidecar passes request rows only when this is True
        return self.label_swap

    def _prf(self) -> KeyedPRF:
        if self.secret is None:
            raise ConfigError("secret: PURIFIER's keyed noise and label swapper need the PRF secret; "
                              "set PURIFIER_SECRET, PURIFIER_SECRET_FILE or --secret-file")
        return KeyedPRF(self.secret, self.model_id)

    # --- fitting -----------------------------------------------------------------------------

    def fit(self, data: FitData, progress: bool = False) -> PurifierNet:
        from purifier.defenses.cvae import export_reformer, train_cvae
        from purifier.models.onnx_runner import OnnxClassifier

        super().fit(data)
        if self.noise == "keyed" or self.label_swap:
            self._prf()  # fail before training, not after
        ref = np.asarray(data.reference_probs, np.float64)
        order = np.random.default_rng(self.seed).permutation(len(ref))
        n_hold = int(round(self.holdout * len(ref)))
        train_idx, hold_idx = order[n_hold:], order[:n_hold]
        t0 = time.perf_counter()
        self.model = train_cvae(ref[train_idx], epochs=self.epochs, lr=self.lr, lam=self.lam,
                                kl_weight=self.kl_weight, beta=self.beta, batch_size=self.batch_size,
                                seed=self.seed, device=self.device, progress=progress)
        self.latent_dim = self.model.latent
        self._onnx_bytes = export_reformer(self.model)
        self._session = OnnxClassifier(self._onnx_bytes, device=self.device)
        self.n_features = int(data.member_inputs.shape[1])
        if self.label_swap:
            self.fit_swapper(data)
        self.fit_report = {"train_seconds": round(time.perf_counter() - t0, 2),
                           "reference_train": int(len(train_idx)), "reference_holdout": int(len(hold_idx))}
        if n_hold:
            self.fit_report.update(self.holdout_report(ref[hold_idx]))
        return self

    def fit_summary(self, data: FitData) -> tuple[dict, list[str]]:
        """Lines for `purifier fit-defense` from `fit_report` (already saved with the defense)."""
        r = self.fit_report
        lines = [f"{self.n_classes} classes, latent {self.latent_dim}; trained on {r['reference_train']} reference "
                 f"rows in {r['train_seconds']:.1f}s; held-out reference rows: {r['reference_holdout']}"]
        if "reconstruction_l2" in r:
            lines += [f"reconstruction error (L2)    {r['reconstruction_l2']:.4f}",
                      f"label agreement (raw / served) {r['raw_label_agreement']:.4f} / {r['label_agreement']:.4f}",
                      f"distortion L1 mean / max     {r['mean_l1']:.4f} / {r['max_l1']:.4f}"]
        if self.label_swap:
            lines.append(f"label swapper: {len(self.member_index)} members indexed "
                         f"(fraction {self.realized_swap_fraction:.4f})")
        return {}, lines

    def fit_swapper(self, data: FitData) -> PurifierNet:
        """Build the label swapper's keyed member index from `data` (members' inputs, correctness).
        Swaps `swap_fraction` of the correctly classified members, or q* = 1 - a_n / a_m."""
        prf = self._prf()
        m_correct = data.member_probs.argmax(1) == data.member_labels
        r_correct = data.reference_probs.argmax(1) == data.reference_labels
        q = label_swap.swap_fraction(m_correct, r_correct) if self.swap_fraction is None else self.swap_fraction
        self.member_index = label_swap.build_index(prf, data.member_inputs, m_correct, q)
        self.key_check = label_swap.key_check(prf)
        self.realized_swap_fraction = len(self.member_index) / max(1, len(data.member_inputs))
        self.n_features = int(data.member_inputs.shape[1])
        # the no-op check applies the defense to reference rows: with the swapper, their inputs too
        self.reference_sample = ReferenceSample.from_rows(data.reference_probs, data.reference_inputs)
        return self

    def with_options(self, *, noise: str | None = None, budget: float | None = None,
                     label_swap: bool | None = None, swap_fraction: float | None = None,
                     secret: bytes | None = None) -> PurifierNet:
        """A copy sharing this fitted reformer with other serving options (no retraining).
        Turning the swapper on needs `fit_swapper(data)` on the copy afterwards."""
        cfg = self.config()
        for key, value in (("noise", noise), ("budget", budget), ("label_swap", label_swap),
                           ("swap_fraction", swap_fraction)):
            if value is not None:
                cfg[key] = value
        twin = PurifierNet(**cfg, secret=self.secret if secret is None else secret)
        for attr in ("n_classes", "model_id", "fingerprint", "reference_sample", "n_features", "latent_dim", "model",
                     "_session", "_session_device", "_onnx_bytes",
                     "fit_report", "member_index", "key_check", "realized_swap_fraction"):
            setattr(twin, attr, getattr(self, attr))
        return twin

    def holdout_report(self, s: np.ndarray) -> dict:
        """Reconstruction error, label agreement and distortion of the raw reformer and of the
        served transform on held-out reference rows s (H, C)."""
        from purifier.defenses.base import finalize

        g = self._reform(s)
        out = finalize(s, self._purify(s))
        l1 = np.abs(out.astype(np.float64) - s).sum(1)
        return {"reconstruction_l2": float(np.linalg.norm(g - s, axis=1).mean()),
                "raw_label_agreement": float((g.argmax(1) == s.argmax(1)).mean()),
                "label_agreement": float((out.argmax(1) == s.argmax(1)).mean()),
                "mean_l1": float(l1.mean()), "max_l1": float(l1.max())}

    # --- serving -----------------------------------------------------------------------------

    def serve_on(self, device: str) -> None:
        """The reformer's onnxruntime session on `device` (the CUDA provider for cuda)."""
        from purifier.models.onnx_runner import OnnxClassifier

        check_device(device)
        if self._onnx_bytes is not None and device != self._session_device:
            self._session = OnnxClassifier(self._onnx_bytes, device=device)
        self._session_device = device

    def _noise(self, p: np.ndarray) -> np.ndarray:
        if self.noise == "mean":
            return np.zeros((len(p), self.latent_dim), np.float32)
        return self._prf().normal(p, "purifier-latent", self.latent_dim).astype(np.float32)

    def _reform(self, p: np.ndarray) -> np.ndarray:
        """(N, C) float64 -> G(p) (N, C) float64 from the ONNX session."""
        if self._session is None:
            raise DefenseError("purifier: the defense is not fitted (no reformer loaded)")
        try:
            g = self._session(np.ascontiguousarray(p, np.float32), self._noise(p))
        except Exception as e:  # onnxruntime's own exception types; fail closed with a clear error
            raise DefenseError(f"purifier: reformer failed ({str(e).splitlines()[0]})") from None
        return g.astype(np.float64)

    def _purify(self, p: np.ndarray) -> np.ndarray:
        """Steps 1-4 of the module docstring: (N, C) float64 -> (N, C) float64, argmax kept."""
        g = self._reform(p)
        g /= g.sum(axis=1, keepdims=True)
        g = repair_top(g, p.argmax(axis=1))
        return g if self.budget is None else blend_to_budget(p, g, self.budget)

    def _transform(self, p: np.ndarray, inputs: np.ndarray | None):
        g = self._purify(p)
        if not self.label_swap:
            return g, None
        if inputs is None:
            raise DefenseError("purifier: the label swapper needs the request's input rows (inputs=None)")
        if inputs.ndim != 2 or inputs.shape != (len(p), self.n_features):
            raise DefenseError(f"purifier: input rows have shape {getattr(inputs, 'shape', None)}, "
                               f"expected ({len(p)}, {self.n_features})")
        member = label_swap.lookup(self.member_index, label_swap.row_keys(self._prf(), inputs))
        return label_swap.swap_top_two(g, member), ~member

    # --- persistence -------------------------------------------------------------------------

    def config(self) -> dict:
        return {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "seed": self.seed,
                "lam": self.lam, "kl_weight": self.kl_weight, "beta": self.beta, "noise": self.noise,
                "budget": self.budget, "label_swap": self.label_swap, "swap_fraction": self.swap_fraction,
                "holdout": self.holdout, "device": self.device}

    def save(self, directory, extra: dict | None = None) -> Path:
        state = {"latent_dim": self.latent_dim, "n_features": self.n_features, "key_check": self.key_check,
                 "realized_swap_fraction": self.realized_swap_fraction, "fit_report": self.fit_report}
        return super().save(directory, {"purifier": state, **(extra or {})})

    def _save_arrays(self, directory: Path) -> list[str]:
        if self._onnx_bytes is None:
            raise DefenseError("purifier: fit the defense before saving it")
        (directory / ONNX_FILE).write_bytes(self._onnx_bytes)
        files = [ONNX_FILE]
        if self.label_swap:
            np.save(directory / INDEX_FILE, self.member_index, allow_pickle=False)
            files.append(INDEX_FILE)
        return files

    @classmethod
    def from_manifest(cls, directory: Path, manifest: dict, secret: bytes | None) -> PurifierNet:
        state = manifest.get("purifier")
        if not isinstance(state, dict) or not {"latent_dim", "n_features", "key_check"} <= state.keys():
            raise ArtifactError(f"{directory}/defense.json: missing the 'purifier' section")
        obj = cls._from_config(manifest["config"], secret) if isinstance(manifest["config"], dict) else None
        if obj is None:
            raise ArtifactError(f"{directory}/defense.json: config must be an object")
        obj.latent_dim, obj.n_features = int(state["latent_dim"]), state["n_features"]
        obj.key_check, obj.realized_swap_fraction = state["key_check"], state.get("realized_swap_fraction")
        obj.fit_report = state.get("fit_report", {})
        obj.n_classes, obj.model_id = manifest["n_classes"], manifest["model_id"]
        obj._load_arrays(directory)
        return obj

    @classmethod
    def _from_config(cls, config: dict, secret: bytes | None) -> PurifierNet:
        try:
            return cls(**config, secret=secret)
        except TypeError as e:
            raise ArtifactError(f"defense.json: config does not fit PurifierNet ({e})") from None

    def _load_arrays(self, directory: Path) -> None:
        from purifier.models.onnx_runner import OnnxClassifier

        self._onnx_bytes = (directory / ONNX_FILE).read_bytes()
        self._session = OnnxClassifier(self._onnx_bytes, device=self.device)
        shapes = {i.name: i.shape for i in self._session.session.get_inputs()}
        if shapes.get("probs", [None, None])[1] != self.n_classes or shapes.get("noise", [None, None])[1] != self.latent_dim:
            raise ArtifactError(f"{directory}/{ONNX_FILE}: graph inputs {shapes} do not match "
                                f"{self.n_classes} classes and latent size {self.latent_dim}")
        if self.label_swap:
            try:
                self.member_index = np.load(directory / INDEX_FILE, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ArtifactError(f"{directory}/{INDEX_FILE}: cannot read the member index ({e})") from None
            label_swap.check_index(self.member_index, self.key_check,
                                   self._prf() if self.secret is not None else None)
