"""Bad inputs, table-driven: every case is a one-line error that names the culprit, exit status 2, no
traceback, and a run directory left exactly as it was.

Cases need no training: config and override errors stop at load (or `--dry-run`); data and model
errors stop before the first write of a `run` (the base model is a tiny local directory); damaged
run directories are built from the documented file formats (`synthetic_run`) and damaged one way
each. The seen cases that must give a correct result rather than an error (a truncated matrix, a
re-scored task) are at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from forgetray.cli import main

TASKS = ("addition", "uppercase")
EXAMPLES = [f"builtin/{i}" for i in range(6)]


@pytest.fixture(autouse=True)
def fresh_log_handlers():
    """The forgetray logger writes to the stderr of the test that first set it up; each test here
    captures its own."""
    import logging

    logger = logging.getLogger("forgetray")
    saved = logger.handlers[:]
    logger.handlers.clear()
    yield
    for handler in logger.handlers:
        handler.close()
    logger.handlers[:] = saved


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` but the log (a refused command may log that it was refused)."""
    if not root.exists():
        return {}
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and not relative.startswith("logs/"):
            found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, culprit: str) -> None:
    errors = [line for line in err.splitlines() if line.startswith("forgetray: error:")]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(errors) == 1, err
    assert culprit in errors[0], errors[0]


# ---------------------------------------------------------------------------------------------------
# Config and overrides: refused at load, so `--dry-run` shows it and nothing is written.

CONFIG_CASES: list[tuple[str, list[str], str]] = [
    ("unknown key", ["finetune.lerning_rate=1"], "finetune.lerning_rate: unknown key"),
    ("wrong type", ["finetune.max_steps=abc"], "finetune.max_steps: expected int"),
    ("negative steps", ["finetune.max_steps=-1"], "finetune.max_steps"),
    ("nan learning rate", ["finetune.learning_rate=.nan"], "finetune.learning_rate: expected a finite"),
    ("inf learning rate", ["finetune.learning_rate=.inf"], "finetune.learning_rate: expected a finite"),
    ("zero learning rate", ["finetune.learning_rate=0"], "finetune.learning_rate: must be > 0"),
    ("inf epochs", ["finetune.max_epochs=.inf"], "finetune.max_epochs"),
    ("bad method", ["finetune.method=qlora"], "finetune.method: expected one of"),
    ("zero stage 5", ["finetune.zero_stage=5"], "finetune.zero_stage"),
    (
        "missing deepspeed json",
        ["finetune.deepspeed_config=/nonexistent/ds.json"],
        "finetune.deepspeed_config",
    ),
    ("score max_length 0", ["score.max_length=0"], "score.max_length"),
    ("batch below length", ["score.max_batch_tokens=1"], "score.max_batch_tokens"),
    ("zero actors", ["score.num_actors=0"], "score.num_actors"),
    ("unknown builtin task", ["tasks.builtin=[nope]"], "tasks.builtin.0: unknown built-in task 'nope'"),
    (
        "builtin task twice",
        ["tasks.builtin=[addition, addition]"],
        "tasks.builtin: task 'addition' is listed twice",
    ),
    ("no tasks", ["tasks.builtin=[]"], "tasks: no tasks to fine-tune"),
    ("task named base", ["tasks.builtin=[base]"], "tasks.builtin.0: unknown built-in task 'base'"),
    ("empty run_dir", ["run_dir="], "run_dir: must not be empty"),
    ("source named ..", ["tasks.sources=[{name: '..', path: x.jsonl}]"], "tasks.sources.0.name: '..'"),
    ("source named .", ["tasks.sources=[{name: '.', path: x.jsonl}]"], "tasks.sources.0.name: '.'"),
    ("source name with /", ["tasks.sources=[{name: 'a/b', path: x.jsonl}]"], "tasks.sources.0.name: 'a/b'"),
    ("source name with \\", ["tasks.sources=[{name: 'a\\b', path: x.jsonl}]"], "tasks.sources.0.name"),
    ("source named base", ["tasks.sources=[{name: base, path: x.jsonl}]"], "'base' is reserved"),
    ("hidden source name", ["tasks.sources=[{name: .x, path: x.jsonl}]"], "tasks.sources.0.name: '.x'"),
    ("source name with space", ["tasks.sources=[{name: 'a b', path: x.jsonl}]"], "tasks.sources.0.name"),
    ("empty source name", ["tasks.sources=[{name: '', path: x.jsonl}]"], "tasks.sources.0.name"),
    (
        "source name too long",
        [f"tasks.sources=[{{name: {'a' * 101}, path: x.jsonl}}]"],
        "tasks.sources.0.name",
    ),
    (
        "two sources one name",
        ["tasks.sources=[{name: t, path: a.jsonl}, {name: t, path: b.jsonl}]"],
        "task 't' is listed twice",
    ),
    (
        "source name equals builtin",
        ["tasks.builtin=[addition]", "tasks.sources=[{name: addition, path: a.jsonl}]"],
        "task 'addition' is listed twice",
    ),
    ("source without path", ["tasks.sources=[{name: t}]"], "tasks.sources.0.path: required key is missing"),
    ("override without =", ["=5"], "command line: override '=5'"),
    ("override bad yaml", ["finetune.max_steps=[1,"], "command line: finetune.max_steps: value"),
    ("override list index", ["upstream.sources.5.path=x"], "upstream.sources.5: no list item"),
    ("override into a value", ["seed.x=1"], "seed: is a value, not a mapping"),
    ("unknown completion method", ["complete.methods=[magic]"], "complete.methods: unknown ['magic']"),
    ("unknown replay sampler", ["replay.samplers=[magic]"], "replay.samplers: unknown ['magic']"),
    ("no upstream sources", ["upstream.sources=[]"], "upstream.sources: needs at least one source"),
    ("zero upstream examples", ["upstream.n_examples=0"], "upstream.n_examples"),
    ("gguf beside a model", ["model.name_or_path=x", "model.gguf_file=y.gguf"], "model.gguf_file"),
    ("repeated scaling ranks", ["scaling.ranks=[4, 4]"], "scaling.ranks: must be distinct"),
    ("bool as word", ["tasks.chat_template=maybe"], "tasks.chat_template: expected true or false"),
    ("bad dtype", ["model.dtype=float8"], "model.dtype: expected one of"),
]


