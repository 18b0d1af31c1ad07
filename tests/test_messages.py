"""Results messages: parse in Rust into typed results, build the wire shape."""

import json
import math

import numpy as np
import pytest
import workflows.recipe
from hypothesis import given
from hypothesis import strategies as st

import zocalo_xrc as zx
from test_results import result as xrc_result

SPEC_PAYLOAD = {
    "results": [
        {"centre_of_mass": [2.2071, 1.4175, 13.3172], "max_voxel": [2, 1, 13], "max_count": 702.0, "n_voxels": 12,
         "total_count": 5832.0, "bounding_box": [[1, 0, 12], [4, 3, 15]], "sample_id": 123456}
    ],
    "status": "success",
    "type": "3d",
}
SPEC_ENVELOPE = {
    "environment": {"ID": "6261b482-bef2-49f5-8699-eb274cd3b92e"},
    "payload": SPEC_PAYLOAD,
    "recipe": {"start": [[1, []]], "1": {"service": "Send XRC results to GDA", "queue": "xrc.i03",
                                         "exchange": "results", "parameters": {"dcid": "2", "dcgid": "4"}}},
    "recipe-path": [],
    "recipe-pointer": 1,
}
SPEC_RESULT = zx.XrcResult((2.2071, 1.4175, 13.3172), (2, 1, 13), 702.0, 12, 5832.0, 123456, ((1, 0, 12), (4, 3, 15)))


def body(obj) -> bytes:
    return json.dumps(obj).encode()


def test_spec_envelope():
    m = zx.parse_result_message(body(SPEC_ENVELOPE))
    assert isinstance(m.results, zx.XrcResults)
    assert list(m.results) == [SPEC_RESULT]
    assert (m.type, m.status, m.dcid, m.dcgid, m.gpu) == ("3d", "success", 2, 4, False)
    assert m.environment_id == "6261b482-bef2-49f5-8699-eb274cd3b92e"
    assert not m.no_crystal
    assert m.results.centre_of_mass.tolist() == [[2.2071, 1.4175, 13.3172]]
    assert "dcid=2" in repr(m)


@pytest.mark.parametrize("kind", [bytes, bytearray, lambda b: memoryview(b), lambda b: b.decode()])
def test_body_types(kind):
    assert list(zx.parse_result_message(kind(body(SPEC_ENVELOPE))).results) == [SPEC_RESULT]


def test_wrong_body_type():
    with pytest.raises(TypeError, match="expected bytes, bytearray, memoryview or str, got dict"):
        zx.parse_result_message(SPEC_ENVELOPE)


def test_bare_payload_and_old_bare_list():
    m = zx.parse_result_message(body(SPEC_PAYLOAD))
    assert (list(m.results), m.status, m.dcid, m.type) == ([SPEC_RESULT], "success", None, "3d")
    m = zx.parse_result_message(body(SPEC_PAYLOAD["results"]))
    assert (list(m.results), m.status, m.type) == ([SPEC_RESULT], None, "3d")
    m = zx.parse_result_message(body({**SPEC_ENVELOPE, "payload": SPEC_PAYLOAD["results"]}))
    assert (list(m.results), m.status, m.dcid) == ([SPEC_RESULT], None, 2)


def test_no_crystal_is_an_answer():
    m = zx.parse_result_message(body({**SPEC_ENVELOPE, "payload": {"results": [], "status": "success", "type": "3d"}}))
    assert m.no_crystal and len(m.results) == 0


def test_keys_in_any_order_unknown_fields_and_escapes():
    shuffled = {
        "recipe-pointer": 1,
        "extra": [1, {"a": None}],
        "payload": {"type": "3d", "note": "x", "status": "success", "results": [
            dict(reversed(list({**SPEC_PAYLOAD["results"][0], "future_field": {"x": [1.5]}}.items())))
        ]},
        "recipe": {"1": {"parameters": {"dcgid": 4, "dcid": 2, "other": [1]}, "queue": "xrc.i03"}, "start": [[1, []]]},
        "environment": {"ID": "e", "other": 1},
    }
    m = zx.parse_result_message(body(shuffled))
    assert list(m.results) == [SPEC_RESULT] and (m.dcid, m.dcgid) == (2, 4)
    escaped = body(SPEC_ENVELOPE).replace(b'"max_count"', b'"max\\u005fcount"')
    assert list(zx.parse_result_message(escaped).results) == [SPEC_RESULT]


