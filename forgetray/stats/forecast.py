"""LM-based forecasting of forgetting from representations (Jin & Ren, ICML 2024, "What will my model
forget?"), the baseline that matrix completion is compared against. Two forecasters:

**lm_forecast, the authors'** (AuCson/icml-24-wwmf-temp `trainer/fgt_prediction_trainer.py` and
`data_utils/fpd_helper.py`, the task-level method `rep_task_level`):

    logit(i, j) = -mean_d(head(h_i)_d * head(h_j)_d) / tau + log((n_j + 1) / (T - n_j + 1))

one head (`ContrastiveHead`: Linear(H, H), ReLU, Linear(H, D)) shared by task examples and upstream
examples, h the encoder's last-token state, n_j the number of the T training tasks with Z[t, j] > 0
(the fixed prior odds of `fpd.prior: odd`, not learned); trained with BCE on labels Z > 0 over
balanced pairs (each draw: a task, one of its examples, one forgotten and one kept upstream
example), Adam, the encoder fine-tuned too (`SharedHeadSettings`). The authors score each task
example against the task's row; a task's row here is the mean of its sampled examples' logits.
Departures: the authors' task-level script adds no prior and keeps the sign +1 by default
(`rep_prod_sgn: 1`, `sgn_neg.yaml` flips it); the prior and the minus sign are the paper's
formula and the example-level method's (`rep_pairwise` with `prior_odd.yaml`). With a learned head
the sign only fixes which way similarity points: similar task and example -> kept.

**frozen_forecast, forgetray's** (frozen encoder, two MLPs, real-valued Z):

    python -c "from forgetray.stats.forecast import *; import numpy as np; rng = np.random.default_rng(0); \
h_t, h_e = rng.normal(size=(12, 8)), rng.normal(size=(500, 8)); z = -(h_t @ h_e.T); \
print(fit_forecaster(h_t[:9], h_e, z[:9], ForecastSettings()).predict(h_t[9:]).shape)"

The score of task i (a fine-tuning dataset) and upstream example j is

    s_ij = -<f(h_i), g(h_j)> / tau + b_j + c

h_i, h_j the base model's last-token hidden states (task: averaged over a sample of its training
examples), f and g small MLPs into a `dim`-dimensional space, b_j a learned per-example bias
(`example_bias: false` leaves it out), c a global bias. The real-valued score predicts Z directly and
is trained with MSE on the known rows (the training tasks' full rows); on binary targets (all 0/1)
the loss is binary cross-entropy and predictions are sigmoid(s).

How it departs from the authors': separate f and g instead of one shared head, a learned instead
of a fixed prior, the representations frozen (the authors fine-tune the LM encoder), a task
represented by the mean of its examples' states, full-batch AdamW on the whole known block (it is
small: train tasks x examples), real-valued targets. Z is divided by the standard deviation of its
known entries before training, so `learning_rate`, `tau` and `weight_decay` mean the same whatever
the scale of the forgetting values; inputs are standardised per feature (examples over all
examples, tasks with the training tasks' statistics only).

`LMForecast` puts the frozen forecaster in the completion protocol (`forgetray.stats.completion`):
it is a `TaskCompleter`, bound to the held-out task's representation, fitted once on the training
rows (cached: the train rows are the same for every seed and test task). `calibrate=False` ignores
the k revealed entries (a pure forecast from representations); `calibrate=True` uses them for a
per-task offset and scale, each shrunk towards (0, 1) like the additive baseline's task bias (k / (k
+ 15)). `FixedForecast` puts lm_forecast's precomputed rows there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ForecastSettings:
    """The forecaster's hyper-parameters (`forecast.*` in the config without the extraction keys)."""

    hidden_size: int = 64
    depth: int = 1
    """Hidden layers of f and g (0: a linear projection)."""
    dim: int = 16
    """Dimension of the space f and g project into (the rank of the bilinear score)."""
    tau: float = 1.0
    learning_rate: float = 0.01
    epochs: int = 300
    """Full-batch AdamW steps."""
    weight_decay: float = 0.001
    example_bias: bool = True
    seed: int = 0


