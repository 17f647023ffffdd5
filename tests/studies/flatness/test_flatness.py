"""Flatness: grid figures on surfaces of known curvature, filter normalisation, landscape of a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forgetray.studies.flatness.measure import (
    filter_normalised_direction,
    grid_coordinates,
    loss_grid,
    model_landscape,
    sharpness_figures,
)

H = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]], dtype=torch.float64)
THETA_STAR = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)


def test_figures_of_a_quadratic_model_are_the_analytic_ones():
    """L(w) = 1/2 (w - w*)' H (w - w*): the Laplacian along d1, d2 is d1'Hd1 + d2'Hd2 exactly, and the
    grid gradient is (d1'(g + H s), d2'(g + H s)) at offset s = a d1 + b d2."""
    w = torch.nn.Parameter(torch.tensor([1.0, 0.5, -1.0], dtype=torch.float64))
    d1 = [torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)]
    d2 = [torch.tensor([0.0, 2.0, -1.0], dtype=torch.float64)]
    coords = grid_coordinates(0.5, 9)

    def loss():
        r = w.detach() - THETA_STAR
        return float(0.5 * r @ H @ r)

    grid = loss_grid([w], loss, d1, d2, coords)
    assert torch.equal(w.detach(), torch.tensor([1.0, 0.5, -1.0], dtype=torch.float64))  # restored
    figures = sharpness_figures(grid, coords)
    u, v = d1[0], d2[0]
    np.testing.assert_allclose(figures["curvature"], float(u @ H @ u + v @ H @ v), rtol=1e-9)
    g = H @ (w.detach() - THETA_STAR)
    grad_a = np.empty((9, 9))
    grad_b = np.empty((9, 9))
    for i, a in enumerate(coords):
        for k, b in enumerate(coords):
            total = g + H @ (a * u + b * v)
            grad_a[i, k], grad_b[i, k] = float(u @ total), float(v @ total)
    np.testing.assert_allclose(figures["average_gradient"], np.mean(np.hypot(grad_a, grad_b)), rtol=1e-9)
    np.testing.assert_allclose(
        figures["mean_absolute_gradient"], np.mean((np.abs(grad_a) + np.abs(grad_b)) / 2), rtol=1e-9
    )
    np.testing.assert_allclose(figures["centre_loss"], loss(), rtol=1e-12)


def test_a_sharper_bowl_has_larger_figures_and_a_flat_plane_has_no_curvature():
    a = grid_coordinates(1.0, 11)
    flat_bowl = np.add.outer(a**2, a**2)  # curvature 2 + 2
    sharp_bowl = 10 * flat_bowl
    f, s = sharpness_figures(flat_bowl, a), sharpness_figures(sharp_bowl, a)
    np.testing.assert_allclose(f["curvature"], 4.0)
    np.testing.assert_allclose(s["curvature"], 40.0)
    assert s["average_gradient"] == pytest.approx(10 * f["average_gradient"])
    plane = np.add.outer(3 * a, -a)
    p = sharpness_figures(plane, a)
    assert p["curvature"] == pytest.approx(0.0, abs=1e-9)
    assert p["mean_absolute_gradient"] == pytest.approx(2.0)
    assert p["average_gradient"] == pytest.approx(np.sqrt(10.0))


def test_filter_normalisation_matches_each_filter_norm_and_skips_1d_tensors():
    weights = [torch.randn(4, 3, 2), torch.randn(5)]
    d = filter_normalised_direction(weights, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(
        d[0].reshape(4, -1).norm(dim=1).numpy(), weights[0].reshape(4, -1).norm(dim=1).numpy(), rtol=1e-5
    )
    assert torch.equal(d[1], torch.zeros(5))


def test_grid_must_be_odd_and_centred():
    with pytest.raises(ValueError, match="odd"):
        grid_coordinates(1.0, 4)
    assert grid_coordinates(1.0, 5)[2] == 0.0


def test_model_landscape_is_seeded_and_leaves_the_model_unchanged(tiny_model):
    x = torch.randint(0, 100, (2, 16))
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}

    def loss():
        with torch.no_grad():
            return float(tiny_model(input_ids=x, labels=x).loss)

    _, grid, figures = model_landscape(tiny_model, loss, span=0.5, resolution=3, seed=1)
    _, grid2, _ = model_landscape(tiny_model, loss, span=0.5, resolution=3, seed=1)
    np.testing.assert_array_equal(grid, grid2)
    assert grid.shape == (3, 3) and figures["max_increase"] > 0
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in before.items())
