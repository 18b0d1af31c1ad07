"""A local Zocalo for tests and benches: in this process on the in-process
broker with SQLite, or on a RabbitMQ vhost of its own (with MariaDB when asked)."""

from __future__ import annotations

import contextlib
import uuid
from typing import Iterator

import pytest

from zocalo_xrc.local import LocalZocalo, Settings


@contextlib.contextmanager
def running(request: pytest.FixtureRequest, where: str, settings: Settings,
            mariadb: bool = False) -> Iterator[LocalZocalo]:
    """``where`` is ``in-process`` or ``rabbitmq``."""
    if where == "in-process":
        with LocalZocalo(settings=settings) as z:
            yield z
        return
    rabbit = request.getfixturevalue("rabbit")
    if not hasattr(rabbit, "vhost"):
        pytest.skip("an external broker: no vhost of our own")
    url = rabbit.vhost(f"local-{uuid.uuid4().hex[:8]}")
    ispyb = request.getfixturevalue("mariadb_url") if mariadb else None
    with LocalZocalo(broker=url, ispyb_url=ispyb, settings=settings) as z:
        yield z