@pytest.mark.parametrize(
    ("overrides", "culprit"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES]
)
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_config_errors(tmp_path, capsys, overrides, culprit, dry_run):
    out = tmp_path / "run"
    where = [] if any(o.startswith("run_dir=") for o in overrides) else ["--out", str(out)]
    before = set(os.listdir("."))
    code, err = run_cli(["run", *where, *(["--dry-run"] if dry_run else []), *overrides], capsys)
    assert_refused(code, err, culprit)
    assert not out.exists() and set(os.listdir(".")) == before


CONFIG_FILE_CASES: list[tuple[str, bytes, str]] = [
    ("not yaml", b"finetune: [unclosed\n", "not valid YAML"),
    ("not utf-8", b"seed: \xff\xfe\n", "not UTF-8 text"),
    ("top level list", b"- 1\n- 2\n", "the top level must be a mapping"),
    ("unknown stage", b"modle: {name_or_path: x}\n", "modle: unknown key"),
    ("stage not a mapping", b"finetune: 3\n", "<top level>"),
]


@pytest.mark.parametrize(
    ("content", "culprit"), [c[1:] for c in CONFIG_FILE_CASES], ids=[c[0] for c in CONFIG_FILE_CASES]
)
def test_config_file_errors(tmp_path, capsys, content, culprit):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    before = snapshot(tmp_path)
    code, err = run_cli(["run", str(path), "--out", str(tmp_path / "run")], capsys)
    if culprit == "<top level>":
        culprit = "finetune: expected a mapping"
    assert_refused(code, err, culprit)
    assert str(path) in err or culprit in err
    assert snapshot(tmp_path) == before


def test_missing_config_file_and_two_config_files(tmp_path, capsys):
    code, err = run_cli(["run", str(tmp_path / "none.yaml"), "--dry-run"], capsys)
    assert_refused(code, err, f"{tmp_path / 'none.yaml'}: config file not found")
    code, err = run_cli(["run", "a.yaml", "b.yaml", "--dry-run"], capsys)
    assert_refused(code, err, "expected at most one config file")


