import os

import numpy as np
import pyarrow as pa
import pytest

from forgetray.matrix import MatrixError, assemble_forgetting_matrix, load_forgetting_matrix

EXAMPLES = ["doc/a/0", "doc/b/0", "code/x/f", "code/y/C"]
BEFORE = np.array([2.0, 3.0, 1.5, 4.0])


def scores(nll, order=(0, 1, 2, 3)):
    """A model's score table with rows in a scrambled order, as shards deliver them."""
    order = list(order)
    return pa.table(
        {
            "example_id": [EXAMPLES[j] for j in order],
            "nll": np.asarray(nll, dtype=np.float64)[order],
            "n_tokens": np.full(len(order), 10, dtype=np.int64),
        }
    )


AFTER = {"addition": BEFORE + [0.5, 0.0, -0.25, 1.0], "rot13": BEFORE + [0.0, 2.0, 0.125, 0.0]}


def assemble(out, tasks=("addition", "rot13"), log=None):
    return assemble_forgetting_matrix(
        str(out),
        EXAMPLES,
        scores(BEFORE, (3, 1, 0, 2)),
        [(t, lambda t=t: scores(AFTER[t], (2, 0, 3, 1))) for t in tasks],
        log=log or (lambda _: None),
    )


def test_matrix_is_after_minus_before_in_index_order(tmp_path):
    assert assemble(tmp_path)
    z, index = load_forgetting_matrix(str(tmp_path))
    assert index == {"tasks": ["addition", "rot13"], "examples": EXAMPLES}
    assert z.dtype == np.float32 and z.shape == (2, 4)
    np.testing.assert_array_equal(z, [[0.5, 0.0, -0.25, 1.0], [0.0, 2.0, 0.125, 0.0]])
    np.testing.assert_array_equal(np.load(tmp_path / "nll_before.npy", allow_pickle=False), BEFORE)
    assert sorted(os.listdir(tmp_path)) == ["forgetting.npy", "index.json", "nll_before.npy"]


def test_rerun_skips_and_new_task_rebuilds(tmp_path):
    assert assemble(tmp_path, ("addition",))
    stamp = os.stat(tmp_path / "forgetting.npy").st_mtime_ns
    messages = []
    assert not assemble(tmp_path, ("addition",), log=messages.append)
    assert "already assembled, skipped" in messages[0]
    assert os.stat(tmp_path / "forgetting.npy").st_mtime_ns == stamp
    assert assemble(tmp_path, ("addition", "rot13"))
    assert load_forgetting_matrix(str(tmp_path), mmap=True)[0].shape == (2, 4)


def test_missing_scores_name_the_model_and_leave_no_matrix(tmp_path):
    partial = scores(AFTER["rot13"]).slice(0, 3)
    with pytest.raises(
        MatrixError, match=r"scores of 'rot13': 1 upstream examples have no score, e.g. \['code/y/C'\]"
    ):
        assemble_forgetting_matrix(
            str(tmp_path),
            EXAMPLES,
            scores(BEFORE),
            [("addition", lambda: scores(AFTER["addition"])), ("rot13", lambda: partial)],
        )
    assert not (tmp_path / "forgetting.npy").exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".npy") and "tmp" in f]


def test_duplicate_and_extra_scores_are_errors(tmp_path):
    doubled = pa.concat_tables([scores(BEFORE), scores(BEFORE).slice(0, 1)])
    with pytest.raises(MatrixError, match=r"scores of 'base': example 'doc/a/0' is scored more than once"):
        assemble_forgetting_matrix(str(tmp_path), EXAMPLES, doubled, [])
    with pytest.raises(MatrixError, match=r"scores of 'base': 4 scored examples but the upstream set has 3"):
        assemble_forgetting_matrix(str(tmp_path), EXAMPLES[:3], scores(BEFORE), [])


def test_written_files_get_the_usual_permissions(tmp_path):
    assemble(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "forgetting.npy").st_mode & 0o777 == 0o666 & ~umask
