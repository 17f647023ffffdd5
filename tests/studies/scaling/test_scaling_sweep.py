"""`forgetray scaling`: the fits over collected points (no Ray), and the command end to end on a shrunken
built-in model through Ray Tune + Ray Train + DeepSpeed (slow)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from repo_paths import REPO

from forgetray.stats.scaling import shifted_power_law

PLANTED_FT = dict(c=1.0, a=3000.0, alpha=0.5, b=6.0, beta=0.8, rho=0.9, s=0.5)


def synthetic_points() -> list[dict]:
    """L_ft from a planted law, L_f = -1.5 L_ft + 6 exactly: what the sweep would collect."""
    points = []
    for rank in (1, 2, 4, 8):
        n_params = 3840 * rank
        for step in range(0, 45, 10):
            l_ft = float(shifted_power_law(n_params, max(step, 1), **PLANTED_FT))
            points.append(
                {"rank": rank, "n_params": n_params, "step": step, "l_ft": l_ft, "l_f": -1.5 * l_ft + 6}
            )
    return points


def test_fits_over_collected_points_recover_the_planted_law(tmp_path):
    from forgetray.report.html import build_report
    from forgetray.report.scaling_plots import scaling_figures
    from forgetray.studies.scaling.study import fit_scaling_laws

    points = synthetic_points()
    fits = fit_scaling_laws(points, min_step=10)
    assert fits["n_points"] == 4 * 4 and fits["ranks"] == [1, 2, 4, 8]
    assert fits["linear"]["c"] == pytest.approx(1.5) and fits["linear"]["s"] == pytest.approx(6.0)
    law_ft, law_f = fits["power_law_l_ft"], fits["power_law_l_f"]
    assert law_ft["c"] == 1.0 and law_f["c"] == -1.0  # falling loss, rising forgetting
    for name in ("alpha", "beta", "rho"):
        assert law_ft[name] == pytest.approx(PLANTED_FT[name], rel=2e-2)
        assert law_f[name] == pytest.approx(PLANTED_FT[name], rel=2e-2)
    assert law_f["s"] == pytest.approx(-1.5 * PLANTED_FT["s"] + 6, rel=1e-3)
    assert fits["l_f_via_linear"]["r2"] > 0.9999
    assert all(v > 0.999 for v in fits["r2_by_rank"]["power_law_l_f"].values())
    assert [r["min_step"] for r in fits["r2_by_min_step"]] == [10, 20, 30]

    run = tmp_path / "run"
    out = run / "scaling"
    out.mkdir(parents=True)
    (out / "fits.json").write_text(json.dumps(fits))
    assert len(scaling_figures(points, fits, str(out))) == 3
    html = open(build_report(str(run)), encoding="utf-8").read()
    assert "Scaling laws for forgetting" in html and "1.5000" in html and html.count("data:image/png") >= 3


@pytest.mark.slow
def test_scaling_command_end_to_end(tiny_run, tmp_path):
    from forgetray.cli import main

    run_dir = tmp_path / "run"  # `scaling` makes a run of its own: nothing to share
    overrides = tiny_run.overrides(
        "upstream.n_examples=24",
        "tasks.builtin=[addition]",
        "tasks.n_examples=32",
        "finetune.max_steps=8",
        "finetune.micro_batch_size=4",
        "finetune.warmup_steps=1",
        "scaling.ranks=[1, 2]",
        "scaling.eval_every=2",
        "scaling.n_upstream=16",
        "scaling.n_task_eval=8",
        "scaling.min_step=2",
    )
    assert main(["scaling", "--out", str(run_dir), *overrides]) == 0
    out = run_dir / "scaling"
    trials = {r: json.loads((out / "trials" / f"rank-{r}.json").read_text()) for r in (1, 2)}
    assert trials[2]["n_params"] == 2 * trials[1]["n_params"] > 0  # LoRA parameters grow with the rank
    for trial in trials.values():
        records = trial["records"]
        assert [r["step"] for r in records] == [0, 2, 4, 6, 8]
        # LoRA's B starts at zero: at step 0 the model is the base, CE = base entropy, KL = 0.
        assert records[0]["kl"] == pytest.approx(0, abs=1e-9)
        assert records[0]["l_f"] == pytest.approx(records[0]["base_entropy"])
        assert records[-1]["kl"] > 0 and records[-1]["l_ft"] < records[0]["l_ft"]
    fits = json.loads((out / "fits.json").read_text())
    assert fits["n_points"] == 8 and np.isfinite(fits["linear"]["r2"])
    for name in ("points.csv", "linear_relation.png", "power_law_l_ft.png", "power_law_l_f.png"):
        assert os.path.exists(out / name), name
    assert "Scaling laws for forgetting" in (run_dir / "report.html").read_text()

    # Re-running trains nothing (every trial's pointer exists) and refits the same points.
    mtime = os.path.getmtime(out / "trials" / "rank-1.json")
    assert main(["scaling", "--out", str(run_dir), *overrides]) == 0
    assert os.path.getmtime(out / "trials" / "rank-1.json") == mtime
    assert json.loads((out / "fits.json").read_text())["linear"] == fits["linear"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("scaling.ranks=[4]", "scaling.ranks: needs at least two LoRA ranks"),
        ("scaling.ranks=[2, 2]", "scaling.ranks: must be distinct"),
        ("scaling.min_step=0", "scaling.min_step: must be >= 1"),
        ("score.metric=kl", "score.metric: expected one of 'nll', 'kl_ce'"),
    ],
)
def test_bad_scaling_settings_name_the_key(override, message):
    from forgetray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [override])


def test_scaling_yaml_loads_and_asks_for_a_task_of_the_run():
    from forgetray.config import ConfigError, load_config
    from forgetray.studies.scaling.study import run_scaling

    config = load_config(os.path.join(REPO, "configs", "scaling.yaml"))
    assert config.finetune.method == "lora" and config.scaling.ranks == (1, 2, 4, 8)
    with pytest.raises(ConfigError, match=r"scaling\.task: 'rot13' is not one of the run's tasks"):
        run_scaling(load_config(None, ["tasks.builtin=[addition]", "scaling.task=rot13"]), log=lambda m: None)
