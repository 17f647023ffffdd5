import pytest
from repo_paths import REPO

from forgetray.cli import main
from forgetray.config import ConfigError, RunConfig, config_from_dict, load_config


def test_defaults_are_the_builtin_run():
    config = load_config()
    assert config == RunConfig()
    assert config.model.is_builtin
    assert config.upstream.sources[0].path == "builtin"
    assert len(config.tasks.builtin) == 12


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "run_dir: runs/x\n"
        "upstream:\n  sources:\n    - {path: a.jsonl, format: instruction}\n    - {path: b.parquet}\n"
        "score: {shard_size: 32}\n"
    )
    config = load_config(
        path, ["score.max_batch_tokens=4096", "upstream.sources.1.limit=10", "tasks.builtin=[addition]"]
    )
    assert config.run_dir == "runs/x"
    assert config.score.shard_size == 32 and config.score.max_batch_tokens == 4096
    assert config.upstream.sources[0].format == "instruction"
    assert config.upstream.sources[1].limit == 10
    assert config.tasks.builtin == ("addition",)
    assert isinstance(config.upstream.sources, tuple)


def test_round_trip_through_yaml(tmp_path):
    config = load_config(None, ["score.shard_size=7", "model.dtype=bfloat16"])
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (
            "score:\n  shard_sise: 3\n",
            [],
            "c.yaml: score.shard_sise: unknown key; accepted keys here: max_length",
        ),
        ("score:\n  shard_size: many\n", [], "c.yaml: score.shard_size: expected int, got 'many'"),
        ("score:\n  shard_size: 0\n", [], "c.yaml: score.shard_size: must be a positive integer"),
        ("model:\n  dtype: float8\n", [], "model.dtype: expected one of 'float32', 'bfloat16', 'float16'"),
        ("model:\n  trust_remote_code: yes please\n", [], "model.trust_remote_code: expected true or false"),
        ("upstream:\n  sources:\n    - {format: text, pth: x}\n", [], "upstream.sources.0.pth: unknown key"),
        ("tasks:\n  sources:\n    - {path: t.jsonl}\n", [], "tasks.sources.0.name: required key is missing"),
        ("- 1\n- 2\n", [], "c.yaml: the top level must be a mapping"),
        ("score: [1\n", [], "c.yaml: not valid YAML"),
        ("", ["score.nope=1"], "c.yaml + command line: score.nope: unknown key"),
        ("", ["score.shard_size"], "override 'score.shard_size' is not of the form key.sub=value"),
        ("", ["upstream.sources.3.path=x"], "upstream.sources.3: no list item '3' to override"),
        (
            "",
            ["tracking.backend=neptune"],
            "tracking.backend: expected one of 'none', 'mlflow', 'tensorboard'",
        ),
        ("", ["tracking.log_every=0"], "tracking.log_every: must be a positive integer"),
        (
            "tracking: {backend: tensorboard, tracking_uri: 'file:/x'}\n",
            [],
            "c.yaml: tracking.tracking_uri: is for backend mlflow only (backend is 'tensorboard')",
        ),
        ("", ["tracking.wandb_mode=cloud"], "tracking.wandb_mode: expected one of 'offline', 'online'"),
    ],
)
def test_errors_name_file_and_key(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path, overrides)
    assert message in str(error.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: config file not found"):
        load_config(tmp_path / "nowhere.yaml")


def test_int_accepted_as_float_but_not_bool_as_int():
    config = config_from_dict({"score": {"cpus_per_actor": 2}})
    assert config.score.cpus_per_actor == 2.0 and isinstance(config.score.cpus_per_actor, float)
    with pytest.raises(ConfigError, match=r"score\.shard_size: expected int, got True"):
        config_from_dict({"score": {"shard_size": True}})


def test_cli_dry_run_prints_the_resolved_config(capsys, tmp_path):
    assert main(["run", "--dry-run", "--out", str(tmp_path / "r"), "score.shard_size=5"]) == 0
    printed = capsys.readouterr().out
    assert f"run_dir: {tmp_path / 'r'}" in printed
    assert "shard_size: 5" in printed
    assert not (tmp_path / "r").exists()


def test_cli_reports_config_errors(capsys):
    assert main(["run", "--dry-run", "score.shard_size=-1"]) == 2
    assert "score.shard_size: must be a positive integer" in capsys.readouterr().err


def test_shipped_default_config_is_the_builtin_default():
    from pathlib import Path

    assert load_config(Path(REPO) / "configs" / "default.yaml") == RunConfig()


def test_complete_protocol_and_split_keys_are_validated() -> None:
    from forgetray.config import LRF_COMPLETION_METHODS, CompleteConfig, ConfigError
    from forgetray.stats.lrf import LRF_METHODS

    assert LRF_COMPLETION_METHODS == LRF_METHODS
    assert CompleteConfig(protocol="lrf").method_names == LRF_METHODS
    assert CompleteConfig().method_names == ("global_mean", "additive", "knn", "als_mf")
    assert CompleteConfig(protocol="lrf", methods=("als_mf", "svd_sgd")).method_names == ("als_mf", "svd_sgd")
    for kwargs, key in [
        ({"protocol": "paper"}, "protocol"),
        ({"test_tasks": ("a",), "test_family": "f"}, "test_tasks"),
        ({"test_family": "f", "train_family": "f"}, "train_family"),
        ({"methods": ("svd",)}, "methods"),
        ({"exclude_tasks": ("a",)}, "exclude_tasks"),
        ({"test_tasks": ("a",), "exclude_tasks": ("a",)}, "exclude_tasks"),
    ]:
        with pytest.raises(ConfigError, match=key):
            CompleteConfig(**kwargs)
