"""jobs/*.py: one thin Ray job per main command, and the working dir a submission uploads."""

import ast
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = {
    "run": "run",
    "analyse": "analyse",
    "complete": "complete",
    "report": "report",
    "replay": "replay",
    "sweep": "sweep",
    "exact_match": "exact-match",
    "forecast": "forecast",
}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_job_is_a_thin_entry_point_with_its_submit_line(job):
    path = os.path.join(REPO, "jobs", f"{job}.py")
    source = open(path).read()
    tree = ast.parse(source)
    assert f"ray job submit --working-dir . -- python jobs/{job}.py" in ast.get_docstring(tree)
    # It joins the cluster, then hands its arguments to the one CLI subcommand.
    assert "join_cluster(sys.argv[1:])" in source
    assert f'main(["{JOBS[job]}", *sys.argv[1:]])' in source
    assert len(source.splitlines()) < 25


def test_run_job_dry_run_prints_the_resolved_config_without_starting_ray():
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run(
        [sys.executable, "jobs/run.py", "score.shard_size=64", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "shard_size: 64" in out.stdout and "run_dir: runs/default" in out.stdout


def package(directory, out):
    """The zip `ray job submit --working-dir` would upload, built by Ray's own packaging code."""
    from ray._private.runtime_env.packaging import _zip_files

    _zip_files(str(directory), [], str(out), include_gitignore=True)
    return zipfile.ZipFile(out).namelist(), os.path.getsize(out)


def test_working_dir_upload_leaves_runs_caches_and_checkpoints_out(tmp_path):
    tree = tmp_path / "repo"
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in [*tracked, ".rayignore", ".gitignore"]:
        if os.path.isfile(os.path.join(REPO, name)):
            os.makedirs(os.path.dirname(tree / name), exist_ok=True)
            shutil.copy(os.path.join(REPO, name), tree / name)
    junk = [
        "runs/demo/matrix/forgetting.npy",
        "runs/demo/train/addition/checkpoint_000000/model/model.safetensors",
        ".cache/forgetray/builtin/abc/model.safetensors",
        ".venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so",
        "checkpoints/addition/model.safetensors",
        "forgetray/__pycache__/cli.cpython-311.pyc",
    ]
    for name in junk:
        os.makedirs(os.path.dirname(tree / name), exist_ok=True)
        (tree / name).write_bytes(os.urandom(256 * 1024))
    names, size = package(tree, tmp_path / "pkg.zip")
    assert not [n for n in names if n.startswith(("runs/", ".cache/", ".venv/", "checkpoints/"))]
    assert not [n for n in names if "__pycache__" in n]
    assert "forgetray/cli.py" in names and "jobs/run.py" in names and "configs/default.yaml" in names
    assert size < 2 * 1024**2


def test_this_checkout_uploads_small(tmp_path):
    names, size = package(REPO, tmp_path / "pkg.zip")
    assert "forgetray/pipeline/run.py" in names
    assert size < 5 * 1024**2, f"{size} bytes: add what grew to .rayignore"
