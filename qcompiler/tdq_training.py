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
    #: Iterations on the quantization error after the range fit (0: the fitted min/max ranges only).
    tune_iterations: int = 200
    lr: float = 1e-2
    tune_lr: float = 1e-3
    seed: int = 0


def _round_ste(torch, x):
    return x + (torch.round(x) - x).detach()


def fake_quant_loss(torch, values, low, high, labels, spec: QuantSpec):
    """Σ_t ‖X_t − X̂_t‖² / ‖X_t‖² with X̂ = (clamp(⌊X/s⌉ + z) − z)·s, s = (hi − lo)/(2^b − 1), z = ⌊−lo/s⌉
    (straight-through rounding: gradients reach lo and hi through s and the clamp), summed over the
    M activations trained together. ``values`` (M, T, P, N), ``low``/``high`` (M, T, K), ``labels`` (M, N);
    padding indices hold X = 0, which every grid represents exactly (z is an integer), so they add nothing."""
    index = labels[:, None, :].expand(-1, low.shape[1], -1)
    low = torch.gather(torch.clamp(low, max=0.0), 2, index).unsqueeze(2)
    high = torch.gather(torch.clamp(high, min=0.0), 2, index).unsqueeze(2)
    scale = torch.clamp((high - low) / (spec.qmax - spec.qmin), min=1e-8)
    zero_point = torch.clamp(_round_ste(torch, spec.qmin - low / scale), spec.qmin, spec.qmax)
    codes = torch.clamp(_round_ste(torch, values / scale) + zero_point, spec.qmin, spec.qmax)
    error = ((codes - zero_point) * scale - values).pow(2).sum(dim=(2, 3))
    return (error / values.pow(2).sum(dim=(2, 3)).clamp(min=1e-12)).sum()


def _padded(arrays: list[np.ndarray], width: int, fill=0) -> np.ndarray:
    """Stack arrays whose last axis differs, padded with ``fill`` to ``width``."""
    out = np.full((len(arrays), *arrays[0].shape[:-1], width), fill, dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, ..., : a.shape[-1]] = a
    return out


def train_mlp(samples: TimestepSamples, low_ref: np.ndarray, high_ref: np.ndarray, spec: QuantSpec,
              num_train_timesteps: int, settings: TrainSettings = TrainSettings()) -> TimestepMlp:
    """``train_mlps`` of one activation."""
    return train_mlps([samples], [low_ref], [high_ref], spec, num_train_timesteps, settings)[0]


def train_mlps(samples: list[TimestepSamples], low_refs: list[np.ndarray], high_refs: list[np.ndarray],
               spec: QuantSpec, num_train_timesteps: int, settings: TrainSettings = TrainSettings()) -> list[TimestepMlp]:
    """Fit, then tune, one MLP per activation; activations with the same K train together as one
    batched model (their MLPs share nothing but the optimizer's loop). Deterministic: seeded, one thread.

    Fit: Adam on Σ ((lo(t) − lo_t)² + (hi(t) − hi_t)²)/w² at the calibrated t (w = hi_ref − lo_ref):
    the per-timestep min/max ranges, generalised to every t. Tune: Adam on ``fake_quant_loss`` of the
    sampled values, which may clip rare outliers where that lowers the error.
    """
    from qcompiler.les_training import import_torch

    torch = import_torch("tdq")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: list[TimestepMlp | None] = [None] * len(samples)
    try:
        by_k: dict[int, list[int]] = {}
        for i, ref in enumerate(low_refs):
            by_k.setdefault(int(ref.size), []).append(i)
        for k, members in sorted(by_k.items()):
            trained = _train_batch(torch, [samples[i] for i in members], [low_refs[i] for i in members],
                                   [high_refs[i] for i in members], spec, num_train_timesteps, settings)
            for i, mlp in zip(members, trained):
                out[i] = mlp
    finally:
        torch.set_num_threads(threads)
    return out


def _train_batch(torch, samples, low_refs, high_refs, spec, num_train_timesteps, settings) -> list[TimestepMlp]:
    torch.manual_seed(settings.seed)
    m, k, e, h = len(samples), low_refs[0].size, settings.embedding_dim, settings.hidden
    bound = 1.0 / np.sqrt(e)  # torch.nn.Linear's default initialisation, one MLP per activation
    w1 = torch.nn.Parameter((torch.rand(m, h, e) * 2 - 1) * bound)
    b1 = torch.nn.Parameter((torch.rand(m, 1, h) * 2 - 1) * bound)
    w2 = torch.nn.Parameter(torch.zeros(m, 2 * k, h))
    b2 = torch.nn.Parameter(torch.zeros(m, 1, 2 * k))
    emb = torch.from_numpy(timestep_embedding(samples[0].timesteps, e, num_train_timesteps))
    lo_ref = torch.from_numpy(np.minimum(np.stack(low_refs), 0.0).astype(np.float32))[:, None, :]
    hi_ref = torch.from_numpy(np.maximum(np.stack(high_refs), 0.0).astype(np.float32))[:, None, :]
    width = torch.clamp((hi_ref - lo_ref).amax(dim=2, keepdim=True), min=1e-8)

    def ranges():
        hidden = torch.nn.functional.silu(torch.einsum("te,mhe->mth", emb, w1) + b1)
        out = torch.einsum("mth,moh->mto", hidden, w2) + b2
        return lo_ref * torch.exp(out[..., :k]), hi_ref * torch.exp(out[..., k:])

    params = [w1, b1, w2, b2]
    targets = [s.group_ranges() for s in samples]
    target_low = torch.from_numpy(np.stack([t[0] for t in targets]).astype(np.float32))
    target_high = torch.from_numpy(np.stack([t[1] for t in targets]).astype(np.float32))
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    for _ in range(settings.fit_iterations):
        low, high = ranges()
        loss = (((low - target_low) / width).pow(2) + ((high - target_high) / width).pow(2)).mean(dim=(1, 2)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if settings.tune_iterations:
        width_n = max(s.values.shape[-1] for s in samples)
        values = torch.from_numpy(_padded([s.values.astype(np.float32) for s in samples], width_n))
        labels = torch.from_numpy(_padded([s.labels.astype(np.int64) for s in samples], width_n))
        optimizer = torch.optim.Adam(params, lr=settings.tune_lr)
        for _ in range(settings.tune_iterations):
            loss = fake_quant_loss(torch, values, *ranges(), labels, spec)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    array = lambda p, i: p[i].detach().numpy().reshape(p.shape[1:]).copy()  # noqa: E731
    return [TimestepMlp(array(w1, i), array(b1, i).reshape(-1), array(w2, i), array(b2, i).reshape(-1),
                        lo_ref[i, 0].numpy().astype(np.float64), hi_ref[i, 0].numpy().astype(np.float64),
                        e, num_train_timesteps) for i in range(m)]
