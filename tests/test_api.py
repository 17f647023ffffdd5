"""The Python API (forgetray.api, re-exported lazily by forgetray) and the CLI's --version and --help;
the slow test runs docs/api.md's example as written."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import forgetray
from forgetray import storage
from forgetray.cli import COMMANDS, build_parser, main
from forgetray.rundir import NoMatrixError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_forgetray_loads_no_heavy_library():
    code = (
        "import sys, forgetray; "
        "print(forgetray.__version__, sorted(m for m in ('torch', 'ray', 'numpy', 'transformers', 'pyarrow', "
        "'yaml') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    version, loaded = out.stdout.strip().split(" ", 1)
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", version) and loaded == "[]"


def test_lazy_names():
    assert forgetray.load_config is __import__("forgetray.config").config.load_config
    assert set(forgetray.__all__) <= set(dir(forgetray))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        forgetray.nope  # noqa: B018


def write_matrix(root, z, tasks, examples):
    storage.save_npy(os.path.join(root, "matrix", "forgetting.npy"), np.asarray(z, dtype=np.float32))
    storage.write_json(os.path.join(root, "matrix", "index.json"), {"tasks": tasks, "examples": examples})


def test_open_run_and_long_form(tmp_path):
    z = [[0.5, -0.25, 0.0], [1.0, 2.0, -1.5]]
    write_matrix(str(tmp_path), z, ["addition", "rot13"], ["wiki/0", "code/1", "wiki/2"])
    matrix = forgetray.open_run(tmp_path)
    assert matrix.shape == (2, 3) and matrix.tasks == ("addition", "rot13")
    assert matrix.examples == ("wiki/0", "code/1", "wiki/2")
    np.testing.assert_array_equal(matrix.row("rot13"), np.float32([1.0, 2.0, -1.5]))
    frame = matrix.to_pandas()
    assert list(frame.columns) == ["task", "example_id", "forgetting"]
    assert [tuple(r) for r in frame.itertuples(index=False)] == [
        ("addition", "wiki/0", 0.5),
        ("addition", "code/1", -0.25),
        ("addition", "wiki/2", 0.0),
        ("rot13", "wiki/0", 1.0),
        ("rot13", "code/1", 2.0),
        ("rot13", "wiki/2", -1.5),
    ]
    # Back to the matrix: the long form is a faithful reshaping.
    wide = frame.pivot(index="task", columns="example_id", values="forgetting")
    np.testing.assert_array_equal(
        wide.loc[list(matrix.tasks), list(matrix.examples)].to_numpy(), matrix.values
    )
    with pytest.raises(KeyError, match="no task 'uppercase'"):
        matrix.row("uppercase")
    with pytest.raises(KeyError, match="no learning curve for task 'addition'"):
        matrix.learning_curve("addition")


def test_open_run_on_a_uri_fetches_only_the_matrix(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETRAY_CACHE", str(tmp_path / "cache"))
    bucket = tmp_path / "bucket" / "run"
    write_matrix(str(bucket), [[0.5, -0.25]], ["addition"], ["wiki/0", "code/1"])
    storage.write_json(str(bucket / "curves" / "addition.json"), {"task": "addition", "points": []})
    storage.write_text(str(bucket / "report.html"), "<html></html>")
    matrix = forgetray.open_run(f"file://{bucket}")
    assert matrix.tasks == ("addition",) and matrix.examples == ("wiki/0", "code/1")
    np.testing.assert_array_equal(matrix.values, np.float32([[0.5, -0.25]]))
    cached = [
        os.path.relpath(os.path.join(d, n), tmp_path / "cache")
        for d, _, ns in os.walk(tmp_path / "cache")
        for n in ns
    ]
    assert sorted(os.path.basename(p) for p in cached if not os.path.basename(p).startswith(".")) == [
        "forgetting.npy",
        "index.json",
    ]


def test_open_run_errors_name_the_place(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        forgetray.open_run(tmp_path / "missing")
    no_matrix = (
        f"{tmp_path}: no forgetting matrix yet (matrix/forgetting.npy); run `forgetray run --out {tmp_path}`"
    )
    with pytest.raises(NoMatrixError, match=re.escape(no_matrix)):
        forgetray.open_run(tmp_path)
    write_matrix(str(tmp_path), [[1.0, 2.0]], ["a", "b"], ["x", "y"])
    with pytest.raises(
        ValueError, match=r"forgetting\.npy: shape \(1, 2\) does not match its index \(2, 2\)"
    ):
        forgetray.open_run(tmp_path)


def test_load_config_error_as_documented():
    with pytest.raises(forgetray.ConfigError) as error:
        forgetray.load_config(None, ["finetune.max_steps=0"])
    assert (
        str(error.value) == "built-in default + command line: finetune.max_steps: must be a positive integer"
    )
    assert "ConfigError: " + str(error.value) in open(os.path.join(ROOT, "docs", "api.md")).read()


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"forgetray {forgetray.__version__}"


def test_every_subcommand_help_has_an_example_that_parses():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    examples = {command.name: command.example for command in COMMANDS}
    assert set(commands) == set(examples)
    for name, sub in commands.items():
        text = sub.format_help()
        assert "example:\n  forgetray " + name in text, name
        assert "--quiet" in text and "--verbose" in text and "--dry-run" in text, name
        for line in examples[name].split("\n"):
            args, extra = parser.parse_known_args(line.split()[1:])
            assert args.command == name and all("=" in e for e in extra), line


def api_example():
    text = open(os.path.join(ROOT, "docs", "api.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


@pytest.mark.slow
def test_documented_example_runs(ray_session, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FORGETRAY_CACHE", str(tmp_path / "cache"))
    exec(compile(api_example(), "docs/api.md", "exec"), {})
    out = capsys.readouterr().out
    assert "(2, 40)" in out and "('addition', 'uppercase')" in out
    run = tmp_path / "runs" / "api-example"
    curve = json.load(open(run / "curves" / "addition.json"))["points"]
    assert [p["step"] for p in curve] == [2, 4]
    timings = json.load(open(run / "timings.json"))[-1]["seconds"]
    assert "report" in timings and "finetune" in timings
    # The report is built after the stages' timings are saved: it shows them, not "no timings.json yet".
    html = open(run / "report.html").read()
    assert "no timings.json yet" not in html and "Stage timings" in html and "Learning curves" in html
