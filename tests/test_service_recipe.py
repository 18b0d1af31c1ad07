"""The service's recipe envelopes: read as workflows reads them, sent where
workflows' RecipeWrapper sends them, with the same content (workflows also
reorders the recipe's keys, which JSON readers do not see)."""

import json
import re

import pytest
import workflows.recipe

from zocalo_xrc.messaging import Outgoing as Send
from zocalo_xrc.service.recipe import Envelope, EnvelopeError

RECIPE = {
    "1": {"service": "GPU Gridscan", "queue": "per_image_analysis.gpu", "output": [2]},
    "2": {"service": "DLS X-Ray Centering", "queue": "reduce.xray_centering.gpu",
          "parameters": {"dcid": "16085800", "dcg_dcids": [16085803]}, "output": {"success": 3, "abort": 4}},
    "3": {"service": "Send XRC results to GDA", "queue": "xrc.i03", "exchange": "results",
          "parameters": {"dcid": "16085800", "dcgid": "1608580", "gpu": True}},
    "4": {"service": "XRC abort", "queue": "xrc.abort", "topic": "xrc.abort.all"},
    "5": {"service": "listed", "queue": "listed", "output": [3, 4]},
    "6": {"service": "int", "queue": "int", "output": 3},
    "start": [[1, []]],
}


def envelope(pointer, recipe=RECIPE):
    return {"environment": {"ID": "6261b482-bef2-49f5-8699-eb274cd3b92e"}, "payload": {"file-number": 1},
            "recipe": recipe, "recipe-path": [1], "recipe-pointer": pointer}


def same(a, b):
    """The same messages to the same places, the JSON compared as values."""
    return [(x.exchange, x.routing_key, json.loads(x.body)) for x in a] == \
        [(x.exchange, x.routing_key, json.loads(x.body)) for x in b]


class Recording:
    """A workflows transport that writes down what it is asked to send."""

    def __init__(self):
        self.sent = []

    def send(self, destination, message, headers=None, **kwargs):
        self.sent.append(Send(kwargs.get("exchange", ""), destination, json.dumps(message).encode()))

    def broadcast(self, destination, message, headers=None, **kwargs):
        self.sent.append(Send(destination, "", json.dumps(message).encode()))


@pytest.mark.parametrize("pointer, output", [(2, "success"), (2, "abort"), (2, "nothing")])
def test_named_outputs_go_where_workflows_sends_them(pointer, output):
    transport = Recording()
    wrapper = workflows.recipe.RecipeWrapper(message=envelope(pointer), transport=transport)
    payload = {"results": [], "status": "success", "type": "3d"}
    wrapper.send_to(output, payload)
    assert same(Envelope.parse(json.dumps(envelope(pointer))).send(output, payload), transport.sent)


@pytest.mark.parametrize("pointer", [5, 6])
def test_unnamed_outputs_take_every_named_one(pointer):
    """workflows sends only its default channel there; Diamond's service lost
    its aborts that way. Here success and abort both go where output says."""
    transport = Recording()
    wrapper = workflows.recipe.RecipeWrapper(message=envelope(pointer), transport=transport)
    wrapper.send({})  # the unnamed output, as workflows sends it
    ours = Envelope.parse(json.dumps(envelope(pointer)))
    assert ours.send("abort", {}) == ours.send("success", {})
    assert same(ours.send("success", {}), transport.sent)
    assert [s.routing_key for s in transport.sent][:2] == ["xrc.i03", "xrc.abort"][: len(transport.sent)]


@pytest.mark.parametrize("body, words", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "expected a recipe envelope (an object), got list"),
    (json.dumps({"payload": {}, "recipe-pointer": 1}), "no 'recipe'"),
    (json.dumps({**envelope(2), "recipe-pointer": "2"}), "recipe-pointer: expected an integer, got '2'"),
    (json.dumps({**envelope(9)}), "the recipe has no step 9"),
    (b"\xff\xfe", "not JSON"),
])
def test_bad_envelopes_say_what_is_wrong(body, words):
    with pytest.raises(EnvelopeError, match=re.escape(words)):
        Envelope.parse(body)


def test_an_output_to_a_missing_step_is_an_error():
    recipe = {**RECIPE, "2": {**RECIPE["2"], "output": {"success": 7}}}
    with pytest.raises(EnvelopeError, match="output 'success' names step 7"):
        Envelope.parse(json.dumps(envelope(2, recipe))).send("success", {})