def test_run_config_out_then_overrides_in_the_readme_order(tmp_path, capsys):
    """`forgetray run CONFIG --out DIR key=value`: the overrides after --out apply."""
    config = tmp_path / "c.yaml"
    config.write_text("seed: 3\n")
    assert main(["run", str(config), "--out", str(tmp_path / "r"), "finetune.max_steps=7", "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed"] == 3 and printed["finetune"]["max_steps"] == 7
    assert printed["run_dir"] == str(tmp_path / "r")


# ---------------------------------------------------------------------------------------------------
# Data files and model directories: refused before the first write of `run`.


def small_run_args(model_dir: str, out: Path) -> list[str]:
    return [
        "run",
        "--out",
        str(out),
        "--no-progress",
        f"model.name_or_path={model_dir}",
        "upstream.n_examples=8",
        "tasks.builtin=[addition]",
        "tasks.n_examples=4",
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def data_case(kind: str, tmp: Path) -> tuple[list[str], str]:
    """Overrides pointing one source at a bad file, and the text the error must contain."""
    task = tmp / "task.jsonl"
    upstream = tmp / "upstream.jsonl"
    good = [{"prompt": "2+2=", "response": "4"}] * 4
    if kind == "task file missing":
        return [f"tasks.sources=[{{name: t, path: {tmp / 'none.jsonl'}}}]"], str(tmp / "none.jsonl")
    if kind == "task not json":
        task.write_text('{"prompt": "a", "response": "b"}\n{not json\n')
    elif kind == "task without response field":
        write_jsonl(task, [{"prompt": "a", "answer": "b"}] * 4)
        return [f"tasks.sources=[{{name: t, path: {task}}}]"], "response"
    elif kind == "task not utf-8":
        task.write_bytes(b'{"prompt": "\xff\xfe", "response": "b"}\n')
    elif kind == "task file empty":
        task.write_text("")
    elif kind == "task null response":
        write_jsonl(task, [*good, {"prompt": "a", "response": None}])
        return [f"tasks.sources=[{{name: t, path: {task}}}]"], "response"
    elif kind == "task response cut off":
        write_jsonl(task, [*good, {"prompt": "word " * 400, "response": "x"}])
        return [f"tasks.sources=[{{name: t, path: {task}}}]", "finetune.max_length=32"], "example 't/4'"
    elif kind == "upstream file missing":
        return [f"upstream.sources=[{{path: {tmp / 'none.jsonl'}}}]"], str(tmp / "none.jsonl")
    elif kind == "upstream without text field":
        write_jsonl(upstream, [{"body": "x"}] * 8)
        return [f"upstream.sources=[{{path: {upstream}}}]"], "text"
    elif kind == "upstream parquet damaged":
        bad = tmp / "upstream.parquet"
        bad.write_bytes(b"PAR1 this is not parquet")
        return [f"upstream.sources=[{{path: {bad}}}]"], str(bad)
    elif kind == "upstream ids repeated":
        write_jsonl(upstream, [{"text": f"t{i}", "id": "same"} for i in range(4)])
        return [f"upstream.sources=[{{path: {upstream}, id_field: id}}]"], "same"
    return [f"tasks.sources=[{{name: t, path: {task}}}]", "tasks.builtin=[]"], str(task)


DATA_CASES = [
    "task file missing",
    "task not json",
    "task without response field",
    "task not utf-8",
    "task file empty",
    "task null response",
    "task response cut off",
    "upstream file missing",
    "upstream without text field",
    "upstream parquet damaged",
    "upstream ids repeated",
]


@pytest.mark.parametrize("kind", DATA_CASES)
def test_data_errors_leave_no_run_directory(tmp_path, capsys, tiny_model_dir, kind):
    data = tmp_path / "data"
    data.mkdir()
    overrides, culprit = data_case(kind, data)
    out = tmp_path / "run"
    code, err = run_cli([*small_run_args(tiny_model_dir, out), *overrides], capsys)
    assert_refused(code, err, culprit)
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))


def model_case(kind: str, source: str, tmp: Path) -> tuple[str, str]:
    """A damaged copy of a model directory, and the text the error must contain."""
    if kind == "no such directory":
        return str(tmp / "none"), str(tmp / "none")
    model = tmp / "model"
    shutil.copytree(source, model)
    if kind == "truncated safetensors":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return str(model), str(weights)
    if kind == "garbage safetensors":
        (model / "model.safetensors").write_bytes(b"\x00" * 16)
        return str(model), str(model / "model.safetensors")
    if kind == "no config.json":
        (model / "config.json").unlink()
        return str(model), "no config.json"
    if kind == "config.json not json":
        (model / "config.json").write_text("{truncated")
        return str(model), str(model / "config.json")
    if kind == "no tokenizer":
        for name in os.listdir(model):
            if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                (model / name).unlink()
        return str(model), str(model)
    raise AssertionError(kind)


MODEL_CASES = [
    "no such directory",
    "truncated safetensors",
    "garbage safetensors",
    "no config.json",
    "config.json not json",
    "no tokenizer",
]


