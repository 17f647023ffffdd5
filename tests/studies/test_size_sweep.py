"""`forgetray sweep`: two tiny built-in sizes x three tasks, each its own run, then the summary."""

import csv
import json
import os

import numpy as np
import pytest
import yaml

from forgetray.cli import main
from forgetray.config import ConfigError
from forgetray.studies.sizes import load_size_sweep, size_run_config, summary_csv

TASKS = ["addition", "uppercase", "rot13"]
SWEEP = {
    "run": {
        "model": {
            "builtin": {
                "vocab_size": 300,
                "n_head": 2,
                "context_length": 256,
                "pretrain_steps": 10,
                "batch_size": 4,
            }
        },
        "upstream": {"n_examples": 30},
        "tasks": {"builtin": TASKS, "n_examples": 16},
        "finetune": {"max_steps": 3, "learning_rate": 0.01},
        "score": {"shard_size": 30, "max_length": 64},
        "complete": {"revealed_k": 5, "n_seeds": 2},
    },
    "sizes": [
        {"name": "tiny-1x16", "overrides": ["model.builtin.n_layer=1", "model.builtin.n_embd=16"]},
        {"name": "tiny-2x32", "overrides": ["model.builtin.n_layer=2", "model.builtin.n_embd=32"]},
    ],
}


def write_sweep(tmp_path, sweep=SWEEP):
    path = tmp_path / "sizes.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return str(path)


def test_each_size_overrides_the_shared_run_config(tmp_path):
    sweep = load_size_sweep(write_sweep(tmp_path), ["run.finetune.max_steps=4", f"out={tmp_path / 'out'}"])
    small, large = (size_run_config(sweep, s, f"{sweep.out}/{s.name}") for s in sweep.sizes)
    assert (small.model.builtin.n_layer, small.model.builtin.n_embd) == (1, 16)
    assert (large.model.builtin.n_layer, large.model.builtin.n_embd) == (2, 32)
    assert small.finetune.max_steps == large.finetune.max_steps == 4
    assert small.tasks.builtin == tuple(TASKS) and large.run_dir == f"{tmp_path / 'out'}/tiny-2x32"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sizes": []}, "sizes: needs at least one base model"),
        ({"sizes": [{"name": "a"}, {"name": "a"}]}, "names must be unique"),
        (
            {"sizes": [{"name": "a", "overrides": ["run_dir=x"]}]},
            "sizes.0.overrides: run_dir is set by the sweep",
        ),
        (
            {"sizes": [{"name": "a", "overrides": ["model.builtin.n_layr=2"]}]},
            "model.builtin.n_layr: unknown key",
        ),
        ({"sizez": []}, "sizez: unknown key; accepted keys here: out, run, sizes"),
    ],
)
def test_bad_sweep_configs_name_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as error:
        sweep = load_size_sweep(write_sweep(tmp_path, {**SWEEP, **change}))
        for size in sweep.sizes:
            size_run_config(sweep, size, "x")
    assert "sizes.yaml" in str(error.value) or "sizes." in str(error.value)


def test_summary_csv_flattens_curves_and_methods():
    rows = [
        {"size": "a", "n_parameters": 10, "r2_svd": [0.5, 1.0], "completion_rmse": {"als_mf": 0.2}},
        {"size": "b", "n_parameters": 20, "r2_svd": [0.6, 1.0], "completion_rmse": {}},
    ]
    table = list(csv.DictReader(summary_csv(rows).splitlines()))
    assert table[0] == {
        "size": "a",
        "n_parameters": "10",
        "r2_svd_1": "0.5",
        "r2_svd_2": "1.0",
        "rmse_als_mf": "0.2",
    }
    assert table[1]["rmse_als_mf"] == ""


@pytest.mark.slow
def test_sweep_over_two_builtin_sizes_into_a_uri(ray_session, tmp_path, monkeypatch):
    """The sweep directory is a file:// URI: every run goes through the local cache and is uploaded;
    a second call with a size added and the cache gone downloads the sweep back, leaves the sizes
    done as they are and measures only the new one."""
    import shutil

    monkeypatch.setenv("FORGETRAY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bucket" / "sizes"
    assert main(["sweep", write_sweep(tmp_path), "--out", f"file://{out}", "--no-progress"]) == 0
    rows = json.loads((out / "summary.json").read_text())
    assert [r["size"] for r in rows] == ["tiny-1x16", "tiny-2x32"]
    small, large = rows
    assert 0 < small["n_parameters"] < large["n_parameters"]
    for row in rows:
        z = np.load(out / row["size"] / "matrix" / "forgetting.npy", allow_pickle=False)
        assert z.shape == (3, 30)
        assert row["mean_forgetting"] == pytest.approx(float(np.mean(z, dtype=np.float64)), rel=1e-6)
        assert len(row["r2_svd"]) == 3 and row["r2_svd"][-1] == pytest.approx(1.0)
        assert set(row["completion_rmse"]) == {"global_mean", "additive", "knn", "als_mf"}
        assert (out / row["size"] / "report.html").exists()
    assert (out / "summary.png").stat().st_size > 10_000
    assert len(list(csv.DictReader((out / "summary.csv").read_text().splitlines()))) == 2
    assert not [n for _, _, names in os.walk(out) for n in names if n.endswith(".upload")]

    # A size added later is measured; the sizes done are not touched (downloaded back, not re-run).
    done = ["tiny-1x16", "tiny-2x32"]
    stamps = {
        (size, path): (out / size / path).stat().st_mtime_ns
        for size in done
        for path in ("matrix/forgetting.npy", "report.html", "history.json")
    }
    shutil.rmtree(tmp_path / "cache" / "rundirs")
    added = {"name": "tiny-1x24", "overrides": ["model.builtin.n_layer=1", "model.builtin.n_embd=24"]}
    grown = dict(SWEEP, sizes=[*SWEEP["sizes"], added])
    assert main(["sweep", write_sweep(tmp_path, grown), "--out", f"file://{out}", "--no-progress"]) == 0
    for (size, path), stamp in stamps.items():
        assert (out / size / path).stat().st_mtime_ns == stamp, (size, path)
    assert [r["size"] for r in json.loads((out / "summary.json").read_text())] == [*done, "tiny-1x24"]
    assert np.load(out / "tiny-1x24" / "matrix" / "forgetting.npy", allow_pickle=False).shape == (3, 30)
    assert json.loads((out / "tiny-1x24" / "history.json").read_text())[0]["finetuned"] == TASKS
    # Each size logs into its own run directory only.
    assert "tiny-2x32" not in (out / "tiny-1x16" / "logs" / "forgetray.log").read_text()
    assert "tiny-1x24" not in (out / "tiny-2x32" / "logs" / "forgetray.log").read_text()
