"""URI run directories: the node-local cache, atomic per-file upload, resume by download, locations
for workers; on file://, memory:// and a local S3-compatible server (moto) on loopback."""

import os
import socket

import pytest

from forgetray import rundir
from forgetray.cluster import nodes_missing_marker
from forgetray.rundir import RunDir, RunDirError, filesystem, is_uri


def test_uris_and_paths_are_told_apart():
    assert is_uri("s3://bucket/runs/x") and is_uri("gs://b/r") and is_uri("file:///tmp/x")
    assert not is_uri("runs/x") and not is_uri("/abs/runs") and not is_uri("C:/x")


def test_nodes_that_cannot_see_the_marker_are_named():
    assert nodes_missing_marker({"10.0.0.1 (a)": True, "10.0.0.2 (b)": False, "10.0.0.3 (c)": False}) == [
        "10.0.0.2 (b)",
        "10.0.0.3 (c)",
    ]
    assert nodes_missing_marker({"10.0.0.1 (a)": True}) == []


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def read_remote(run, relative):
    return rundir.read_bytes(run.locate(relative)).decode()


def roundtrip(uri, tmp_path):
    run = RunDir(uri, cache_dir=str(tmp_path / "cache-a"))
    assert run.pull() == 0 and rundir.list_files(run.location) == {}
    write(run.config, "seed: 0\n")
    write(os.path.join(run.model_scores("base"), "part-00000.parquet"), "x" * 1000)
    write(os.path.join(run.model_scores("base"), ".part-00001.parquet.tmp.parquet"), "half-written")
    assert run.push() == 2
    assert rundir.list_files(run.location) == {"config.yaml": 8, "scores/base/part-00000.parquet": 1000}
    assert run.push() == 0  # nothing changed, nothing uploaded
    write(run.config, "seed: 1\n")
    assert run.push() == 1 and read_remote(run, "config.yaml") == "seed: 1\n"

    # A worker writes straight to the URI; the driver fetches it, and does not push it back.
    rundir.write_json(run.locate("checkpoints", "addition.json"), {"steps": 3})
    assert run.pull_path(run.path("checkpoints")) == 1 and run.push() == 0
    assert rundir.read_json(run.pointer("addition")) == {"steps": 3}

    # Another machine (or a lost cache) resumes from the URI.
    other = RunDir(uri, cache_dir=str(tmp_path / "cache-b"))
    assert other.root != run.root
    assert other.pull() == 3
    with open(os.path.join(other.model_scores("base"), "part-00000.parquet")) as f:
        assert f.read() == "x" * 1000
    assert not os.path.exists(os.path.join(other.model_scores("base"), ".part-00001.parquet.tmp.parquet"))
    assert other.push() == 0 and other.pull() == 0

    # A file deleted at the URI does not come back from a cache that still holds it.
    fs, inner = filesystem(run.locate("checkpoints", "addition.json"))
    fs.delete_file(inner)
    with other.synced(sync_seconds=3600):
        assert not os.path.exists(other.pointer("addition"))
    assert not rundir.exists(run.locate("checkpoints", "addition.json"))

    # A worker on a node that shares nothing gets a copy of a location in its own cache.
    copy = rundir.local_copy(run.locate("scores", "base"), cache_dir=str(tmp_path / "node-cache"))
    assert open(os.path.join(copy, "part-00000.parquet")).read() == "x" * 1000


def test_file_uri_roundtrip(tmp_path):
    uri = f"file://{tmp_path}/bucket/runs/x"
    roundtrip(uri, tmp_path)
    # No temporary upload names are left at the destination.
    names = [n for _, _, files in os.walk(tmp_path / "bucket") for n in files]
    assert sorted(names) == ["config.yaml", "part-00000.parquet"]


def test_synced_pushes_on_exit_even_after_an_error(tmp_path):
    uri = f"file://{tmp_path}/remote/run"
    run = RunDir(uri, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="stage failed"), run.synced(sync_seconds=3600):
        write(run.upstream, "done before the failure")
        raise RuntimeError("stage failed")
    with open(tmp_path / "remote" / "run" / "data" / "upstream.parquet") as f:
        assert f.read() == "done before the failure"


@pytest.fixture
def s3_endpoint(monkeypatch):
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop()


@pytest.mark.slow
def test_s3_roundtrip_on_a_local_s3_server(s3_endpoint, tmp_path):
    uri = f"s3://forgetray-test/runs/x?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    from pyarrow.fs import S3FileSystem

    S3FileSystem(
        endpoint_override=s3_endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True
    ).create_dir("forgetray-test")
    assert type(filesystem(uri)[0]).__name__ == "S3FileSystem"
    roundtrip(uri, tmp_path)