@pytest.mark.parametrize("kind", MODEL_CASES)
def test_model_directory_errors_fail_once_in_the_driver(tmp_path, capsys, tiny_model_dir, kind):
    model, culprit = model_case(kind, tiny_model_dir, tmp_path)
    out = tmp_path / "run"
    code, err = run_cli(small_run_args(model, out), capsys)
    assert_refused(code, err, culprit)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------
# Run directories: built from the documented formats, then damaged one way each.


def write_scores(run: Path, name: str, nll: np.ndarray, max_length: int = 64) -> None:
    """One model's scores as the driver writes them: parts, plan.json and a `_SUCCESS.json` with its
    recorded inputs and part digests."""
    from forgetray import digests, storage
    from forgetray.config import ScoreConfig
    from forgetray.models.loading import ModelRef
    from forgetray.score.driver import SCORES_SCHEMA, examples_digest, part_path, scores_inputs

    out = run / "scores" / name
    config = ScoreConfig(max_length=max_length, shard_size=4)
    upstream = pq.read_table(run / "data" / "upstream.parquet")
    plan = {"n_examples": upstream.num_rows, "shard_size": 4, "max_length": max_length}
    storage.write_json(str(out / "plan.json"), plan)
    for k, start in enumerate(range(0, len(EXAMPLES), 4)):
        ids = EXAMPLES[start : start + 4]
        table = pa.table(
            {"example_id": ids, "nll": nll[start : start + 4], "n_tokens": [10] * len(ids)},
            schema=SCORES_SCHEMA,
        )
        storage.write_parquet(part_path(str(out), k), table)
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    record = {
        "model": name,
        "n_examples": len(EXAMPLES),
        "metric": "nll",
        "inputs": scores_inputs(examples_digest(upstream), plan, ModelRef(f"models/{name}"), config),
        "parts": {p: digests.file_record(str(out / p)) for p in parts},
    }
    storage.write_json(str(out / "_SUCCESS.json"), record)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> Path:
    """A finished run's scores (base and two tasks over six examples) and its assembled matrix."""
    from forgetray import storage
    from forgetray.config import load_config

    run = tmp_path_factory.mktemp("synthetic") / "run"
    config = load_config(
        None, [f"run_dir={run}", f"tasks.builtin=[{', '.join(TASKS)}]", "score.max_length=64"]
    )
    storage.write_text(str(run / "config.yaml"), config.to_yaml())
    upstream = pa.table(
        {
            "example_id": EXAMPLES,
            "kind": ["text"] * len(EXAMPLES),
            "prompt": [""] * len(EXAMPLES),
            "response": [f"text {i}" for i in range(len(EXAMPLES))],
        }
    )
    storage.write_parquet(str(run / "data" / "upstream.parquet"), upstream)
    rng = np.random.default_rng(0)
    for name in ("base", *TASKS):
        write_scores(run, name, rng.uniform(1, 3, len(EXAMPLES)))
    assert main(["matrix", str(run)]) == 0
    return run


