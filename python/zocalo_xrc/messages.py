"""Results messages on the wire (``docs/wire-format.md`` §3-4): decode and build.

Decoding happens in Rust, straight into typed columns; see
:func:`parse_result_message`.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from typing import Any

from ._native import ResultMessage, ResultPayloadError, XrcResults, parse_result_message
from ._native import build_result_message as _build
from ._results import GridScan2DResult, XrcResult

__all__ = ["ResultMessage", "ResultPayloadError", "build_result_message", "is_recipe_envelope", "message_id_for", "parse_result_message"]


def build_result_message(
    results: XrcResults | Sequence[XrcResult] | GridScan2DResult,
    *,
    dcid: int,
    dcgid: int | None = None,
    gpu: bool = False,
    beamline: str = "i03",
    environment_id: str | None = None,
    status: str = "success",
) -> bytes:
    """The body of the message the centring step sends to ``xrc.<beamline>``
    on the ``results`` exchange: a recipe envelope whose payload carries
    ``results`` (``"type": "3d"``, or ``"2d"`` for a :class:`GridScan2DResult`)
    and whose current step names the collection. JSON, exactly as Diamond's
    service writes it; :func:`parse_result_message` reads it back."""
    return _build(
        results,
        dcid,
        dcgid,
        gpu,
        beamline,
        environment_id if environment_id is not None else str(uuid.uuid4()),
        status,
    )


def is_recipe_envelope(headers: Any) -> bool:
    """Whether a message's headers mark it a recipe envelope
    (``workflows-recipe``: ``True``, ``"True"``, ``"true"`` or ``1``)."""
    value = headers.get("workflows-recipe") if hasattr(headers, "get") else None
    return value is True or value == 1 or (isinstance(value, (str, bytes)) and value in ("True", "true", b"True", b"true"))


def message_id_for(body: bytes) -> str:
    """The same message, the same id: a message sent twice (a retry after an
    unconfirmed send) can be recognised by whoever receives both."""
    return f"zocalo-xrc-{hashlib.sha256(body).hexdigest()[:32]}"