def _mlp(d_in: int, settings: ForecastSettings) -> Any:
    import torch

    layers: list[Any] = []
    width = d_in
    for _ in range(settings.depth):
        layers += [torch.nn.Linear(width, settings.hidden_size), torch.nn.GELU()]
        width = settings.hidden_size
    layers.append(torch.nn.Linear(width, settings.dim))
    return torch.nn.Sequential(*layers)


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return (x - mean) / std


@dataclass
class Forecaster:
    """A trained scorer: `predict(h_tasks)` -> (tasks, examples) forecasts of Z for any tasks."""

    f: Any
    g: Any
    example_bias: np.ndarray  # (examples,), in standardised units
    bias: float
    scale: float  # the std Z was divided by
    task_mean: np.ndarray  # (d,)
    task_std: np.ndarray  # (d,)
    example_codes: np.ndarray  # (examples, dim): g(h_j) / tau, computed once
    binary: bool
    train_loss: list[float] = field(default_factory=list)

    def logits(self, h_tasks: np.ndarray) -> np.ndarray:
        """(tasks, examples) scores s_ij in standardised units (logits for binary)."""
        import torch

        h = np.atleast_2d(np.asarray(h_tasks, dtype=np.float32))
        with torch.no_grad():
            codes = self.f(torch.from_numpy(_standardise(h, self.task_mean, self.task_std))).numpy()
        return -(codes.astype(np.float64) @ self.example_codes.T) + self.example_bias + self.bias

    def predict(self, h_tasks: np.ndarray) -> np.ndarray:
        """(tasks, examples) predicted Z (probabilities of forgetting for binary targets)."""
        s = self.logits(h_tasks)
        if self.binary:
            return 1.0 / (1.0 + np.exp(-s))
        return self.scale * s