def damage(kind: str, run: Path) -> tuple[list[str], str]:
    """Damage a copy of the synthetic run one way; the command to run and the text its error names."""
    matrix = ["matrix", str(run)]
    if kind == "truncated _SUCCESS.json":
        path = run / "scores" / "addition" / "_SUCCESS.json"
        path.write_bytes(path.read_bytes()[:40])
        return matrix, str(path)
    if kind == "_SUCCESS.json not utf-8":
        path = run / "scores" / "addition" / "_SUCCESS.json"
        path.write_bytes(b"\xff\xfe{}")
        return matrix, str(path)
    if kind == "config.yaml not utf-8":
        (run / "config.yaml").write_bytes(b"seed: \xff\n")
        return matrix, str(run / "config.yaml")
    if kind == "config.yaml not yaml":
        (run / "config.yaml").write_text("seed: [\n")
        return matrix, str(run / "config.yaml")
    if kind == "config.yaml missing":
        (run / "config.yaml").unlink()
        return matrix, "not a forgetray run directory"
    if kind == "part rewritten":
        path = run / "scores" / "uppercase" / "part-00000.parquet"
        table = pq.read_table(path)
        pq.write_table(table.set_column(1, "nll", pa.array(np.zeros(table.num_rows))), path)
        return matrix, str(path)
    if kind == "part truncated":
        path = run / "scores" / "uppercase" / "part-00001.parquet"
        path.write_bytes(path.read_bytes()[:30])
        return matrix, str(path)
    if kind == "part missing":
        path = run / "scores" / "uppercase" / "part-00001.parquet"
        path.unlink()
        return matrix, str(path)
    if kind == "part added":
        shutil.copy(
            run / "scores" / "uppercase" / "part-00000.parquet",
            run / "scores" / "uppercase" / "part-00009.parquet",
        )
        return matrix, str(run / "scores" / "uppercase" / "part-00009.parquet")
    if kind == "task scored with another max_length":
        write_scores(run, "uppercase", np.ones(len(EXAMPLES)), max_length=32)
        return matrix, "score.max_length=32"
    if kind == "base not finished":
        (run / "scores" / "base" / "_SUCCESS.json").unlink()
        return matrix, str(run / "scores" / "base" / "_SUCCESS.json")
    if kind == "upstream damaged":
        (run / "data" / "upstream.parquet").write_bytes(b"PAR1 no")
        return matrix, str(run / "data" / "upstream.parquet")
    if kind == "analyse truncated matrix":
        path = run / "matrix" / "forgetting.npy"
        path.write_bytes(path.read_bytes()[:100])
        return ["analyse", str(run)], str(path)
    if kind == "complete damaged index":
        (run / "matrix" / "index.json").write_text('{"tasks": [')
        return ["complete", str(run)], str(run / "matrix" / "index.json")
    if kind == "resume with another score.max_length":
        return ["run", "--out", str(run), "score.max_length=32", f"tasks.builtin=[{', '.join(TASKS)}]"], (
            "score.max_length=64"
        )
    if kind == "resume with another learning rate":
        overrides = [
            f"tasks.builtin=[{', '.join(TASKS)}]",
            "score.max_length=64",
            "finetune.learning_rate=0.5",
        ]
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "addition.json").write_text("{}")
        return [
            "run",
            "--out",
            str(run),
            *overrides,
        ], f"{run / 'config.yaml'}: this run directory holds results"
    if kind == "report of a damaged config":
        (run / "config.yaml").write_bytes(b"\xff")
        return ["score", str(run), "--model", "x", "--name", "t"], str(run / "config.yaml")
    raise AssertionError(kind)


RUN_CASES = [
    "truncated _SUCCESS.json",
    "_SUCCESS.json not utf-8",
    "config.yaml not utf-8",
    "config.yaml not yaml",
    "config.yaml missing",
    "part rewritten",
    "part truncated",
    "part missing",
    "part added",
    "task scored with another max_length",
    "base not finished",
    "upstream damaged",
    "analyse truncated matrix",
    "complete damaged index",
    "resume with another score.max_length",
    "resume with another learning rate",
    "report of a damaged config",
]


@pytest.mark.parametrize("kind", RUN_CASES)
def test_damaged_run_directories(tmp_path, capsys, synthetic_run, kind):
    run = tmp_path / "run"
    shutil.copytree(synthetic_run, run)
    argv, culprit = damage(kind, run)
    before = snapshot(run)
    code, err = run_cli(argv, capsys)
    assert_refused(code, err, culprit)
    assert snapshot(run) == before


NAME_CASES = [
    ("../../x", "'../../x'"),
    ("base", "'base' is reserved"),
    ("a.b", "'a.b'"),
    ("", "''"),
    ("a/b", "'a/b'"),
]


@pytest.mark.parametrize(("name", "culprit"), NAME_CASES, ids=[c[0] or "empty" for c in NAME_CASES])
def test_score_names_cannot_collide_or_escape(tmp_path, capsys, synthetic_run, tiny_model_dir, name, culprit):
    run = tmp_path / "run"
    shutil.copytree(synthetic_run, run)
    before = snapshot(tmp_path)
    code, err = run_cli(["score", str(run), "--model", tiny_model_dir, "--name", name], capsys)
    assert_refused(code, err, f"score --name: {culprit}")
    assert snapshot(tmp_path) == before


def test_score_refuses_a_broken_model_before_ray(tmp_path, capsys, synthetic_run, tiny_model_dir):
    run = tmp_path / "run"
    shutil.copytree(synthetic_run, run)
    model, culprit = model_case("truncated safetensors", tiny_model_dir, tmp_path)
    before = snapshot(run)
    code, err = run_cli(["score", str(run), "--model", model, "--name", "extra"], capsys)
    assert_refused(code, err, culprit)
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------------
# Seen cases that must give a correct result: the matrix is assembled again from its inputs.


def matrix_of(run: Path) -> np.ndarray:
    return np.load(run / "matrix" / "forgetting.npy", allow_pickle=False)