def test_missing_sample_id_is_null():
    row = {k: v for k, v in SPEC_PAYLOAD["results"][0].items() if k != "sample_id"}
    m = zx.parse_result_message(body({**SPEC_PAYLOAD, "results": [row]}))
    assert m.results[0].sample_id is None


def test_gpu_and_current_step():
    env = json.loads(body(SPEC_ENVELOPE))
    env["recipe"]["2"] = {"queue": "xrc.i03", "parameters": {"dcid": "16085800", "dcgid": "77", "gpu": True}}
    env["recipe"]["1"]["parameters"]["dcid"] = ["not", "a", "dcid"]  # not the current step: harmless
    env["recipe-pointer"] = 2
    m = zx.parse_result_message(body(env))
    assert (m.dcid, m.dcgid, m.gpu) == (16085800, 77, True)


def test_2d_round_trip():
    gi = zx.GridInfo.from_ispyb({"steps_x": 5, "steps_y": 6, "dx_mm": 0.02, "dy_mm": 0.02, "micronsPerPixelX": 0.44,
                                 "micronsPerPixelY": 0.44, "snapshot_offsetXPixel": 339.273,
                                 "snapshot_offsetYPixel": 236.727, "snaked": True, "orientation": "vertical"})
    for counts in ([0, 0, 6, 54, 38, 0, 5, 41, 44, 5] + [0] * 20, [0] * 30):
        r2 = zx.centre_2d(counts, gi, sample_id=3)
        b = zx.build_result_message(r2, dcid=10, beamline="i04")
        assert json.loads(b)["payload"] == {"results": [r2.to_dict()], "status": "success", "type": "2d"}
        m = zx.parse_result_message(b)
        assert m.type == "2d" and m.results == (r2,)
        assert m.no_crystal == (r2.status == "fail")
        # "type" after "results", as Python writes dicts: read again as 2D.
        assert zx.parse_result_message(body(json.loads(b)["payload"])).results == (r2,)


def test_build_writes_the_exact_wire_shape():
    b = zx.build_result_message(zx.XrcResults([SPEC_RESULT]), dcid=2, dcgid=4, environment_id="6261b482")
    want = {
        "environment": {"ID": "6261b482"},
        "payload": {"results": [SPEC_RESULT.to_dict()], "status": "success", "type": "3d"},
        "recipe": {"start": [[1, []]], "1": {"service": "Send XRC results to GDA", "queue": "xrc.i03",
                                             "exchange": "results", "parameters": {"dcid": "2", "dcgid": "4"}}},
        "recipe-path": [],
        "recipe-pointer": 1,
    }
    assert b == json.dumps(want).encode()
    wrapper = workflows.recipe.RecipeWrapper(message=json.loads(b), transport=None)
    assert wrapper.recipe_step["parameters"] == {"dcid": "2", "dcgid": "4"}
    assert wrapper.payload["results"] == [SPEC_RESULT.to_dict()]


class Recorder:
    """Stands in for the broker: keeps what workflows hands its transport."""

    def __init__(self):
        self.sent = []

    def send(self, destination, message, **kwargs):
        self.sent.append((destination, message, kwargs))


