"""TDQ training machinery: the timestep embedding, the per-activation MLP, its tuning, its table.

``tdq`` (the pass) picks the activations and hands each one's calibration samples grouped by
timestep to ``train_mlps``; the formulas are in the pass's docstring. Kept apart from the pass so
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

    ``low``/``high`` (T, N): per-index min/max at each calibrated timestep over every row;
    ``values`` (T, P, N): P sampled rows (positions) per timestep; ``labels`` (N,): each index's group.
    """

    timesteps: np.ndarray
    low: np.ndarray
    high: np.ndarray
    values: np.ndarray
    labels: np.ndarray

    def group_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        """(T, K) min/max of each group's members at each timestep (the per-timestep lookup's ranges),
        widened to contain 0 as every grid does."""
        groups = int(self.labels.max()) + 1
        low = np.stack([self.low[:, self.labels == g].min(axis=1) for g in range(groups)], axis=1)
        high = np.stack([self.high[:, self.labels == g].max(axis=1) for g in range(groups)], axis=1)
        return np.minimum(low, 0.0), np.maximum(high, 0.0)


def lookup_envelope(timesteps: np.ndarray, low: np.ndarray, high: np.ndarray,
                    num_train_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
    """L(t) for t = 0..T−1, (T, K) each: the calibrated range at a calibrated t; between two
    calibrated timesteps t_j < t < t_{j+1} the envelope [min(lo_j, lo_{j+1}), max(hi_j, hi_{j+1})]
    (it clips nothing either neighbour saw, where the nearest range would); the end ranges beyond."""
    timesteps = np.asarray(timesteps, dtype=np.float64)
    grid = np.arange(num_train_timesteps, dtype=np.float64)
    right = np.clip(np.searchsorted(timesteps, grid), 0, timesteps.size - 1)
    left = np.where(timesteps[right] <= grid, right, np.clip(right - 1, 0, timesteps.size - 1))
    return np.minimum(low[left], low[right]), np.maximum(high[left], high[right])


@dataclass
class TimestepMlp:
    """The trained map t → (lo_g(t), hi_g(t)) of one activation, as numpy arrays (no torch needed).

    lo_g(t) = L_lo,g(t)·exp(u_g(t)),  hi_g(t) = L_hi,g(t)·exp(v_g(t)),
    (u, v) = W2·SiLU(W1·emb(t) + b1) + b2   (W2, b2 start at 0: the lookup envelope L(t) itself)
    """

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    #: L(t), (T, K) each: ``lookup_envelope`` of the calibrated per-timestep ranges.
    base_low: np.ndarray
    base_high: np.ndarray
    embedding_dim: int
    num_train_timesteps: int
    #: (T,) bool: the table rows that take the correction (the rest are the envelope); None: every row.
    corrected: np.ndarray | None = None

    @property
    def parameters(self) -> int:
        return int(self.w1.size + self.b1.size + self.w2.size + self.b2.size)

    def correction(self, t: np.ndarray) -> np.ndarray:
        """(u, v) stacked, (len(t), 2K), in float64 from the float32 weights."""
        emb = timestep_embedding(t, self.embedding_dim, self.num_train_timesteps).astype(np.float64)
        h = emb @ self.w1.T.astype(np.float64) + self.b1
        h = h / (1.0 + np.exp(-h))
        return h @ self.w2.T.astype(np.float64) + self.b2

    def ranges(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi), each (len(t), K), at integer timesteps t (rounded, clamped to [0, T))."""
        t = np.asarray(t, dtype=np.float64).reshape(-1)
        row = np.clip(np.rint(t), 0, self.num_train_timesteps - 1).astype(np.int64)
        out = self.correction(t)
        if self.corrected is not None:
            out[~self.corrected[row]] = 0.0
        k = self.base_low.shape[1]
        return self.base_low[row] * np.exp(out[:, :k]), self.base_high[row] * np.exp(out[:, k:])

    def reset(self) -> None:
        """Drop the tuned correction: the table becomes the lookup envelope."""
        self.w2 = np.zeros_like(self.w2)
        self.b2 = np.zeros_like(self.b2)

    def table(self, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
        """S[t], Z[t] for every t in [0, T): the MLP evaluated at each timestep, (T, K) float32."""
        low, high = self.ranges(np.arange(self.num_train_timesteps))
        scale, zero_point = scale_zero_point(low, high, spec)
        return scale.astype(np.float32), zero_point.astype(np.float32)


@dataclass(frozen=True)
class TrainSettings:
    embedding_dim: int = 8
    hidden: int = 8
    #: Adam steps on the quantization error (0: the lookup envelope only).
    tune_iterations: int = 200
    tune_lr: float = 1e-2
    #: λ of the penalty λ·mean(u² + v²) that keeps the tuned ranges near the calibrated ones.
    regularization: float = 0.1
    seed: int = 0


def _round_ste(torch, x):
    return x + (torch.round(x) - x).detach()


def fake_quant_error(torch, values, low, high, labels, spec: QuantSpec):
    """(M, T): ‖X_t − X̂_t‖² / ‖X_t‖² with X̂ = (clamp(⌊X/s⌉ + z) − z)·s, s = (hi − lo)/(2^b − 1),
    z = ⌊−lo/s⌉ (straight-through rounding: gradients reach lo and hi through s and the clamp), per
    activation and timestep. ``values`` (M, T, P, N), ``low``/``high`` (M, T, K), ``labels`` (M, N);
    padding indices hold X = 0, which every grid represents exactly (z is an integer), so they add nothing."""
    index = labels[:, None, :].expand(-1, low.shape[1], -1)
    low = torch.gather(torch.clamp(low, max=0.0), 2, index).unsqueeze(2)
    high = torch.gather(torch.clamp(high, min=0.0), 2, index).unsqueeze(2)
    scale = torch.clamp((high - low) / (spec.qmax - spec.qmin), min=1e-8)
    zero_point = torch.clamp(_round_ste(torch, spec.qmin - low / scale), spec.qmin, spec.qmax)
    codes = torch.clamp(_round_ste(torch, values / scale) + zero_point, spec.qmin, spec.qmax)
    error = ((codes - zero_point) * scale - values).pow(2).sum(dim=(2, 3))
    return error / values.pow(2).sum(dim=(2, 3)).clamp(min=1e-12)


def _padded(arrays: list[np.ndarray], fill=0) -> np.ndarray:
    """Stack arrays of the same rank whose shapes differ, each axis padded with ``fill`` to the largest."""
    shape = np.max([a.shape for a in arrays], axis=0)
    out = np.full((len(arrays), *shape), fill, dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[(i, *(slice(0, n) for n in a.shape))] = a
    return out


def train_mlp(samples: TimestepSamples, spec: QuantSpec, num_train_timesteps: int,
              settings: TrainSettings = TrainSettings()) -> TimestepMlp:
    """``train_mlps`` of one activation."""
    return train_mlps([samples], spec, num_train_timesteps, settings)[0]


def train_mlps(samples: list[TimestepSamples], spec: QuantSpec, num_train_timesteps: int,
               settings: TrainSettings = TrainSettings()) -> list[TimestepMlp]:
    """One MLP per activation on top of its lookup envelope; activations with the same K train
    together as one batched model (their MLPs share nothing but the optimizer's loop).
    Deterministic: seeded, one thread.

    Tune: Adam on mean_t E_t(θ)/E_t(0) + λ·mean(u² + v²) at the calibrated t, E_t the relative
    quantization error (``fake_quant_error``) of the sampled rows plus each index's min and max row
    at t, so that the outliers the sampled rows miss still weigh against clipping.
    """
    from qcompiler.les_training import import_torch

    torch = import_torch("tdq")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: list[TimestepMlp | None] = [None] * len(samples)
    try:
        by_k: dict[int, list[int]] = {}
        for i, s in enumerate(samples):
            by_k.setdefault(int(s.labels.max()) + 1, []).append(i)
        for _, members in sorted(by_k.items()):
            trained = _train_batch(torch, [samples[i] for i in members], spec, num_train_timesteps, settings)
            for i, mlp in zip(members, trained):
                out[i] = mlp
    finally:
        torch.set_num_threads(threads)
    return out


def _train_batch(torch, samples, spec, num_train_timesteps, settings) -> list[TimestepMlp]:
    torch.manual_seed(settings.seed)
    m, e, h = len(samples), settings.embedding_dim, settings.hidden
    bases = [lookup_envelope(s.timesteps, *s.group_ranges(), num_train_timesteps) for s in samples]
    k = bases[0][0].shape[1]
    bound = 1.0 / np.sqrt(e)  # torch.nn.Linear's default initialisation, one MLP per activation
    w1 = torch.nn.Parameter((torch.rand(m, h, e) * 2 - 1) * bound)
    b1 = torch.nn.Parameter((torch.rand(m, 1, h) * 2 - 1) * bound)
    w2 = torch.nn.Parameter(torch.zeros(m, 2 * k, h))
    b2 = torch.nn.Parameter(torch.zeros(m, 1, 2 * k))
    if settings.tune_iterations:
        emb = torch.from_numpy(timestep_embedding(samples[0].timesteps, e, num_train_timesteps))
        rows = np.clip(np.rint(samples[0].timesteps), 0, num_train_timesteps - 1).astype(np.int64)
        base_low = torch.from_numpy(np.stack([b[0][rows] for b in bases]).astype(np.float32))
        base_high = torch.from_numpy(np.stack([b[1][rows] for b in bases]).astype(np.float32))
        with_extremes = [np.concatenate([s.values, s.low[:, None], s.high[:, None]], axis=1).astype(np.float32)
                         for s in samples]
        values = torch.from_numpy(_padded(with_extremes))  # zero rows/indices: no error
        labels = torch.from_numpy(_padded([s.labels.astype(np.int64) for s in samples]))
        reference = fake_quant_error(torch, values, base_low, base_high, labels, spec).detach().clamp(min=1e-12)
        optimizer = torch.optim.Adam([w1, b1, w2, b2], lr=settings.tune_lr)
        for _ in range(settings.tune_iterations):
            hidden = torch.nn.functional.silu(torch.einsum("te,mhe->mth", emb, w1) + b1)
            correction = torch.einsum("mth,moh->mto", hidden, w2) + b2
            low, high = base_low * torch.exp(correction[..., :k]), base_high * torch.exp(correction[..., k:])
            error = fake_quant_error(torch, values, low, high, labels, spec) / reference
            loss = error.mean(dim=1).sum() + settings.regularization * correction.pow(2).mean(dim=(1, 2)).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    array = lambda p, i: p[i].detach().numpy().reshape(p.shape[1:]).copy()  # noqa: E731
    return [TimestepMlp(array(w1, i), array(b1, i).reshape(-1), array(w2, i), array(b2, i).reshape(-1),
                        bases[i][0], bases[i][1], e, num_train_timesteps) for i in range(m)]
