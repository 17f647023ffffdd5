"""A process that works in several run directories writes each one's log only while it works there."""

from __future__ import annotations

from forgetray.pipeline.run import setup_logging
from forgetray.rundir import RunDir


def test_each_run_directory_gets_only_its_own_lines(tmp_path):
    first, second = RunDir(str(tmp_path / "a")), RunDir(str(tmp_path / "b"))
    setup_logging(first)("line for a")
    setup_logging(second)("line for b")
    setup_logging(first)("again for a")
    setup_logging(None)("no run directory")
    a = open(first.log).read()
    b = open(second.log).read()
    assert "line for a" in a and "again for a" in a and "line for b" not in a
    assert "line for b" in b and "again for a" not in b
    assert "no run directory" in a  # the run worked in last keeps its log until another one starts