def test_reads_what_workflows_sends():
    """A centring step's RecipeWrapper.send_to, as the real service does it."""
    recorder = Recorder()
    step_message = {
        "recipe": {
            "start": [[1, []]],
            "1": {"service": "DLS X-Ray Centering", "queue": "reduce.xray_centering",
                  "parameters": {"dcid": "16085800"}, "output": {"success": 2}},
            "2": {"service": "Send XRC results to GDA", "queue": "xrc.i03", "exchange": "results",
                  "parameters": {"dcid": "16085800", "dcgid": "9"}},
        },
        "recipe-pointer": 1,
        "recipe-path": [],
        "environment": {"ID": "e7"},
        "payload": {"file-number": 1, "n_spots_total": 3},
    }
    rw = workflows.recipe.RecipeWrapper(message=step_message, transport=recorder)
    rw.send_to("success", SPEC_PAYLOAD)
    (destination, message, kwargs), = recorder.sent
    assert destination == "xrc.i03" and kwargs["exchange"] == "results"
    m = zx.parse_result_message(json.dumps(message))
    assert (list(m.results), m.dcid, m.dcgid, m.environment_id) == ([SPEC_RESULT], 16085800, 9, "e7")


@given(
    rows=st.lists(xrc_result, max_size=20),
    dcid=st.integers(1, 2**40),
    dcgid=st.one_of(st.none(), st.integers(1, 2**40)),
    gpu=st.booleans(),
    beamline=st.sampled_from(["i03", "i04", "i24", "vmxi"]),
    environment_id=st.text(max_size=20),
)
def test_round_trip(rows, dcid, dcgid, gpu, beamline, environment_id):
    results = zx.XrcResults(rows)
    b = zx.build_result_message(results, dcid=dcid, dcgid=dcgid, gpu=gpu, beamline=beamline,
                                environment_id=environment_id)
    decoded = json.loads(b)
    assert decoded["payload"]["results"] == results.to_dicts()
    assert b == json.dumps(decoded).encode()  # the same bytes as Python's json writes
    m = zx.parse_result_message(b)
    assert m.results == results
    assert (m.dcid, m.dcgid, m.gpu, m.environment_id) == (dcid, dcgid, gpu, environment_id)
    assert m.results.sorted(by="max_count") == results.sorted(by="max_count")


def test_at_least_and_sorted():
    rows = [SPEC_RESULT, zx.XrcResult((1.0, 1.0, 1.0), (0, 0, 0), 2.0, 1, 2.0, None, ((0, 0, 0), (1, 1, 1)))]
    rs = zx.XrcResults(rows)
    assert list(rs.at_least(total_count=3)) == [SPEC_RESULT]
    assert list(rs.at_least(max_count=2, n_voxels=1)) == rows
    assert len(rs.at_least(n_voxels=13)) == 0
    assert list(rs.sorted(by="max_count", descending=False)) == rows[::-1]


# ---- errors ----------------------------------------------------------------

def mutate(path, value):
    env = json.loads(body(SPEC_ENVELOPE))
    *parents, last = path
    target = env
    for p in parents:
        target = target[p]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return body(env)


R0 = ("payload", "results", 0)


