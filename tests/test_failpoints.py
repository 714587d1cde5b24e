"""Failpoints (cyclemirror/failpoints.py): explicit, checked, and really reached.

Proves: only known names with sane seconds can be enabled (in process and on
the serve command line, which refuses a bad one with exit code 2); a
failpoint is off unless enabled and off again after its block; the apply
failpoint is passed once per applied record of a real mirror cycle.
"""

import os

import pytest

from cyclemirror import failpoints
from cyclemirror.errors import UsageError
from tests.support.daemons import run_cli
from tests.support.mirror import local_mirror


@pytest.mark.parametrize("name, seconds", [("no.such.point", 0.1), ("receiver.apply_record", -1),
                                           ("receiver.apply_record", 61),
                                           ("receiver.apply_record", True),
                                           ("receiver.apply_record", "0.1")])
def test_enable_refuses_unknown_names_and_bad_seconds(name, seconds):
    with pytest.raises(UsageError):
        failpoints.enable(name, seconds)
    assert failpoints.active() == {}


@pytest.mark.parametrize("spec", ["receiver.apply_record", "receiver.apply_record=x",
                                  "receiver.apply_record=nan", "nope=1",
                                  "receiver.apply_record=-0.5"])
def test_parse_spec_refuses_what_enable_would(spec):
    with pytest.raises(UsageError):
        failpoints.parse_spec(spec)


def test_parse_spec_reads_name_and_seconds():
    assert failpoints.parse_spec("receiver.apply_record=0.003") == ("receiver.apply_record", 0.003)


def test_serve_refuses_a_bad_failpoint_before_starting(tmp_path):
    proc = run_cli("serve", "--failpoint", "nope=1", store=str(tmp_path / "s"), check=False)
    assert proc.returncode == 2
    assert "unknown failpoint 'nope'" in proc.stderr
    assert not os.path.exists(tmp_path / "s")


def test_the_apply_failpoint_is_reached_once_per_record_and_only_while_enabled(tmp_path):
    with local_mirror(tmp_path, 1 << 20) as (vol, d):
        d.start()
        d.sync(60)  # cycle 1, a full copy: built as a new image, no records replayed
        failpoints.hit("receiver.apply_record")
        assert failpoints.hits("receiver.apply_record") == 0  # off: not even counted
        with failpoints.enabled("receiver.apply_record", 0):
            for i in range(3):
                vol.write(i * 65536, os.urandom(4096))  # three separate records
            d.sync(60)
            assert failpoints.hits("receiver.apply_record") == 3
        assert failpoints.active() == {}
