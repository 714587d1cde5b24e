"""Role records and lineage checks: the file format is checked like the other state files,
and a target adopts a source's generation only when the two provably share a cycle."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclemirror.errors import DemotedError, IntegrityError, ProtocolError
from cyclemirror.receiver import lineage
from cyclemirror.receiver.mirror import Mirror
from cyclemirror.receiver.state import VolumeSpec
from cyclemirror.store import roles

E1, E2, E3 = "1" * 16, "2" * 16, "3" * 16


def _record(**kw) -> roles.RoleRecord:
    base = dict(volume="v", role=roles.PRIMARY, epoch=E1, changed=1.0)
    base.update(kw)
    return roles.RoleRecord(**base)


def test_a_role_record_round_trips_and_a_damaged_one_is_named(tmp_path):
    store = str(tmp_path)
    rec = _record(parent=f"{E2}:7", promoted_from={
        "source_node": "abc", "source_name": "hosta", "mirror": "v", "generation": f"{E2}:7",
        "cycle": 7, "freeze_time": 5.0, "forced": True, "time": 6.0})
    roles.save_role(store, rec)
    assert roles.load_role(store, "v") == rec
    assert roles.promoted_from(store, "abc", "v") == rec
    assert roles.promoted_from(store, "abc", "w") is None
    path = roles.role_path(store, "v")
    doc = json.loads(open(path).read())
    doc["body"]["role"] = "secondary"  # edited by hand: the checksum catches it
    open(path, "w").write(json.dumps(doc))
    with pytest.raises(IntegrityError, match="checksum"):
        roles.load_role(store, "v")
    records, problems = roles.all_roles(store)
    assert records == [] and len(problems) == 1 and path in problems[0]


@pytest.mark.parametrize("field, value", [
    ("role", "boss"), ("epoch", "xyz"), ("parent", "nope"), ("parent", f"{E1}:-1"),
    ("demoted", {"by": "x"}), ("kept", [{"path": "p"}]), ("volume", "../etc"),
])
def test_a_role_record_with_a_bad_field_is_refused(tmp_path, field, value):
    rec = _record()
    setattr(rec, field, value)
    with pytest.raises(IntegrityError):
        roles.RoleRecord.from_bytes(rec.to_bytes(), "test")


def _mirror(tmp_path, applied: int, epoch: str | None) -> Mirror:
    m = Mirror.open(str(tmp_path), "srcnode", "hosta", "v", False,
                    [VolumeSpec("v", 1 << 20, 4096)], 1 << 20)
    if applied:
        with open(m.image_path(0), "wb") as f:
            f.truncate(1 << 20)
        m.state.applied_cycle = applied
    if epoch:
        m.state.extra[lineage.LINEAGE_KEY] = {"epoch": epoch, "parent": None, "since": 1.0}
    m._save()
    return m


def _msg(epoch: str, parent: str = "") -> dict:
    return lineage.check_lineage_message({"epoch": epoch, "parent": parent,
                                          "parent_freeze_time": 0.0, "written_blocks": 0,
                                          "discard_on": ""})


def test_a_new_image_takes_the_sources_epoch(tmp_path):
    m = _mirror(tmp_path, 0, None)
    lineage.adopt(m, _msg(E1), "hosta")
    assert lineage.recorded(m.state)["epoch"] == E1
    assert lineage.generation_of(m.state) == f"{E1}:0"


def test_a_source_that_branched_from_this_very_image_continues_as_a_delta(tmp_path):
    m = _mirror(tmp_path, 7, E1)
    lineage.adopt(m, _msg(E2, f"{E1}:7"), "hostb")
    assert lineage.recorded(m.state) == {"epoch": E2, "parent": f"{E1}:7",
                                         "since": lineage.recorded(m.state)["since"]}
    assert m.state.applied_cycle == 7 and m.has_image


@pytest.mark.parametrize("epoch, parent", [
    (E2, ""),             # another lineage altogether
    (E2, f"{E1}:5"),      # branched from a cycle this image has moved past
    (E2, f"{E3}:7"),      # branched from a generation this image never held
])
def test_a_source_lying_about_its_lineage_is_refused_and_nothing_changes(tmp_path, epoch,
                                                                         parent):
    m = _mirror(tmp_path, 7, E1)
    before = open(m.state_path, "rb").read()
    with pytest.raises(ProtocolError, match=f"holds generation {E1}:7"):
        lineage.adopt(m, _msg(epoch, parent), "liar")
    assert open(m.state_path, "rb").read() == before


@pytest.mark.parametrize("field, value", [
    ("epoch", "ABC"), ("parent", "x:1"), ("discard_on", "a/b"),
])
def test_a_malformed_lineage_message_is_a_protocol_error(field, value):
    msg = {"epoch": E1, "parent": "", "parent_freeze_time": 0.0, "written_blocks": 0,
           "discard_on": ""}
    msg[field] = value
    with pytest.raises(ProtocolError):
        lineage.check_lineage_message(msg)


def test_a_promoted_mirror_refuses_its_old_source(tmp_path):
    roles.save_role(str(tmp_path), _record(promoted_from={
        "source_node": "srcnode", "source_name": "hosta", "mirror": "v",
        "generation": f"{E2}:7", "cycle": 7, "freeze_time": 5.0, "forced": True,
        "time": 6.0}))
    with pytest.raises(DemotedError, match="demoted"):
        lineage.refuse_if_promoted(str(tmp_path), "me", "hostb", "srcnode", "hosta", "v")
    lineage.refuse_if_promoted(str(tmp_path), "me", "hostb", "othernode", "hostc", "v")
    assert not os.path.exists(os.path.join(tmp_path, "mirrors", "srcnode", "v.state.json"))


# -- a consistency group's members share one history ---------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([None, E1, E2, E3]), min_size=1, max_size=5))
def test_group_members_end_up_in_one_epoch_that_most_of_them_held(tmp_path_factory, held):
    store = str(tmp_path_factory.mktemp("g"))
    names = [f"m{i}" for i in range(len(held))]
    for name, epoch in zip(names, held, strict=True):
        if epoch is not None:
            roles.save_role(store, _record(volume=name, epoch=epoch,
                                           kept=[] if epoch != E3 else [{
                                               "path": "/k", "blocks": 1, "bytes": 4096,
                                               "generation": f"{E3}:1", "time": 1.0}]))
    recs = roles.group_records(store, names, 2.0)
    epochs = {r.epoch for r in recs}
    assert len(epochs) == 1 and [r.volume for r in recs] == names
    counts = {e: held.count(e) for e in held if e is not None}
    if counts:  # the most held epoch (ties: the first member's in name order) is kept
        best = max(counts.values())
        assert epochs == {next(e for e in held if counts.get(e) == best)}
    for rec in recs:
        assert roles.load_role(store, rec.volume) == rec  # what it says is what is stored
        assert rec.role == roles.PRIMARY and rec.parent is None
        assert bool(rec.kept) == (held[names.index(rec.volume)] == E3)  # history kept
    assert roles.group_records(store, names, 3.0) == recs  # stable: nothing changes again


def test_group_members_promoted_from_different_branches_are_refused(tmp_path):
    store = str(tmp_path)
    roles.save_role(store, _record(volume="a", epoch=E1, parent=f"{E3}:4"))
    roles.save_role(store, _record(volume="b", epoch=E2, parent=f"{E3}:5"))
    roles.save_role(store, _record(volume="c", epoch=E3))
    with pytest.raises(IntegrityError, match="different branches"):
        roles.group_records(store, ["a", "b", "c"], 2.0)
    assert roles.load_role(store, "c").epoch == E3  # nothing changed
    # One promoted branch: the others (an original primary that joined) take it.
    roles.save_role(store, _record(volume="b", epoch=E1, parent=f"{E3}:4"))
    recs = roles.group_records(store, ["a", "b", "c"], 2.0)
    assert {(r.epoch, r.parent) for r in recs} == {(E1, f"{E3}:4")}