@pytest.mark.parametrize(
    "raw, message",
    [
        (mutate(R0 + ("bounding_box", 1), [4, 3]), "payload.results[0].bounding_box[1]: expected 3 integers, got 2"),
        (mutate(R0 + ("bounding_box",), [[1, 2, 3]]), "payload.results[0].bounding_box: expected 2 lists of 3 integers, got 1"),
        (mutate(R0 + ("centre_of_mass",), "x"), "payload.results[0].centre_of_mass: expected a list of 3 numbers, got a string"),
        (mutate(R0 + ("centre_of_mass", 1), None), "payload.results[0].centre_of_mass[1]: expected a number, got null"),
        (mutate(R0 + ("max_voxel", 0), 1.5), "payload.results[0].max_voxel[0]: expected an integer, got 1.5"),
        (mutate(R0 + ("n_voxels",), KeyError), "payload.results[0]: missing field 'n_voxels'"),
        (mutate(R0 + ("n_voxels",), 2**63), "payload.results[0].n_voxels: integer 9223372036854775808 out of range"),
        (mutate(R0 + ("sample_id",), "12"), "payload.results[0].sample_id: expected an integer, got a string"),
        (mutate(("payload", "results"), {}), "payload.results: expected a list, got an object"),
        (mutate(("payload", "results"), KeyError), "payload: missing field 'results'"),
        (mutate(("payload", "type"), "4d"), "payload.type: expected \"2d\" or \"3d\", got \"4d\""),
        (mutate(("payload", "status"), 1), "payload.status: expected a string, got a number"),
        (mutate(("payload",), 5), "payload: expected a result payload (an object) or a list of results, got a number"),
        (mutate(("recipe-pointer",), 2), "recipe-pointer: the recipe has no step 2"),
        (mutate(("recipe-pointer",), KeyError), "missing field 'recipe-pointer'"),
        (mutate(("recipe",), KeyError), "missing field 'recipe'"),
        (mutate(("recipe", "1", "parameters", "dcid"), "abc"), 'recipe.1.parameters.dcid: expected an integer or a string of digits, got "abc"'),
        (mutate(("recipe", "1", "parameters", "gpu"), "yes"), "recipe.1.parameters.gpu: expected true or false, got a string"),
        (mutate(("environment", "ID"), 3), "environment.ID: expected a string, got a number"),
        (body(SPEC_ENVELOPE).replace(b"702.0", b"NaN"), "NaN and Infinity are not JSON numbers"),
        (body(SPEC_ENVELOPE).replace(b"702.0", b"Infinity"), "NaN and Infinity are not JSON numbers"),
        (body(SPEC_ENVELOPE).replace(b"702.0", b"-Infinity"), "NaN and Infinity are not JSON numbers"),
        (body(SPEC_ENVELOPE).replace(b"702.0", b"1e400"), "payload.results[0].max_count: number 1e400 is out of range"),
        (body(SPEC_ENVELOPE)[:-1], "truncated JSON"),
        (body(SPEC_ENVELOPE)[:100], "truncated JSON"),
        (body(SPEC_ENVELOPE) + b" x", "trailing characters"),
        (body(SPEC_ENVELOPE).replace(b"6261b482", b"\xff\xfe"), "invalid UTF-8 in a string"),
        (b"", "truncated JSON"),
        (b"not json", "invalid JSON at byte 0"),
        (b"\"just a string\"", "expected a recipe envelope, a result payload or a list of results, got a string"),
        (b'{"deep": ' + b"[" * 300 + b"]" * 300 + b', "results": []}', "deep[0][0]"),
        (b'{"deep": ' + b"[" * 300 + b"]" * 300 + b', "results": []}', "nested more than 256 deep"),
        (body({"results": [SPEC_PAYLOAD["results"][0]] * 2, "status": "success", "type": "2d"}),
         "results[0].centre_of_mass: expected 2 numbers, got 3"),
    ],
)
def test_errors_name_the_path(raw, message):
    with pytest.raises(zx.ResultPayloadError) as e:
        zx.parse_result_message(raw)
    assert message in str(e.value)
    assert isinstance(e.value, ValueError)
    assert str(e.value).startswith(e.value.path)


def test_2d_payload_needs_exactly_one_result():
    gi = zx.GridInfo.from_ispyb({"steps_x": 2, "steps_y": 1, "dx_mm": 0.02, "dy_mm": 0.02, "micronsPerPixelX": 1.0,
                                 "micronsPerPixelY": 1.0, "snapshot_offsetXPixel": 0.0, "snapshot_offsetYPixel": 0.0,
                                 "snaked": False, "orientation": "horizontal"})
    r2 = zx.centre_2d([1, 0], gi).to_dict()
    with pytest.raises(zx.ResultPayloadError, match="a 2d payload has exactly one result, got 2"):
        zx.parse_result_message(body({"type": "2d", "status": "success", "results": [r2, r2]}))
    missing = {k: v for k, v in r2.items() if k != "best_region"}
    with pytest.raises(zx.ResultPayloadError, match=r"results\[0\]: missing field 'best_region'"):
        zx.parse_result_message(body({"type": "2d", "status": "success", "results": [missing]}))


def test_str_with_lone_surrogate():
    with pytest.raises(zx.ResultPayloadError, match="not valid Unicode"):
        zx.parse_result_message('{"a": "\ud800"}')


