"""The service's assembly of per-image messages into grids and groups, against
the core's direct answer, in any order, with duplicates; every row of the
failure table that is about messages (docs/wire-format.md §2)."""

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zocalo_xrc as zx
from zocalo_xrc.service.assembly import Assembly, Fate, GroupRejected, MessageRejected, PiaMessage, centre
from zocalo_xrc.service.recipe import Envelope

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CASE_3D = json.loads((EXAMPLES / "scan3d.json").read_text())
CASE_2D = json.loads((EXAMPLES / "scan2d.json").read_text())


def pia(dcid, others, gridinfo, file_number, spots, **kwargs):
    """A per-image message as the GPU or CPU spot finder's recipe step sends it, read."""
    return PiaMessage.from_envelope(Envelope.parse(json.dumps(pia_body(dcid, others, gridinfo, file_number, spots,
                                                                       **kwargs))))


def pia_body(dcid, others, gridinfo, file_number, spots, *, experiment_type=None, sample_id=None, payload=None,
             **params):
    """The envelope of a per-image message, as a dict."""
    step = {"service": "DLS X-Ray Centering", "queue": "reduce.xray_centering.gpu", "gridinfo": gridinfo,
            "parameters": {"dcid": str(dcid), "dcg_dcids": others,
                           "experiment_type": experiment_type or ("Mesh3D" if others else "Mesh"),
                           "beamline": "i03", "sample_id": sample_id, **params},
            "output": {"success": 3, "abort": 4}}
    body = {"environment": {"ID": f"env-{dcid}"}, "recipe-path": [1], "recipe-pointer": 2,
            "recipe": {"2": step, "3": {"queue": "xrc.i03", "exchange": "results"}, "4": {"queue": "xrc.abort"},
                       "start": [[1, []]]},
            "payload": payload if payload is not None else {"file-number": file_number, "n_spots_total": spots,
                                                            "file-seen-at": 1732380000.0 + file_number}}
    return body


def messages_3d(case=CASE_3D):
    a, b = case["grids"]
    out = []
    for g, other in ((a, b), (b, a)):
        for k, n in enumerate(g["counts"], 1):
            out.append(pia(g["dcid"], [other["dcid"]], g["gridinfo"], k, n, sample_id=case["sample_id"]))
    return out


def direct_3d(case=CASE_3D):
    scans = [zx.GridScan(g["dcid"], g["counts"], zx.GridInfo.from_ispyb(g["gridinfo"])) for g in case["grids"]]
    return zx.centre_3d_scans(*scans, sample_id=case["sample_id"])


def feed(assembly, messages):
    """Add every message; their fates, and the last one's group."""
    fates, last = [], None
    for m in messages:
        fate, last = assembly.add(m)
        fates.append(fate)
    return fates, last


@settings(max_examples=25, deadline=None)
@given(order=st.permutations(range(440)), duplicates=st.lists(st.integers(0, 439), max_size=30))
def test_any_order_and_duplicates_give_the_direct_answer(order, duplicates):
    """GPU spot finding sends images out of order, and a redelivery sends one twice."""
    messages = messages_3d()
    stream = [messages[i] for i in order]
    for d in duplicates:  # a duplicate anywhere after its original
        stream.insert(stream.index(messages[d]) + 1, messages[d])
    assembly = Assembly()
    fates, group = feed(assembly, stream)
    assert fates.count(Fate.COMPLETE) == 1
    assert fates.count(Fate.DUPLICATE) == len(duplicates)
    assert centre(group) == direct_3d()



@settings(max_examples=25, deadline=None)
@given(order=st.permutations(range(440)), gaps=st.sets(st.integers(0, 439), min_size=1, max_size=40))
def test_gaps_never_complete_and_name_what_is_missing(order, gaps):
    """Images that never come (PIA failed on them): the group never completes,
    and it can say exactly which are missing, grid by grid."""
    messages = messages_3d()
    assembly = Assembly()
    fates, group = feed(assembly, [messages[i] for i in order if i not in gaps])
    assert Fate.COMPLETE not in fates and not group.complete
    expected = {}
    for i in sorted(gaps):
        expected.setdefault(messages[i].dcid, []).append(messages[i].file_number)
    for dcid, numbers in expected.items():
        shown = ", ".join(map(str, numbers[:20])) + (f" and {len(numbers) - 20} more" if len(numbers) > 20 else "")
        assert f"DCID {dcid}: images {shown}" in group.missing()
    if len(expected) == 1:
        assert ";" not in group.missing()