def test_any_fsspec_filesystem_through_pyarrow(tmp_path):
    # memory:// is not one of pyarrow's own schemes: it goes through fsspec's in-memory filesystem.
    uri = f"memory://forgetray-test/{tmp_path.name}/run"
    assert type(filesystem(uri)[0]).__name__ == "PyFileSystem"
    roundtrip(uri, tmp_path)


def test_uploads_never_follow_a_symlink_out_of_the_run(tmp_path):
    """A symlink planted in the cache that points outside it (here at a secret file) is not
    uploaded; one that points inside the run is."""
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    local = tmp_path / "staging"
    (local / "scores").mkdir(parents=True)
    (local / "config.yaml").write_text("seed: 0\n")
    (local / "scores" / "leak.txt").symlink_to(secret)
    (local / "scores" / "alias.yaml").symlink_to(local / "config.yaml")
    run = RunDir(f"file://{tmp_path}/bucket/run", cache_dir=str(tmp_path / "cache"))
    os.makedirs(os.path.dirname(run.root), exist_ok=True)
    os.rename(local, run.root)
    (tmp_path / "cache" / "rundirs" / os.path.basename(run.root) / "scores" / "alias.yaml").unlink()
    (tmp_path / "cache" / "rundirs" / os.path.basename(run.root) / "scores" / "alias.yaml").symlink_to(
        run.config
    )
    assert run.push() == 2
    uploaded = sorted(
        os.path.relpath(os.path.join(d, n), tmp_path / "bucket" / "run")
        for d, _, names in os.walk(tmp_path / "bucket" / "run")
        for n in names
    )
    assert uploaded == ["config.yaml", "scores/alias.yaml"]


def test_a_remote_name_that_leads_outside_the_cache_is_refused(tmp_path, monkeypatch):
    run = RunDir(f"file://{tmp_path}/bucket/run", cache_dir=str(tmp_path / "cache"))
    real = rundir.list_files
    monkeypatch.setattr(  # an object key with '..' in it
        rundir, "list_files", lambda where: {"../outside.txt": 3} if rundir.is_uri(where) else real(where)
    )
    with pytest.raises(RunDirError, match=r"outside.txt: this name leads outside the run directory"):
        run.pull()
    assert not (tmp_path / "cache" / "rundirs" / "outside.txt").exists()


def test_layout_paths_and_locations(tmp_path):
    local = RunDir(str(tmp_path / "run"))
    assert local.root == local.location == str(tmp_path / "run")
    assert local.pointer("addition") == str(tmp_path / "run" / "checkpoints" / "addition.json")
    assert local.locate_path(local.task("addition")) == local.task("addition")
    remote = RunDir("s3://bucket/runs/x/", cache_dir=str(tmp_path / "cache"))
    assert remote.location == "s3://bucket/runs/x" and remote.root.startswith(str(tmp_path / "cache"))
    assert remote.locate_path(remote.task("addition")) == "s3://bucket/runs/x/data/tasks/addition.parquet"
    assert remote.locate_path(remote.root) == "s3://bucket/runs/x"
    with pytest.raises(ValueError, match="not inside the run directory"):
        remote.locate_path(str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="run_dir: empty"):
        RunDir("")


def test_require_matrix_names_the_run_and_what_to_run(tmp_path):
    with pytest.raises(rundir.NoMatrixError, match=r"no forgetting matrix yet.*forgetray run --out"):
        RunDir(str(tmp_path)).require_matrix()


def test_an_unwritable_store_is_named_with_the_operation(tmp_path):
    (tmp_path / "not-a-directory").write_text("a file where the bucket should be")
    run = RunDir(f"file://{tmp_path}/not-a-directory/run", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(RunDirError, match=r"not-a-directory/run/.forgetray-write-check-\w+: cannot write"):
        run.check_writable()


def test_a_study_folder_is_a_run_directory_that_pushes_the_whole_run(tmp_path):
    run = RunDir(f"file://{tmp_path}/bucket/run", cache_dir=str(tmp_path / "cache"))
    replay = run.sub("replay")
    assert replay.location == f"file://{tmp_path}/bucket/run/replay" and replay.top is run
    assert replay.root == run.study("replay") and replay.pointer("t") == run.path(
        "replay", "checkpoints", "t.json"
    )
    write(run.config, "seed: 0\n")
    write(replay.task("t"), "table")
    assert replay.locate_path(run.task("t")) == f"file://{tmp_path}/bucket/run/data/tasks/t.parquet"
    assert replay.push() == 2  # the run's files too: a study's workers may read any of them
    assert rundir.list_files(run.location) == {"config.yaml": 8, "replay/data/tasks/t.parquet": 5}
    rundir.write_json(replay.locate("checkpoints", "t.json"), {"steps": 1})
    assert replay.pull_path(replay.path("checkpoints")) == 1 and run.push() == 0
    assert RunDir(str(tmp_path / "local")).sub("iv", "guided").location == str(
        tmp_path / "local" / "iv" / "guided"
    )
