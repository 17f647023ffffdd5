"""forgetray.report: figures from arrays, and the self-contained HTML report of a fake run directory."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from forgetray import storage
from forgetray.report.html import build_report, write_report_figures
from forgetray.report.plots import (
    PAPER_R2_OLMO7B,
    analysis_figures,
    completion_bars,
    display_columns,
    per_task_bars,
    r2_curve,
    sorted_heatmap,
    sorted_order,
)
from forgetray.stats.completion import Additive, GlobalMean, evaluate_completion
from forgetray.stats.fits import analyse

EVIL_TASK = "<script>alert(1)</script>"
TASKS = ["addition", "rot13", EVIL_TASK, "uppercase", "json_format", "count_words"]
EXAMPLES = [f"doc/topic{k % 7}/{k}" for k in range(25)] + [f"code/module{k % 5}/func{k}" for k in range(25)]
TASK_SHIFT = np.array([0.1, 0.5, -0.2, 0.3, 0.0, 0.2])  # row effects: row 1 forgets most, row 2 least
CONFIG_YAML = "run_dir: runs/fake\nmodel:\n  name_or_path: builtin\nscore:\n  shard_size: 64\n"


def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the PNG header; fails unless the file starts with the PNG signature."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def planted() -> np.ndarray:
    """(6, 50) float32: task shift + example effect + a rank-1 association + noise."""
    rng = np.random.default_rng(0)
    example_effect = rng.normal(0.0, 0.3, size=50)
    association = np.outer(rng.normal(size=6), rng.normal(size=50)) * 0.2
    z = TASK_SHIFT[:, None] + example_effect[None, :] + association + rng.normal(0.0, 0.05, size=(6, 50))
    return z.astype(np.float32)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, planted: np.ndarray) -> Path:
    """A complete fake run directory: every input the report reads, made by the real stats code."""
    run = tmp_path_factory.mktemp("run")
    (run / "config.yaml").write_text(CONFIG_YAML)
    (run / "logs").mkdir()
    (run / "logs" / "forgetray.log").write_text("12:00:00 forgetray stage data: 1.0 s\n")
    storage.write_json(
        str(run / "timings.json"), [{"finished": "2025-01-01T12:00:00", "seconds": {"data": 1.5}}]
    )
    storage.write_json(
        str(run / "models" / "base.json"),
        {
            "model": {"path": "/cache/builtin/abc", "dtype": "float32", "adapter_path": None},
            "pretrain_report": {
                "upstream_nll_before": 5.5,
                "upstream_nll_after": 3.25,
                "seconds": 60.0,
                "steps": 400,
            },
        },
    )
    for i, task in enumerate(TASKS):
        pointer = {"task": task, "method": "lora", "loss": 0.5 + i, "steps": 20, "train_seconds": 3.0}
        storage.write_json(str(run / "checkpoints" / f"task{i}.json"), pointer | {"wall_seconds": 4.0})
    storage.write_json(str(run / "scores" / "base" / "_SUCCESS.json"), {"n_examples": 50, "mean_nll": 3.0})
    storage.write_json(
        str(run / "scores" / "addition" / "_SUCCESS.json"), {"n_examples": 50, "mean_nll": 3.1}
    )
    (run / "scores" / "rot13").mkdir()
    storage.save_npy(str(run / "matrix" / "forgetting.npy"), planted)
    storage.write_json(str(run / "matrix" / "index.json"), {"tasks": TASKS, "examples": EXAMPLES})
    fits = analyse(planted, max_rank=6, max_columns=40, tasks=TASKS, examples=EXAMPLES)
    storage.write_json(str(run / "analysis" / "fits.json"), fits)
    paths = analysis_figures(planted, str(run / "analysis"), rank=10, row_labels=TASKS)
    assert [os.path.basename(p) for p in paths] == [
        "heatmap.png",
        "heatmap_rank6.png",
        "heatmap_residual.png",
    ]
    r2_curve(
        fits["r2_svd"], fits["r2_additive"], fits["r2_multiplicative"], str(run / "analysis" / "r2_curve.png")
    )
    methods = {"global_mean": GlobalMean(), "additive": Additive()}
    results = evaluate_completion(planted, [1, 4], methods, revealed_k=5, seeds=range(2))
    storage.write_json(str(run / "completion" / "results.json"), results)
    binary = evaluate_completion(planted, [1, 4], methods, revealed_k=5, seeds=range(2), binary_threshold=0.0)
    storage.write_json(str(run / "completion" / "binary.json"), binary)
    replay = {
        "temperature": 0.5,
        "random": {"forgetting": 0.12, "seeds": [0, 1]},
        "predicted": {"forgetting": 0.07},
    }
    storage.write_json(str(run / "replay" / "results.json"), replay)
    return run


@pytest.fixture(scope="module")
def report(run_dir: Path) -> str:
    path = build_report(str(run_dir))
    assert path == str(run_dir / "report.html")
    return Path(path).read_text(encoding="utf-8")


# plots -----------------------------------------------------------------------------------------


def test_sorted_order_puts_the_highest_mean_row_and_column_first(planted: np.ndarray) -> None:
    rows, columns = sorted_order(planted)
    assert rows[0] == int(np.argmax(TASK_SHIFT)) and rows[-1] == int(np.argmin(TASK_SHIFT))
    row_means = planted.astype(np.float64).mean(axis=1)[rows]
    column_means = planted.astype(np.float64).mean(axis=0)[columns]
    assert np.all(np.diff(row_means) <= 0) and np.all(np.diff(column_means) <= 0)
    assert sorted(columns.tolist()) == list(range(50))


def test_sorted_order_keeps_ties_in_their_original_order() -> None:
    # row means 1/3, 1, 1; column means 1, 1/3, 1
    rows, columns = sorted_order(np.array([[0.0, 1.0, 0.0], [2.0, -1.0, 2.0], [1.0, 1.0, 1.0]]))
    assert rows.tolist() == [1, 2, 0] and columns.tolist() == [0, 2, 1]


def test_display_columns_is_an_even_deterministic_subsample() -> None:
    order = np.arange(1000)[::-1]
    shown = display_columns(order, 11)
    assert shown[0] == order[0] and shown[-1] == order[-1] and len(shown) == 11
    assert set(np.diff(-shown).tolist()) <= {99, 100}  # evenly spaced positions in the sorted order
    assert np.array_equal(shown, display_columns(order, 11))
    assert display_columns(order, 5000) is order


def test_sorted_heatmap_subsamples_wide_matrices(tmp_path: Path) -> None:
    z = np.random.default_rng(1).normal(size=(6, 1000)).astype(np.float32)
    path = sorted_heatmap(z, str(tmp_path / "wide.png"), "wide", row_labels=TASKS, max_columns=100)
    width, height = png_size(path)
    assert 800 <= width <= 1200 and 250 <= height <= 600
    assert 5_000 < os.path.getsize(path) < 1_000_000
    assert os.listdir(tmp_path) == ["wide.png"]  # the atomic write left no temporary file


def test_analysis_figures_caps_the_rank_and_writes_three_heatmaps(run_dir: Path) -> None:
    # the fixture asked for rank 10 of a 6-task matrix
    names = sorted(p.name for p in (run_dir / "analysis").glob("heatmap*.png"))
    assert names == ["heatmap.png", "heatmap_rank6.png", "heatmap_residual.png"]
    for name in names:
        width, height = png_size(run_dir / "analysis" / name)
        assert 800 <= width <= 1200 and 250 <= height <= 600


def test_line_and_bar_figures_are_pngs(tmp_path: Path, planted: np.ndarray) -> None:
    curve = r2_curve(
        [0.4, 0.6, 0.7], 0.55, 0.4, str(tmp_path / "r2.png"), reference={"OLMo-7B": PAPER_R2_OLMO7B}
    )
    bars = per_task_bars(TASKS, planted.mean(axis=1), str(tmp_path / "tasks.png"))
    results = {
        "a": {"rmse_mean": 0.2, "rmse_std": 0.01},
        "b": {"rmse_mean": 0.1, "rmse_std": None},
        "seeds": [0],
    }
    completion = completion_bars(results, str(tmp_path / "completion.png"))
    for path in (curve, bars, completion):
        width, height = png_size(path)
        assert 300 <= width <= 1000 and 200 <= height <= 800
    with pytest.raises(ValueError, match="f1_mean"):
        completion_bars(results, str(tmp_path / "f1.png"), metric="f1")


def test_importing_forgetray_report_does_not_import_matplotlib() -> None:
    code = "import sys, forgetray, forgetray.report; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# html ------------------------------------------------------------------------------------------


def test_report_shows_every_r2_value_beside_the_paper(report: str, run_dir: Path) -> None:
    fits = json.loads((run_dir / "analysis" / "fits.json").read_text())
    for value in [fits["r2_additive"], fits["r2_multiplicative"], *fits["r2_svd"], *PAPER_R2_OLMO7B]:
        assert f"{value:.3f}" in report
    assert "40 of 50 examples" in report  # the column subsample is reported


def test_report_shows_completion_methods_and_rmse_times_100(report: str, run_dir: Path) -> None:
    results = json.loads((run_dir / "completion" / "results.json").read_text())
    for method in ("global_mean", "additive"):
        assert method in report
        mean, std = results[method]["rmse_mean"], results[method]["rmse_std"]
        assert f"{100 * mean:.2f} ± {100 * std:.2f}" in report
    assert "F1 mean ± std" in report  # binary.json adds the classification metrics


def test_report_names_tasks_and_escapes_them(report: str) -> None:
    for task in TASKS[:2] + TASKS[3:]:
        assert task in report
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report
    assert "<script" not in report


def test_report_is_self_contained(report: str) -> None:
    assert "http://" not in report and "https://" not in report
    references = re.findall(r'(?:src|href)="([^"]*)"', report)
    images = [r for r in references if r.startswith("data:image/png;base64,")]
    assert all(r in images or r.startswith("#") for r in references)
    # 3 heatmaps + R^2 curve + per-task bars + completion RMSE, binary RMSE and binary F1
    assert len(images) == 8
    for image in images:
        assert base64.b64decode(image.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_sections_render_every_input(report: str) -> None:
    assert "not run yet" not in report and "could not be rendered" not in report
    assert "/cache/builtin/abc" in report and "3.25" in report  # model and pretraining report
    assert "rot13 (0 part file(s), not complete)" in report  # scoring in progress
    assert "temperature" in report and "predicted" in report  # replay, rendered generically
    assert "shard_size: 64" in report  # the resolved config


def test_report_draws_the_figures_its_inputs_allow(report: str, run_dir: Path) -> None:
    # no r2_curve.png: the analyse stage drew one into analysis/
    names = sorted(os.listdir(run_dir / "report_figures"))
    assert names == [
        "completion_binary.png",
        "completion_binary_f1.png",
        "completion_rmse.png",
        "per_task.png",
    ]
    for name in names:
        png_size(run_dir / "report_figures" / name)


def test_report_of_a_run_with_only_its_config_says_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(CONFIG_YAML)
    text = Path(build_report(str(tmp_path))).read_text(encoding="utf-8")
    for command in ("run", "matrix", "analyse", "complete", "replay"):
        assert f"not run yet: forgetray {command} {tmp_path}" in text
    assert "builtin (configured; no models/base.json yet)" in text
    assert "data:image/png" not in text
    assert write_report_figures(str(tmp_path)) == []


def test_an_unreadable_input_only_breaks_its_own_section(tmp_path: Path, run_dir: Path) -> None:
    shutil.copytree(run_dir / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "completion").mkdir()
    (tmp_path / "completion" / "results.json").write_text("{not json")
    text = Path(build_report(str(tmp_path))).read_text(encoding="utf-8")
    assert "could not be rendered: DamagedFileError" in text
    assert "json_format" in text  # the fine-tuning section still rendered


def test_r2_curve_is_drawn_for_the_report_when_the_analyse_stage_left_none(
    tmp_path: Path, run_dir: Path
) -> None:
    (tmp_path / "analysis").mkdir()
    shutil.copy(run_dir / "analysis" / "fits.json", tmp_path / "analysis" / "fits.json")
    assert write_report_figures(str(tmp_path)) == [str(tmp_path / "report_figures" / "r2_curve.png")]
    text = Path(build_report(str(tmp_path))).read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") == 1
