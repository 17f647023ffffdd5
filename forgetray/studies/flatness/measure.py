"""Loss-landscape flatness around a model (Li et al. 2024, after Li et al. 2018): pure torch / numpy.

    python -c "from forgetray.studies.flatness.measure import sharpness_figures; import numpy as np; \
a = np.linspace(-1, 1, 11); print(sharpness_figures(np.add.outer(a**2, 2 * a**2), a))"

The landscape is the loss on a 2-D grid of weight offsets,

    L[i, k] = L(theta + a_i * d1 + b_k * d2),   a = b = linspace(-span, span, resolution)   (odd)

with d1, d2 random Gaussian directions, filter-normalised (Li et al. 2018, "Visualizing the loss
landscape of neural nets"): every tensor of d is drawn N(0, 1) and each of its filters (a slice
along the first dimension: a row of a linear weight, an output channel of a convolution) is scaled
to the norm of the same filter of theta, so a step of 1 along d moves each filter by its own size
and landscapes of differently scaled models compare. 1-D tensors (biases, LayerNorm) get d = 0, as
in the 2018 paper's default ("ignore biases and BN"). The directions are drawn from a seed and the
weights they are normalised to, so the same seed gives the same directions for the same model.

Scalar figures of a grid (h = grid spacing, c = the centre index, derivatives by `np.gradient`
with second-order central differences, exact for a quadratic surface, also at the edges):

    curvature                 (L[c+1,c] + L[c-1,c] + L[c,c+1] + L[c,c-1] - 4 L[c,c]) / h^2
                              the 5-point Laplacian at theta: for a quadratic loss exactly
                              d1' H d1 + d2' H d2, the Hessian's trace in the plane of d1, d2
    average_gradient          mean over the grid of sqrt((dL/da)^2 + (dL/db)^2)   (gradient norm)
    mean_absolute_gradient    mean over the grid of (|dL/da| + |dL/db|) / 2       (per axis)
    max_increase              max over the grid of L - L[c, c]
    centre_loss               L[c, c] = L(theta)

Flatter landscapes give smaller values of all but `centre_loss`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

FIGURES = ("curvature", "average_gradient", "mean_absolute_gradient", "max_increase", "centre_loss")


def grid_coordinates(span: float, resolution: int) -> np.ndarray:
    """(resolution,) offsets along one direction, symmetric around 0 (which is on the grid)."""
    if resolution < 3 or resolution % 2 == 0:
        raise ValueError(f"flatness resolution must be odd and >= 3, got {resolution}")
    if span <= 0:
        raise ValueError(f"flatness span must be > 0, got {span}")
    return np.linspace(-span, span, resolution)


def filter_normalised_direction(
    weights: Sequence[torch.Tensor], generator: torch.Generator
) -> list[torch.Tensor]:
    """A random direction with each filter's norm equal to the weight filter's norm; zero on 1-D tensors."""
    direction = []
    for w in weights:
        d = torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w.dtype)
        if w.dim() <= 1:
            d.zero_()
        else:
            w_filters, d_filters = w.reshape(w.shape[0], -1), d.reshape(d.shape[0], -1)  # (filters, rest)
            scale = w_filters.norm(dim=1, keepdim=True) / (d_filters.norm(dim=1, keepdim=True) + 1e-10)
            d = (d_filters * scale).reshape(w.shape)
        direction.append(d)
    return direction


@torch.no_grad()
def loss_grid(
    params: Sequence[torch.nn.Parameter],
    loss: Callable[[], float],
    d1: Sequence[torch.Tensor],
    d2: Sequence[torch.Tensor],
    coordinates: np.ndarray,
) -> np.ndarray:
    """(len(a), len(b)) losses L(theta + a d1 + b d2); `params` are moved in place and restored exactly."""
    original = [p.detach().clone() for p in params]
    grid = np.empty((len(coordinates), len(coordinates)), dtype=np.float64)
    try:
        for i, a in enumerate(coordinates):
            for k, b in enumerate(coordinates):
                for p, w, u, v in zip(params, original, d1, d2, strict=True):
                    p.copy_(w + float(a) * u + float(b) * v)
                grid[i, k] = float(loss())
    finally:
        for p, w in zip(params, original, strict=True):
            p.copy_(w)
    return grid


def sharpness_figures(grid: np.ndarray, coordinates: np.ndarray) -> dict[str, float]:
    """The module docstring's figures of a (n, n) loss grid on `coordinates` (n,) along both axes."""
    grid = np.asarray(grid, dtype=np.float64)
    n = len(coordinates)
    if grid.shape != (n, n):
        raise ValueError(f"loss grid has shape {grid.shape}, expected ({n}, {n})")
    h = float(coordinates[1] - coordinates[0])
    c = n // 2
    laplacian = (grid[c + 1, c] + grid[c - 1, c] + grid[c, c + 1] + grid[c, c - 1] - 4 * grid[c, c]) / h**2
    grad_a, grad_b = np.gradient(grid, coordinates, coordinates, edge_order=2)  # each (n, n)
    return {
        "curvature": float(laplacian),
        "average_gradient": float(np.mean(np.hypot(grad_a, grad_b))),
        "mean_absolute_gradient": float(np.mean((np.abs(grad_a) + np.abs(grad_b)) / 2)),
        "max_increase": float(np.max(grid - grid[c, c])),
        "centre_loss": float(grid[c, c]),
    }


def model_landscape(
    model: Any,
    loss: Callable[[], float],
    span: float,
    resolution: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(coordinates (n,), grid (n, n), figures) around all of a model's weights (tied ones once), so a
    base model and its fine-tuned copies are perturbed alike whatever was trained."""
    coordinates = grid_coordinates(span, resolution)
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    weights = [p.detach() for p in params]
    d1 = filter_normalised_direction(weights, generator)
    d2 = filter_normalised_direction(weights, generator)
    grid = loss_grid(params, loss, d1, d2, coordinates)
    return coordinates, grid, sharpness_figures(grid, coordinates)
