"""Message body -> typed results sorted by max_count, against json, orjson and msgspec.

Goal (issue 3): at 10,000 results at least 5x faster than msgspec; at one
result no slower than 2x msgspec.
"""

import json

import msgspec
import numpy as np
import orjson
import pytest

import zocalo_xrc as zx
from zocalo_xrc import XrcResult

SIZES = {"1 result": 1, "100 results": 100, "10,000 results": 10_000}


def make_body(n):
    """A realistic message: results of a noisy 3D scan, in Diamond's envelope."""
    rng = np.random.default_rng(7)
    rows = list(zx.centre_3d(rng.poisson(2, (100, 60)), rng.poisson(2, (100, 60))))
    rows = (rows * (n // len(rows) + 1))[:n]
    return zx.build_result_message(zx.XrcResults(rows), dcid=16085800, dcgid=4, environment_id="e")


def from_dicts(rows):
    return [
        XrcResult(
            tuple(r["centre_of_mass"]), tuple(r["max_voxel"]), r["max_count"], r["n_voxels"], r["total_count"],
            r.get("sample_id"), tuple(tuple(c) for c in r["bounding_box"]),
        )
        for r in rows
    ]


def with_json(body):
    message = json.loads(body)
    return sorted(from_dicts(message["payload"]["results"]), key=lambda r: r.max_count, reverse=True)


def with_orjson(body):
    message = orjson.loads(body)
    return sorted(from_dicts(message["payload"]["results"]), key=lambda r: r.max_count, reverse=True)


class Result(msgspec.Struct):
    centre_of_mass: tuple[float, float, float]
    max_voxel: tuple[int, int, int]
    max_count: float
    n_voxels: int
    total_count: float
    bounding_box: tuple[tuple[int, int, int], tuple[int, int, int]]
    sample_id: int | None = None


class Payload(msgspec.Struct):
    results: list[Result]
    status: str
    type: str


class Envelope(msgspec.Struct):
    payload: Payload
    recipe: dict
    recipe_pointer: int = msgspec.field(name="recipe-pointer")
    environment: dict = {}


DECODER = msgspec.json.Decoder(Envelope)


def with_msgspec(body):
    return sorted(DECODER.decode(body).payload.results, key=lambda r: r.max_count, reverse=True)


def with_zocalo_xrc(body):
    return zx.parse_result_message(body).results.sorted(by="max_count")


PEERS = {"json+dataclasses": with_json, "orjson+dataclasses": with_orjson, "msgspec": with_msgspec}


@pytest.fixture(scope="module", params=list(SIZES))
def workload(request):
    return request.param, make_body(SIZES[request.param])


def test_zocalo_xrc(record, workload):
    name, body = workload
    results = record("body -> sorted results", name, "zocalo-xrc", with_zocalo_xrc, body)
    assert len(results) == SIZES[name]
    assert list(results) == with_json(body)


@pytest.mark.parametrize("peer", list(PEERS))
def test_peer(record, workload, peer):
    name, body = workload
    results = record("body -> sorted results", name, peer, PEERS[peer], body)
    assert [r.max_count for r in results] == [r.max_count for r in with_json(body)]