def test_2d():
    gi = CASE_2D["gridinfo"]
    assembly = Assembly()
    n = len(CASE_2D["counts"])
    fates, group = feed(assembly, [pia(7, None, gi, k, c, sample_id=CASE_2D["sample_id"])
                                   for k, c in reversed(list(enumerate(CASE_2D["counts"], 1)))])
    assert fates == [Fate.ADDED] * (n - 1) + [Fate.COMPLETE]
    assert centre(group) == zx.centre_2d(CASE_2D["counts"], zx.GridInfo.from_ispyb(gi), sample_id=CASE_2D["sample_id"])
    assert group.newest_seen_at == 1732380000.0 + n


def test_a_duplicate_never_completes_a_grid_early():
    """Diamond's service counted messages: one duplicate completed the grid an
    image early, centring on uninitialised memory."""
    messages = messages_3d()
    assembly = Assembly()
    fates, group = feed(assembly, messages[:-1] + [messages[0]])
    assert Fate.COMPLETE not in fates and fates[-1] is Fate.DUPLICATE
    assert group.missing() == f"DCID {messages[-1].dcid}: images 200"
    assert feed(assembly, messages[-1:])[0] == [Fate.COMPLETE]


def test_a_duplicate_after_one_grid_completed_still_completes():
    messages = messages_3d()
    xy, xz = messages[:240], messages[240:]
    assembly = Assembly()
    fates, group = feed(assembly, xy + [xy[5]] + xz)
    assert fates[-1] is Fate.COMPLETE and centre(group) == direct_3d()


@pytest.mark.parametrize("change, words", [
    ({"file_number": 241}, "image 241 is out of range 1..240"),
    ({"file_number": 0}, "payload.file-number: expected a whole number of at least 1, got 0"),
    ({"spots": -1}, "payload.n_spots_total: expected a whole number of at least 0, got -1"),
    ({"spots": 1.5}, "got 1.5"),
    ({"payload": [1, 2]}, "payload: expected an object, got list"),
    ({"gridinfo": None}, "no gridinfo"),
    ({"gridinfo": {"steps_x": 20}}, "gridinfo: missing key"),
])
def test_bad_messages_are_rejected_and_the_scan_goes_on(change, words):
    a, b = CASE_3D["grids"]
    good = messages_3d()
    assembly = Assembly()
    feed(assembly, good[:10])
    kwargs = {"file_number": 11, "spots": 3, "gridinfo": a["gridinfo"]}
    kwargs.update(change)
    # a grid's first message brings its gridinfo: a bad one is tried on the xz grid, not started yet
    this, other = (b, a) if "gridinfo" in change else (a, b)
    with pytest.raises(MessageRejected, match=re.escape(words)):
        assembly.add(pia(this["dcid"], [other["dcid"]], kwargs.pop("gridinfo"), kwargs.pop("file_number"),
                         kwargs.pop("spots"), sample_id=CASE_3D["sample_id"], **kwargs))
    fates, group = feed(assembly, good[10:])
    assert fates[-1] is Fate.COMPLETE and centre(group) == direct_3d()


def test_a_changed_gridinfo_is_rejected():
    a, b = CASE_3D["grids"]
    assembly = Assembly()
    feed(assembly, messages_3d()[:3])
    with pytest.raises(MessageRejected, match="gridinfo differs"):
        assembly.add(pia(a["dcid"], [b["dcid"]], {**a["gridinfo"], "dx_mm": 0.03}, 4, 1))


@pytest.mark.parametrize("others, words", [
    (lambda a, b: [a["dcid"]], "names itself among the other grids"),
    (lambda a, b: [b["dcid"], 99], "a group of 3 grids; 3D centring takes 2"),
    (lambda a, b: [], "a Mesh3D grid with no other grid"),
])
def test_groups_that_cannot_be_centred_are_rejected(others, words):
    a, b = CASE_3D["grids"]
    with pytest.raises(GroupRejected, match=words):
        pia(a["dcid"], others(a, b), a["gridinfo"], 1, 1, experiment_type="Mesh3D")


def test_grids_that_disagree_reject_their_group_only():
    a, b = CASE_3D["grids"]
    assembly = Assembly()
    feed(assembly, [pia(a["dcid"], [b["dcid"]], a["gridinfo"], 1, 5)])
    feed(assembly, [pia(7, None, CASE_2D["gridinfo"], 1, 5)])  # another scan, in flight
    with pytest.raises(GroupRejected, match="the grids disagree on steps_x \\(20 and 19\\)") as e:
        assembly.add(pia(b["dcid"], [a["dcid"]], {**b["gridinfo"], "steps_x": 19.0}, 1, 5))
    assembly.drop(e.value.group)
    assert list(assembly.groups) == [(7,)]


