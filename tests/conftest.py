import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


# ---- brokers ----------------------------------------------------------------

import itertools  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402



_names = itertools.count()


@pytest.fixture
def unique():
    """A name prefix of this test's own, so that tests never share a queue."""
    return f"zxt{next(_names)}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(params=["in-process", "rabbitmq"])
def transport(request, unique):
    """The same tests on both transports: the embedded broker and RabbitMQ."""
    import zocalo_xrc as zx
    from zocalo_xrc.messaging.rabbitmq import AmqpTransport
    from zocalo_xrc.messaging.inprocess import InProcessBroker

    if request.param == "in-process":
        broker = InProcessBroker()
        t = zx.InProcessTransport(broker)
        yield t
        t.close()
        broker.close()
    else:
        t = AmqpTransport(zx.ConnectionSettings.from_url(request.getfixturevalue("rabbit").url))
        yield t
        t.close()