def expected_matrix(run: Path) -> np.ndarray:
    from forgetray.score.driver import read_scores

    def nll(name: str) -> np.ndarray:
        frame = read_scores(str(run / "scores" / name)).to_pandas().set_index("example_id")
        return frame.loc[EXAMPLES, "nll"].to_numpy()

    return np.stack([(nll(t) - nll("base")).astype(np.float32) for t in TASKS])


REASSEMBLY_CASES: dict[str, Callable[[Path], None]] = {
    "truncated forgetting.npy": lambda run: (run / "matrix" / "forgetting.npy").write_bytes(
        (run / "matrix" / "forgetting.npy").read_bytes()[:-8]
    ),
    "padded forgetting.npy": lambda run: (run / "matrix" / "forgetting.npy").write_bytes(
        (run / "matrix" / "forgetting.npy").read_bytes() + b"\0" * 8
    ),
    "truncated nll_before.npy": lambda run: (run / "matrix" / "nll_before.npy").write_bytes(b"\x93NUMPY"),
    "re-scored task": lambda run: write_scores(run, "addition", np.full(len(EXAMPLES), 9.0)),
    "re-scored base": lambda run: write_scores(run, "base", np.full(len(EXAMPLES), 0.5)),
    "index.json damaged": lambda run: (run / "matrix" / "index.json").write_text("{"),
}


@pytest.mark.parametrize("kind", list(REASSEMBLY_CASES))
def test_matrix_is_assembled_again_when_an_input_changed(tmp_path, capsys, synthetic_run, kind):
    run = tmp_path / "run"
    shutil.copytree(synthetic_run, run)
    REASSEMBLY_CASES[kind](run)
    code, err = run_cli(["matrix", str(run)], capsys)
    assert code == 0, err
    np.testing.assert_allclose(matrix_of(run), expected_matrix(run), atol=1e-6)
    index = json.loads((run / "matrix" / "index.json").read_text())
    assert index["tasks"] == list(TASKS) and index["examples"] == EXAMPLES
    # and an unchanged run is not assembled again
    stamp = (run / "matrix" / "forgetting.npy").stat().st_mtime_ns
    code, err = run_cli(["matrix", str(run)], capsys)
    assert code == 0 and (run / "matrix" / "forgetting.npy").stat().st_mtime_ns == stamp


def test_matrix_index_records_each_input_per_row(synthetic_run):
    """The index records, per model, the digests `_SUCCESS.json` holds, so that a changed row (a
    re-scored task) is told apart from a changed column set (other upstream examples)."""
    index = json.loads((synthetic_run / "matrix" / "index.json").read_text())
    inputs = index["inputs"]
    assert set(inputs["models"]) == {"base", *TASKS}
    assert inputs["score_settings"] == {"max_length": 64, "metric": "nll"}
    success = json.loads((synthetic_run / "scores" / "addition" / "_SUCCESS.json").read_text())
    row = inputs["models"]["addition"]
    assert (
        row["success_sha256"]
        == hashlib.sha256((synthetic_run / "scores" / "addition" / "_SUCCESS.json").read_bytes()).hexdigest()
    )
    for key in ("score_settings_sha256", "examples_sha256", "plan_sha256", "model_sha256"):
        assert row[key] == success["inputs"][key] and len(row[key]) == 64
    assert inputs["models"]["addition"]["model_sha256"] != inputs["models"]["uppercase"]["model_sha256"]


def test_a_run_directory_without_results_may_take_a_corrected_config(tmp_path):
    from forgetray import storage
    from forgetray.config import load_config
    from forgetray.pipeline.run import check_run_config
    from forgetray.rundir import RunDir

    paths = RunDir(str(tmp_path))
    storage.write_text(paths.config, load_config(None, ["finetune.learning_rate=5"]).to_yaml())
    corrected = load_config(None, ["finetune.learning_rate=0.001"])
    assert check_run_config(paths, corrected) is False  # no results: replace config and data
    (tmp_path / "scores" / "base").mkdir(parents=True)
    (tmp_path / "scores" / "base" / "part-00000.parquet").write_bytes(b"x")
    with pytest.raises(
        Exception,
        match=r"holds results \(scores\); finetune.learning_rate: this run measured its entries with "
        r"finetune.learning_rate=5.0, this config asks finetune.learning_rate=0.001; start a new run",
    ):
        check_run_config(paths, corrected)
    assert check_run_config(paths, load_config(None, ["finetune.learning_rate=5"])) is True
