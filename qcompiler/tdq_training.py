"""TDQ training machinery: the timestep embedding, the per-activation MLP, its two-phase fit, its table.

``tdq`` (the pass) picks the activations and hands each one's calibration samples grouped by
timestep to ``train_mlp``; the formulas are in the pass's docstring. Kept apart from the pass so
that tests and the lowering can evaluate a trained MLP without a graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.quant import QuantSpec, scale_zero_point


def timestep_embedding(t: np.ndarray, dim: int, num_train_timesteps: int) -> np.ndarray:
    """emb(t) = [sin(ω_i t), cos(ω_i t)]_{i<dim/2},  ω_i = π·2^i / (2T)  →  (len(t), dim) float32.

    The lowest frequency spans the whole schedule (half a period over [0, T)) and each next one
    doubles, so neighbouring timesteps get neighbouring embeddings: the MLP interpolates between the
    calibrated timesteps instead of memorising them (the diffusion model's own embedding, with
    periods down to 2π steps, would let it fit 25 points and say anything in between).
    """
    t = np.asarray(t, dtype=np.float64).reshape(-1, 1)
    omega = np.pi * 2.0 ** np.arange(dim // 2) / (2.0 * num_train_timesteps)
    return np.concatenate([np.sin(t * omega), np.cos(t * omega)], axis=1).astype(np.float32)


@dataclass(frozen=True)
class TimestepSamples:
    """One activation's calibration data by timestep, laid out along its grouped axis (N indices).

    ``low``/``high`` (T, N): per-index min/max at each calibrated timestep; ``values`` (T, P, N): P
    sampled rows (positions) per timestep; ``labels`` (N,): the group of each index.
    """

    timesteps: np.ndarray
    low: np.ndarray
    high: np.ndarray
    values: np.ndarray
    labels: np.ndarray

    def group_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        """(T, K) min/max of each group's members at each timestep (the per-timestep lookup's ranges)."""
        groups = int(self.labels.max()) + 1
        low = np.stack([self.low[:, self.labels == g].min(axis=1) for g in range(groups)], axis=1)
        high = np.stack([self.high[:, self.labels == g].max(axis=1) for g in range(groups)], axis=1)
        return low, high


@dataclass
class TimestepMlp:
    """The trained map t → (lo_g(t), hi_g(t)) of one activation, as numpy arrays (no torch needed).

    lo_g(t) = lo_ref,g·exp(u_g(t)),  hi_g(t) = hi_ref,g·exp(v_g(t)),
    (u, v) = W2·SiLU(W1·emb(t) + b1) + b2   (W2, b2 start at 0: the static range)
    """

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    low_ref: np.ndarray
    high_ref: np.ndarray
    embedding_dim: int
    num_train_timesteps: int

    @property
    def parameters(self) -> int:
        return int(self.w1.size + self.b1.size + self.w2.size + self.b2.size)

    def ranges(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi), each (len(t), K), in float64 from the float32 weights."""
        emb = timestep_embedding(t, self.embedding_dim, self.num_train_timesteps).astype(np.float64)
        h = emb @ self.w1.T.astype(np.float64) + self.b1
        h = h / (1.0 + np.exp(-h))
        out = h @ self.w2.T.astype(np.float64) + self.b2
        k = self.low_ref.size
        return self.low_ref * np.exp(out[:, :k]), self.high_ref * np.exp(out[:, k:])

    def table(self, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        """S[t], Z[t] for every t in [0, T): the MLP evaluated at each timestep, (T, K) float32."""
        low, high = self.ranges(np.arange(self.num_train_timesteps))
        scale, zero_point = scale_zero_point(low, high, spec)
        return scale.astype(np.float32), zero_point.astype(np.float32)


@dataclass(frozen=True)
class TrainSettings:
    embedding_dim: int = 8
    hidden: int = 8
    fit_iterations: int = 300
    tune_iterations: int = 200
    lr: float = 1e-2
    tune_lr: float = 1e-3
    seed: int = 0


def _round_ste(torch, x):
    return x + (torch.round(x) - x).detach()


def fake_quant_loss(torch, values, low, high, labels, spec: QuantSpec):
    """Σ_t ‖X_t − X̂_t‖² / ‖X_t‖² with X̂ = (clamp(⌊X/s⌉ + z) − z)·s, s = (hi − lo)/(2^b − 1), z = ⌊−lo/s⌉
    (straight-through rounding: gradients reach lo and hi through s and the clamp)."""
    low = torch.clamp(low, max=0.0)[:, labels].unsqueeze(1)
    high = torch.clamp(high, min=0.0)[:, labels].unsqueeze(1)
    scale = torch.clamp((high - low) / (spec.qmax - spec.qmin), min=1e-8)
    zero_point = torch.clamp(_round_ste(torch, spec.qmin - low / scale), spec.qmin, spec.qmax)
    codes = torch.clamp(_round_ste(torch, values / scale) + zero_point, spec.qmin, spec.qmax)
    error = ((codes - zero_point) * scale - values).pow(2).sum(dim=(1, 2))
    return (error / values.pow(2).sum(dim=(1, 2)).clamp(min=1e-12)).sum()


def train_mlp(samples: TimestepSamples, low_ref: np.ndarray, high_ref: np.ndarray, spec: QuantSpec,
              num_train_timesteps: int, settings: TrainSettings = TrainSettings()) -> TimestepMlp:
    """Fit, then tune, the MLP of one activation (deterministic: seeded, one thread, CPU).

    Fit: Adam on Σ ((lo(t) − lo_t)² + (hi(t) − hi_t)²)/w² at the calibrated t (w = hi_ref − lo_ref):
    the per-timestep min/max ranges, generalised to every t. Tune: Adam on ``fake_quant_loss`` of the
    sampled values, which may clip rare outliers where that lowers the error.
    """
    from qcompiler.les_training import import_torch

    torch = import_torch("tdq")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(settings.seed)
        k = low_ref.size
        w1 = torch.nn.Linear(settings.embedding_dim, settings.hidden)
        w2 = torch.nn.Linear(settings.hidden, 2 * k)
        torch.nn.init.zeros_(w2.weight), torch.nn.init.zeros_(w2.bias)
        emb = torch.from_numpy(timestep_embedding(samples.timesteps, settings.embedding_dim, num_train_timesteps))
        lo_ref = torch.from_numpy(np.minimum(low_ref, 0.0).astype(np.float32))
        hi_ref = torch.from_numpy(np.maximum(high_ref, 0.0).astype(np.float32))
        width = torch.clamp((hi_ref - lo_ref).max(), min=1e-8)

        def ranges():
            out = w2(torch.nn.functional.silu(w1(emb)))
            return lo_ref * torch.exp(out[:, :k]), hi_ref * torch.exp(out[:, k:])

        params = list(w1.parameters()) + list(w2.parameters())
        target_low, target_high = (torch.from_numpy(r.astype(np.float32)) for r in samples.group_ranges())
        optimizer = torch.optim.Adam(params, lr=settings.lr)
        for _ in range(settings.fit_iterations):
            low, high = ranges()
            loss = (((low - target_low) / width).pow(2) + ((high - target_high) / width).pow(2)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if settings.tune_iterations:
            values = torch.from_numpy(samples.values.astype(np.float32))
            labels = torch.from_numpy(samples.labels.astype(np.int64))
            optimizer = torch.optim.Adam(params, lr=settings.tune_lr)
            for _ in range(settings.tune_iterations):
                loss = fake_quant_loss(torch, values, *ranges(), labels, spec)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        detach = lambda p: p.detach().numpy().copy()  # noqa: E731
        return TimestepMlp(detach(w1.weight), detach(w1.bias), detach(w2.weight), detach(w2.bias),
                           lo_ref.numpy().astype(np.float64), hi_ref.numpy().astype(np.float64),
                           settings.embedding_dim, num_train_timesteps)
    finally:
        torch.set_num_threads(threads)