def _check_inputs(h_tasks: np.ndarray, h_examples: np.ndarray, z: np.ndarray) -> None:
    if h_tasks.ndim != 2 or h_examples.ndim != 2:
        raise ValueError(f"representations must be 2-D: tasks {h_tasks.shape}, examples {h_examples.shape}")
    if h_tasks.shape[1] != h_examples.shape[1]:
        raise ValueError(
            f"task representations have {h_tasks.shape[1]} features, example ones {h_examples.shape[1]}"
        )
    if z.shape != (len(h_tasks), len(h_examples)):
        raise ValueError(
            f"forgetting matrix {z.shape} does not match {len(h_tasks)} task and "
            f"{len(h_examples)} example representations"
        )
    for name, a in (("task representations", h_tasks), ("example representations", h_examples), ("z", z)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: contains NaN or infinite values")


def fit_forecaster(
    h_tasks: np.ndarray, h_examples: np.ndarray, z: np.ndarray, settings: ForecastSettings
) -> Forecaster:
    """Train f, g and the biases on the known block z (tasks, examples); deterministic from the seed.

    h_tasks (tasks, d), h_examples (examples, d). Binary z (every entry 0 or 1) is fitted with BCE.
    """
    import torch

    h_tasks = np.asarray(h_tasks, dtype=np.float64)
    h_examples = np.asarray(h_examples, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    _check_inputs(h_tasks, h_examples, z)
    binary = bool(np.isin(z, (0.0, 1.0)).all())
    scale = 1.0 if binary else (float(np.std(z)) or 1.0)
    task_mean, task_std = h_tasks.mean(axis=0), h_tasks.std(axis=0) + 1e-6  # (d,)
    example_mean, example_std = h_examples.mean(axis=0), h_examples.std(axis=0) + 1e-6

    with torch.random.fork_rng(devices=[]):  # seeded initialisation, the caller's RNG untouched
        torch.manual_seed(settings.seed)
        f, g = _mlp(h_tasks.shape[1], settings), _mlp(h_examples.shape[1], settings)
    x_t = torch.tensor(_standardise(h_tasks, task_mean, task_std), dtype=torch.float32)  # (tasks, d)
    x_e = torch.tensor(_standardise(h_examples, example_mean, example_std), dtype=torch.float32)
    target = torch.tensor(z / scale, dtype=torch.float32)  # (tasks, examples)
    if binary:
        mean = float(np.clip(z.mean(), 1e-3, 1 - 1e-3))
        start = float(np.log(mean / (1 - mean)))
    else:
        start = float(target.mean())
    bias = torch.nn.Parameter(torch.tensor(start))
    example_bias = torch.nn.Parameter(torch.zeros(len(h_examples)), requires_grad=settings.example_bias)
    biases = [bias, example_bias] if settings.example_bias else [bias]
    optimizer = torch.optim.AdamW(
        [
            {"params": [*f.parameters(), *g.parameters()], "weight_decay": settings.weight_decay},
            {"params": biases, "weight_decay": 0.0},  # the biases are the additive part: no shrinkage
        ],
        lr=settings.learning_rate,
    )
    losses = []
    for _ in range(settings.epochs):
        optimizer.zero_grad()
        s = -(f(x_t) @ g(x_e).T) / settings.tau + example_bias + bias  # (tasks, examples)
        if binary:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(s, target)
        else:
            loss = torch.nn.functional.mse_loss(s, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    f.eval()
    g.eval()
    with torch.no_grad():
        codes = (g(x_e) / settings.tau).numpy().astype(np.float64)  # (examples, dim)
    return Forecaster(
        f=f,
        g=g,
        example_bias=example_bias.detach().numpy().astype(np.float64),
        bias=bias.item(),
        scale=scale,
        task_mean=task_mean.astype(np.float32),
        task_std=task_std.astype(np.float32),
        example_codes=codes,
        binary=binary,
        train_loss=losses,
    )


def calibrate_row(
    prediction: np.ndarray,
    revealed_idx: np.ndarray,
    revealed_values: np.ndarray,
    shrinkage: float,
    binary: bool,
) -> np.ndarray:
    """The row's forecast made to agree with its k revealed entries: z ~ a * s + b on them.

    Real-valued: least squares for (a, b) on the revealed entries, then a = 1 + (a_ls - 1) * w and
    b fitted to the mean residual given a, times w, with w = k / (k + shrinkage): with few entries
    the forecast is barely moved. Binary: the offset only, in logit space (a ridge-shrunk Newton fit).
    """
    k = len(revealed_idx)
    weight = k / (k + shrinkage)
    values = np.asarray(revealed_values, dtype=np.float64)
    if binary:
        p = np.clip(prediction, 1e-6, 1 - 1e-6)
        logit = np.log(p / (1 - p))  # (examples,)
        offset = 0.0
        for _ in range(20):
            q = 1.0 / (1.0 + np.exp(-(logit[revealed_idx] + offset)))
            grad = float((q - values).sum()) + shrinkage * offset
            hess = float((q * (1 - q)).sum()) + shrinkage
            offset -= grad / hess
        return 1.0 / (1.0 + np.exp(-(logit + offset)))
    s = prediction[revealed_idx]
    a = 1.0
    if k >= 2 and np.var(s) > 0:
        a_ls = float(np.cov(s, values, bias=True)[0, 1] / np.var(s))
        a = 1.0 + (a_ls - 1.0) * weight
    b = float(np.mean(values - a * s)) * weight
    return a * prediction + b


@dataclass
class LMForecast:
    """The forecaster as a completion method: `for_task(row)` binds a held-out task's representation.

    task_representations (tasks, d) and example_representations (examples, d) are in the matrix's
    row and column order; train_rows are the matrix rows the completion's z_train holds, in order.
    """

    task_representations: np.ndarray
    example_representations: np.ndarray
    train_rows: np.ndarray
    settings: ForecastSettings = field(default_factory=ForecastSettings)
    calibrate: bool = False
    calibration_shrinkage: float = 15.0
    _cache: dict[str, Forecaster] = field(default_factory=dict, init=False, repr=False, compare=False)

    def fit(self, z_train: np.ndarray) -> Forecaster:
        rows = np.asarray(self.train_rows, dtype=int)
        if z_train.shape[0] != len(rows):
            raise ValueError(
                f"LMForecast: z_train has {z_train.shape[0]} rows but train_rows names {len(rows)} tasks"
            )
        key = hashlib.sha1(np.ascontiguousarray(z_train).tobytes()).hexdigest() + f"{z_train.shape}"
        if key not in self._cache:
            self._cache.clear()
            self._cache[key] = fit_forecaster(
                self.task_representations[rows], self.example_representations, z_train, self.settings
            )
        return self._cache[key]

    def for_task(self, row: int) -> _BoundForecast:
        return _BoundForecast(self, int(row))


@dataclass(frozen=True)
class _BoundForecast:
    """A `Completer` for one held-out task (matrix row `row`)."""

    parent: LMForecast
    row: int

    def fit_predict(
        self, z_train: np.ndarray, revealed_idx: np.ndarray, revealed_values: np.ndarray
    ) -> np.ndarray:
        forecaster = self.parent.fit(z_train)
        prediction = forecaster.predict(self.parent.task_representations[self.row])[0]  # (examples,)
        if not self.parent.calibrate:
            return prediction
        return calibrate_row(
            prediction, revealed_idx, revealed_values, self.parent.calibration_shrinkage, forecaster.binary
        )


# --- The authors' representation-based forecaster: one shared head, a fixed prior, binary labels ---


@dataclass(frozen=True)
class SharedHeadSettings:
    """The authors' forecaster (icml-24-wwmf-temp `trainer/fgt_prediction_trainer.py`,
    `configs/p3/fpd/fpd_defaults.yaml`): head width, temperature, Adam learning rates, steps."""

    output_dim: int = 768
    """Output of the shared head Linear(H, H) - ReLU - Linear(H, output_dim) (`fpd.output_dim`)."""
    tau: float = 1.0
    """`fpd.temp`."""
    head_learning_rate: float = 1e-3
    """The authors': `fpd.lr` 5e-6 x `fpd.lr_scale` 200."""
    encoder_learning_rate: float = 5e-6
    """`fpd.lr`, for the LM encoder when it is trained (`fpd.freeze_lm: false`)."""
    steps: int = 300
    tasks_per_step: int = 8
    """Sampled (task, task example) per step, each with one forgotten and one kept upstream example."""
    prior: bool = True
    """Add the fixed log prior odds of each upstream example (`fpd.prior: odd`)."""
    seed: int = 0


def prior_log_odds(forgotten: np.ndarray) -> np.ndarray:
    """(examples,) log((n_j + 1) / (T - n_j + 1)) with n_j the training tasks that forget example j
    of T (`FpdP3Helper.get_fixed_bias_terms`: add-one prior odds, fixed, not learned)."""
    y = np.asarray(forgotten, dtype=bool)  # (tasks, examples)
    n = y.sum(axis=0).astype(np.float64)
    return np.log((n + 1.0) / (len(y) - n + 1.0))


def shared_head(width: int, output_dim: int) -> Any:
    """The authors' `ContrastiveHead`, applied to task and example representations alike."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, output_dim)
    )


def pair_logits(task_codes: Any, example_codes: Any, tau: float, prior: Any | None) -> Any:
    """(tasks, examples) -mean_d(a_d b_d) / tau (+ prior (examples,)): `get_rep_prod_mat` with
    `sum_or_mean: mean` and `rep_prod_sgn: -1`, then `add_bias_to_logit_if_needed`."""
    logits = -(task_codes @ example_codes.T) / (task_codes.shape[-1] * tau)
    return logits if prior is None else logits + prior


def sample_balanced_pairs(
    forgotten: np.ndarray, task_sizes: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(task row, task example, upstream example, label) of one step: `n` times a random task and one
    of its examples, with a random forgotten and a random kept upstream example of that task's row
    where it has them (`FpdP3Helper.sample_episode_task_level_balanced`)."""
    rows, task_examples, examples, labels = [], [], [], []
    for _ in range(n):
        row = int(rng.integers(len(forgotten)))
        task_example = int(rng.integers(task_sizes[row]))
        for label in (True, False):
            candidates = np.flatnonzero(forgotten[row] == label)
            if len(candidates):
                rows.append(row)
                task_examples.append(task_example)
                examples.append(int(rng.choice(candidates)))
                labels.append(float(label))
    return (np.array(rows), np.array(task_examples), np.array(examples), np.array(labels))


@dataclass
class SharedHeadForecaster:
    """A trained shared head (and encoder): `probabilities(task_codes, example_codes)`."""

    head: Any
    prior: np.ndarray | None  # (examples,)
    tau: float
    train_loss: list[float] = field(default_factory=list)

    def logits(self, task_codes: np.ndarray, example_codes: np.ndarray) -> np.ndarray:
        import torch

        prior = None if self.prior is None else torch.from_numpy(self.prior)
        return pair_logits(
            torch.from_numpy(np.asarray(task_codes, np.float64)),
            torch.from_numpy(np.asarray(example_codes, np.float64)),
            self.tau,
            prior,
        ).numpy()


def train_shared_head(
    encode: Any,
    width: int,
    forgotten: np.ndarray,
    task_sizes: np.ndarray,
    settings: SharedHeadSettings,
    encoder_parameters: Sequence[Any] = (),
) -> SharedHeadForecaster:
    """Train the shared head (and `encoder_parameters`) with BCE on balanced pairs.

    encode(kind, indices) -> (len(indices), width) float tensor of representations, kind "task"
    (indices: (task row, task example) pairs) or "example" (upstream example indices), with the
    autograd graph when the encoder is trained. forgotten (train tasks, examples) bool: Z > 0.
    """
    import torch

    forgotten = np.asarray(forgotten, dtype=bool)
    prior = prior_log_odds(forgotten) if settings.prior else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        head = shared_head(width, settings.output_dim)
    groups = [{"params": head.parameters(), "lr": settings.head_learning_rate}]
    if encoder_parameters:
        groups.append({"params": list(encoder_parameters), "lr": settings.encoder_learning_rate})
    optimizer = torch.optim.Adam(groups)
    rng = np.random.default_rng(settings.seed)
    prior_t = None if prior is None else torch.from_numpy(prior).float()
    losses = []
    for _ in range(settings.steps):
        rows, task_examples, examples, labels = sample_balanced_pairs(
            forgotten, task_sizes, settings.tasks_per_step, rng
        )
        a = head(encode("task", list(zip(rows.tolist(), task_examples.tolist(), strict=True))))  # (pairs, D)
        b = head(encode("example", examples.tolist()))  # (pairs, D)
        logit = -(a * b).mean(dim=-1) / settings.tau  # (pairs,): `get_rep_prod`
        if prior_t is not None:
            logit = logit + prior_t[torch.from_numpy(examples)]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.from_numpy(labels).float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    head.eval()
    return SharedHeadForecaster(head=head, prior=prior, tau=settings.tau, train_loss=losses)


@dataclass
class FixedForecast:
    """A completion method that returns precomputed rows: predictions (tasks, examples) made before
    the protocol runs (by a forecaster trained on its training rows only); revealed entries unused."""

    predictions: np.ndarray

    def for_task(self, row: int) -> _FixedRow:
        return _FixedRow(self.predictions[int(row)])


@dataclass(frozen=True)
class _FixedRow:
    row: np.ndarray

    def fit_predict(
        self, z_train: np.ndarray, revealed_idx: np.ndarray, revealed_values: np.ndarray
    ) -> np.ndarray:
        return np.array(self.row, dtype=np.float64)