def test_a_dcid_in_two_groups_is_rejected():
    a, b = CASE_3D["grids"]
    assembly = Assembly()
    feed(assembly, [pia(a["dcid"], [b["dcid"]], a["gridinfo"], 1, 5)])
    with pytest.raises(MessageRejected, match="belongs to group"):
        assembly.add(pia(a["dcid"], [12345], a["gridinfo"], 2, 5))


def test_thresholds_and_wells_come_from_the_step():
    a, b = CASE_3D["grids"]
    assembly = Assembly()
    messages = []
    for g, other in ((a, b), (b, a)):
        for k, n in enumerate(g["counts"], 1):
            messages.append(pia(g["dcid"], [other["dcid"]], g["gridinfo"], k, n, threshold=0.5, threshold_absolute=10,
                                loop_type="multipin_6x1600+1000", msp_sample_ids={"1": 11, "2": 22}))
    _, group = feed(assembly, messages)
    scans = [zx.GridScan(g["dcid"], g["counts"], zx.GridInfo.from_ispyb(g["gridinfo"])) for g in (a, b)]
    want = zx.centre_3d_scans(*scans, threshold=zx.MULTIPIN_THRESHOLD, threshold_absolute=zx.MULTIPIN_THRESHOLD_ABSOLUTE,
                              multipin_sample_ids={"1": 11, "2": 22}, well_limits=zx.well_limits("multipin_6x1600+1000", 0.02))
    assert centre(group) == want  # a multi-sample pin takes the _msp pair (defaults here), not threshold


# ---- the core's one-pass read of a plain message agrees with the envelope's ------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["", "17", " 17", "017", "1e3", "١٧", "Mesh3D", "Mesh", "18446744073709551616"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "dcid", "1"]), inner, max_size=3),
    max_leaves=6,
)
PLACES = [("payload", "file-number"), ("payload", "n_spots_total"), ("payload", "file-seen-at"), ("payload",),
          ("params", "dcid"), ("params", "dcg_dcids"), ("params", "experiment_type"), ("step", "gridinfo"),
          ("step", "parameters"), ("top", "recipe-pointer"), ("top", "recipe-path"), ("top", "environment"),
          ("top", "recipe")]


def slow(body):
    try:
        m = PiaMessage.from_envelope(Envelope.parse(body))
    except (ValueError, TypeError):
        return None
    return (m.dcid, m.group_dcids, m.experiment_type, dict(m.gridinfo), m.file_number, m.spots, m.seen_at)


@settings(max_examples=1000)
@given(dcid=st.integers(0, 10**12), other=st.none() | st.integers(0, 10**12), as_text=st.booleans(),
       number=st.integers(1, 10**6), spots=st.integers(0, 10**6), seen=st.none() | st.floats(0, 2e9),
       changes=st.lists(st.tuples(st.sampled_from(PLACES), JSON_VALUES | st.just("<delete>")), max_size=3))
def test_the_one_pass_read_recognises_only_what_the_envelope_accepts(dcid, other, as_text, number, spots, seen, changes):
    """The core reads a plain message in one pass and leaves everything else
    (None) to the envelope: whatever it does read, the envelope reads alike."""
    others = [] if other is None or other == dcid else [str(other) if as_text else other]
    body = json.loads(json.dumps(pia_body(str(dcid) if as_text else dcid, others, {"steps_x": 4, "steps_y": 3, "dx_mm": 0.1},
                          number, spots, payload={"file-number": number, "n_spots_total": spots, "file-seen-at": seen,
                                                  "file": "x.h5"})))
    plain = not changes
    for (where, *key), value in changes:
        step = body["recipe"]["2"] if isinstance(body.get("recipe"), dict) and isinstance(body["recipe"].get("2"), dict) else {}
        target = {"payload": body, "params": step.get("parameters"), "step": step, "top": body}[where]
        name = key[0] if key else "payload"
        if where == "payload" and key:
            target = body.get("payload")
        if isinstance(target, dict):
            if value == "<delete>":
                target.pop(name, None)
            else:
                target[name] = value
    raw = json.dumps(body).encode()
    fast = zx._native.pia_fields(raw)
    if plain:
        assert fast is not None
    if fast is not None:
        d, group, experiment_type, (start, end), n, s, t = fast
        assert slow(raw) == (d, group, experiment_type, json.loads(raw[start:end]), n, s, t)