# ---- fuzzing: no input crashes the parser ------------------------------------

def parses_or_refuses(raw):
    try:
        zx.parse_result_message(raw)
    except zx.ResultPayloadError as e:
        assert str(e)


@given(st.binary(max_size=400))
def test_random_bytes(raw):
    parses_or_refuses(raw)


@given(st.data())
def test_mutated_valid_bodies(data):
    raw = bytearray(body(SPEC_ENVELOPE))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "drop", "dup", "cut"]))
        if op == "flip":
            raw[i] = data.draw(st.integers(0, 255))
        elif op == "drop":
            del raw[i]
        elif op == "dup":
            raw.insert(i, raw[i])
        else:
            del raw[i:]
            break
    parses_or_refuses(bytes(raw))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=30,
)


@given(json_values)
def test_arbitrary_json(value):
    parses_or_refuses(json.dumps(value))
    parses_or_refuses(json.dumps({"payload": value, "recipe": {"1": {}}, "recipe-pointer": 1}))


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_floats_decode_exactly(v):
    row = SPEC_RESULT.to_dict()
    row["max_count"] = v
    m = zx.parse_result_message(json.dumps([row]))
    assert m.results[0].max_count == v and math.copysign(1, m.results[0].max_count) == math.copysign(1, v)


# ---- from grid boxes to motors (spec §5) ----------------------------------------

def test_to_motor():
    g = zx.GridGeometry(x_start_mm=1.0, x_step_mm=0.02, x_steps=20, y_start_mm=-2.0, y_step_mm=0.02, y_steps=12,
                        z_start_mm=0.5, z_step_mm=0.02, z_steps=16)
    pos = g.to_motor(SPEC_RESULT)
    assert SPEC_RESULT.centre_in_boxes == pytest.approx((1.7071, 0.9175, 12.8172))
    assert pos.centre_mm == pytest.approx((1.0 + 0.02 * 1.7071, -2.0 + 0.02 * 0.9175, 0.5 + 0.02 * 12.8172))
    assert pos.bounding_box_mm[0] == pytest.approx((1.0 + 0.02 * 0.5, -2.0 - 0.01, 0.5 + 0.02 * 11.5))
    small = zx.GridGeometry(1.0, 0.02, 20, -2.0, 0.02, 12, 0.5, 0.02, 10)
    with pytest.raises(zx.OutsideGridError, match=r"z = 12.8172 boxes is outside the grid \(-0.5 to 9.5\)"):
        small.to_motor(SPEC_RESULT)
    with pytest.raises(ValueError, match="needs a GridGeometry with z"):
        zx.GridGeometry(0, 1, 5, 0, 1, 5).to_motor(SPEC_RESULT)
    with pytest.raises(ValueError, match="all of z_start_mm"):
        zx.GridGeometry(0, 1, 5, 0, 1, 5, z_steps=3)


def test_to_motor_2d():
    gi = zx.GridInfo.from_ispyb({"steps_x": 4, "steps_y": 3, "dx_mm": 0.01, "dy_mm": 0.01, "micronsPerPixelX": 1.0,
                                 "micronsPerPixelY": 1.0, "snapshot_offsetXPixel": 0.0, "snapshot_offsetYPixel": 0.0,
                                 "snaked": False, "orientation": "horizontal"})
    r2 = zx.centre_2d([9, 0, 5, 5, 0, 0, 0, 0, 0, 0, 5, 5], gi)
    pos = zx.GridGeometry(0.0, 0.01, 4, 0.0, 0.01, 3).to_motor(r2)
    assert pos.centre_mm == pytest.approx((0.025, 0.0))
    lower, upper = pos.bounding_box_mm
    assert lower == pytest.approx((0.015, -0.005)) and upper == pytest.approx((0.035, 0.005))
    with pytest.raises(ValueError, match="status 'fail' has no position"):
        zx.GridGeometry(0.0, 0.01, 4, 0.0, 0.01, 3).to_motor(zx.centre_2d(np.zeros(12, int), gi))
