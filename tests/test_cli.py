"""`--dry-run` on every command that works in a run directory: the run's saved config with the
command line's overrides, printed, and nothing read or written beyond config.yaml."""

from __future__ import annotations

import os

import pytest
import yaml

from forgetray.cli import COMMANDS, SINGLE_RUN_COMMANDS, main
from forgetray.config import RunConfig, load_config

ARGUMENTS = {
    "score": ["--model", "some/model", "--name", "extra"],
    "finetune": [],
}
"""Required arguments beyond the run directory."""


def command_line(name: str, run: str, overrides: list[str]) -> list[str]:
    if name == "finetune":
        return ["finetune", "addition", "--protect", run, "--dry-run", *overrides]
    return [name, run, *ARGUMENTS.get(name, []), "--dry-run", *overrides]


def listing(root: str) -> dict[str, float]:
    return {
        os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
        for d, _, files in os.walk(root)
        for f in files
    }


@pytest.mark.parametrize("name", SINGLE_RUN_COMMANDS)
def test_dry_run_prints_the_runs_config_with_the_overrides_and_touches_nothing(tmp_path, capsys, name):
    run = tmp_path / "run"
    run.mkdir()
    saved = RunConfig(run_dir=str(run), seed=3)
    (run / "config.yaml").write_text(saved.to_yaml())
    takes_overrides = next(c for c in COMMANDS if c.name == name).extra is not None
    overrides = ["replay.n_tasks=2", "analyse.max_rank=4"] if takes_overrides else []
    before = listing(str(tmp_path))

    assert main(command_line(name, str(run), overrides)) == 0

    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config(run / "config.yaml", overrides).to_dict()
    assert printed["seed"] == 3
    if takes_overrides:
        assert (printed["replay"]["n_tasks"], printed["analyse"]["max_rank"]) == (2, 4)
    assert listing(str(tmp_path)) == before


def test_dry_run_names_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"forgetray: error: {tmp_path}/config.yaml: not a forgetray run directory (no config.yaml)"
    assert os.listdir(tmp_path) == []


def test_dry_run_refuses_a_bad_override_naming_the_key(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(RunConfig(run_dir=str(run)).to_yaml())
    assert main(["replay", str(run), "--dry-run", "replay.n_taks=2"]) == 2
    assert "replay.n_taks: unknown key" in capsys.readouterr().err


def test_compare_dry_run_lists_the_runs(capsys):
    assert main(["compare", "runs/a", "runs/b", "--dry-run"]) == 0
    assert capsys.readouterr().out == "runs/a\nruns/b\n"
