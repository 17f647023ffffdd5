"""Exact-match forgetting on Ray: the actor pool gives what the pure core gives, a re-run generates
only missing shards, and `forgetray exact-match` end to end on a shrunken built-in run."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import STUDY_RUN, STUDY_TASKS

from forgetray import storage
from forgetray.cli import main
from forgetray.config import ExactMatchConfig
from forgetray.models.loading import ModelRef

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model, tiny_tokenizer, tiny_model_dir):
    """The tiny GPT-2 as base and a noisy copy as a "fine-tuned" model, and 20 upstream examples."""
    import torch
    from conftest import TEXTS

    root = tmp_path_factory.mktemp("exact_match_models")
    noisy = type(tiny_model)(tiny_model.config)
    noisy.load_state_dict(tiny_model.state_dict())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=generator))
    noisy.save_pretrained(root / "noisy")
    tiny_tokenizer.save_pretrained(root / "noisy")
    rows = [
        {"example_id": f"u{i}", "kind": "text", "prompt": "", "response": f"{text} {i}"}
        for i, text in enumerate(TEXTS[:16])
    ] + [
        {"example_id": f"q{i}", "kind": "instruction", "prompt": text[:15], "response": text[15:30]}
        for i, text in enumerate(TEXTS[:4])
    ]
    upstream = str(root / "upstream.parquet")
    storage.write_parquet(upstream, pa.Table.from_pylist(rows))
    return {"base": ModelRef(tiny_model_dir), "noisy": ModelRef(str(root / "noisy"))}, upstream


def test_ray_scoring_matches_the_core_and_resumes_only_missing_shards(ray_session, models, tmp_path):
    from forgetray.models.loading import load_model
    from forgetray.score.driver import ScoreError, shard_plan
    from forgetray.studies.exact_match.metric import build_probes, exact_match
    from forgetray.studies.exact_match.scorer import read_exact_match, score_exact_match

    refs, upstream = models
    config = ExactMatchConfig(prompt_tokens=6, reference_tokens=3, shard_size=6, num_actors=1, max_length=64)
    root = str(tmp_path / "scores")
    first = score_exact_match(refs, upstream, root, config, progress=False)
    assert len(shard_plan(pq.read_table(upstream), 6)) == 4
    table = pq.read_table(upstream)
    rows = zip(
        *[table.column(c).to_pylist() for c in ("example_id", "kind", "prompt", "response")], strict=True
    )
    rows = list(rows)
    for name, ref in refs.items():
        model, tokenizer = load_model(ref)
        probes = build_probes(tokenizer, rows, 6, 3, config.max_new_tokens, 64)
        correct, answers, _ = exact_match(model, tokenizer, probes)
        got = read_exact_match(os.path.join(root, name)).to_pandas().set_index("example_id")
        assert got.loc[[r[0] for r in rows], "correct"].tolist() == correct.tolist()
        assert got.loc[[r[0] for r in rows], "answer"].tolist() == answers
        assert first[name]["accuracy"] == pytest.approx(float(correct.mean()))

    parts = sorted(
        os.path.join(root, name, f)
        for name in refs
        for f in os.listdir(os.path.join(root, name))
        if f.startswith("part")
    )
    stamps = {p: os.stat(p).st_mtime_ns for p in parts}
    before = read_exact_match(os.path.join(root, "noisy")).sort_by("example_id")
    missing = os.path.join(root, "noisy", "part-00002.parquet")
    os.unlink(missing)
    os.unlink(os.path.join(root, "noisy", "_SUCCESS.json"))
    lines: list[str] = []
    again = score_exact_match(refs, upstream, root, config, log=lines.append, progress=False)
    assert any("exact_match/scores/base: already complete, skipped" in line for line in lines)
    assert any("1 shard(s) of 1 model(s)" in line for line in lines)
    assert {p for p in parts if os.stat(p).st_mtime_ns != stamps[p]} == {missing}
    assert read_exact_match(os.path.join(root, "noisy")).sort_by("example_id").equals(before)
    assert again["noisy"]["accuracy"] == first["noisy"]["accuracy"]

    changed = dataclasses.replace(config, reference_tokens=4)
    with pytest.raises(ScoreError, match="other settings"):
        score_exact_match(refs, upstream, root, changed, progress=False)
    os.unlink(os.path.join(root, "noisy", "_SUCCESS.json"))
    with pytest.raises(ScoreError, match="changed: reference_tokens"):
        score_exact_match({"noisy": refs["noisy"]}, upstream, root, changed, progress=False)


TASKS = list(STUDY_TASKS)


@pytest.fixture
def run_dir(tiny_run, tmp_path):
    """A private copy of the study run (80 upstream examples, 3 revealed per task), shared with replay."""
    return tiny_run.copy(tmp_path, *STUDY_RUN)


def test_exact_match_command_writes_matrix_completion_and_report(run_dir):
    args = ["exact_match.reference_tokens=1", "exact_match.prompt_tokens=16", "exact_match.shard_size=16"]
    assert main(["exact-match", run_dir, "--no-progress", *args]) == 0
    em = os.path.join(run_dir, "exact_match")
    y = np.load(os.path.join(em, "matrix", "forgetting.npy"), allow_pickle=False)
    correct = np.load(os.path.join(em, "matrix", "correct_after.npy"), allow_pickle=False)
    base = np.load(os.path.join(em, "matrix", "base_correct.npy"), allow_pickle=False).astype(bool)
    index = json.load(open(os.path.join(em, "matrix", "index.json")))
    assert y.shape == correct.shape == (3, 80) and y.dtype == np.uint8 and index["tasks"] == TASKS
    assert (
        index["examples"]
        == pq.read_table(os.path.join(run_dir, "data", "upstream.parquet")).column("example_id").to_pylist()
    )
    np.testing.assert_array_equal(y, base[None, :] & ~correct.astype(bool))
    summary = json.load(open(os.path.join(em, "summary.json")))
    assert summary["n_eligible"] == int(base.sum()) > 3
    assert summary["base_accuracy"] == pytest.approx(base.mean())
    assert summary["settings"]["reference_tokens"] == 1
    completion = json.load(open(os.path.join(em, "completion.json")))
    assert completion["n_eligible"] == summary["n_eligible"] and completion["revealed_k"] == 3
    assert {"logistic_mf", "additive", "als_mf"} <= set(completion)
    assert len(completion["logistic_mf"]["rmse_per_seed"]) == 2
    report = open(os.path.join(run_dir, "report.html")).read()
    assert "Exact-match forgetting (binary)" in report and "exact match" in report
    assert "NLL forgetting &gt;" in report  # the continuous matrix's binary results beside it

    stamp = os.stat(os.path.join(em, "matrix", "forgetting.npy")).st_mtime_ns
    assert main(["exact-match", run_dir, "--no-progress", *args]) == 0  # resumes: nothing regenerated
    assert os.stat(os.path.join(em, "matrix", "forgetting.npy")).st_mtime_ns == stamp
    log = open(os.path.join(run_dir, "logs", "forgetray.log")).read()
    assert "exact_match/scores/rot13: already complete, skipped" in log
