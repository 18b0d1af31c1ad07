"""Recipe envelopes as the X-ray centring service receives and sends them
(``docs/wire-format.md`` §4), the way ``workflows.recipe.RecipeWrapper``
reads and writes them.

An envelope's *current step* is ``recipe[str(recipe-pointer)]``. Sending a
payload to one of the step's outputs means: for every step the output names,
copy the envelope with that step as the pointer, the old pointer appended to
``recipe-path`` and the new payload, and publish it where that step listens
(its ``queue``, through its ``exchange`` or the default one, and/or its
``topic``). Unlike workflows, a step whose ``output`` is an int or a list
(not named outputs) sends *every* named output there, ``abort`` included:
Diamond's service lost aborts that way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from .._text import quoted
from ..messages import message_id_for
from ..messaging import Outgoing

#: The header every recipe message carries.
RECIPE_HEADERS: Mapping[str, Any] = {"workflows-recipe": True}


class EnvelopeError(ValueError):
    """A message that is not a usable recipe envelope; says what is wrong."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys are each given once: JSON readers disagree on
    which of two values counts, so a key given twice is refused."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise EnvelopeError(f"the key {quoted(twice)} is given twice in one object")
    return d


@dataclass(frozen=True)
class Envelope:
    environment: Mapping[str, Any]
    recipe: Mapping[str, Any]
    path: list[Any]
    pointer: int
    payload: Any

    @classmethod
    def parse(cls, body: bytes | str) -> Envelope:
        """A recipe envelope from a message body (strict: every error names
        the field)."""
        try:
            message = json.loads(body, object_pairs_hook=_unique_keys)
        except EnvelopeError:
            raise
        except (ValueError, UnicodeDecodeError) as e:
            raise EnvelopeError(f"not JSON ({type(e).__name__} {str(e)[:80]})") from None
        except RecursionError:
            raise EnvelopeError("JSON nested too deeply to read") from None
        if not isinstance(message, dict):
            raise EnvelopeError(f"expected a recipe envelope (an object), got {type(message).__name__}")
        for key in ("recipe", "recipe-pointer", "payload"):
            if key not in message:
                raise EnvelopeError(f"not a recipe envelope: no {key!r}")
        recipe, pointer = message["recipe"], message["recipe-pointer"]
        if not isinstance(recipe, dict):
            raise EnvelopeError(f"recipe: expected an object, got {type(recipe).__name__}")
        if isinstance(pointer, bool) or not isinstance(pointer, int):
            raise EnvelopeError(f"recipe-pointer: expected an integer, got {quoted(pointer)}")
        if not isinstance(recipe.get(str(pointer)), dict):
            raise EnvelopeError(f"recipe-pointer: the recipe has no step {pointer}")
        path = message.get("recipe-path", [])
        environment = message.get("environment", {})
        if not isinstance(path, list) or not isinstance(environment, dict):
            raise EnvelopeError("recipe-path must be a list and environment an object")
        return cls(environment, recipe, path, pointer, message["payload"])

    @property
    def step(self) -> Mapping[str, Any]:
        """The current step."""
        step: Mapping[str, Any] = self.recipe[str(self.pointer)]
        return step

    @property
    def dcgid(self) -> Any:
        """The data collection group's id where the recipe names one (the
        current step's parameters first, then any step's), else None."""
        steps = [self.step, *(s for k, s in self.recipe.items() if k != str(self.pointer))]
        for step in steps:
            parameters = step.get("parameters") if isinstance(step, Mapping) else None
            if isinstance(parameters, Mapping) and parameters.get("dcgid") not in (None, ""):
                return parameters["dcgid"]
        return None

    def targets(self, output: str) -> list[int]:
        """The steps that ``output`` of the current step leads to."""
        out = self.step.get("output")
        if out is None:
            return []
        if isinstance(out, dict):
            out = out.get(output)
            if out is None:
                return []
        targets = out if isinstance(out, list) else [out]
        for t in targets:
            if isinstance(t, bool) or not isinstance(t, int) or not isinstance(self.recipe.get(str(t)), dict):
                raise EnvelopeError(f"output {output!r} names step {quoted(t)}, which the recipe does not have")
        return targets

    def send(self, output: str, payload: Any) -> list[Outgoing]:
        """The messages that send ``payload`` to ``output`` of the current step
        (recipe headers, a message id made from the content)."""
        sends = []
        for target in self.targets(output):
            step = self.recipe[str(target)]
            body = json.dumps({
                "environment": self.environment,
                "payload": payload,
                "recipe": self.recipe,
                "recipe-path": [*self.path, self.pointer],
                "recipe-pointer": target,
            }).encode()
            mid = message_id_for(body)
            if step.get("queue"):
                sends.append(Outgoing(step.get("exchange", ""), step["queue"], body, RECIPE_HEADERS, mid))
            if step.get("topic"):
                sends.append(Outgoing(step["topic"], "", body, RECIPE_HEADERS, mid))
        return sends
