"""The X-ray centring service: per-image spot counts in, centring results
out (``docs/wire-format.md`` §2-§4).

* :mod:`.recipe`: recipe envelopes, read and sent as workflows does;
* :mod:`.assembly`: images into grids into groups, centred when complete;
* :mod:`.runner`: :class:`XrcService` on a transport (in-process or RabbitMQ).
"""

from .runner import IDLE_S, XrcService

__all__ = ["IDLE_S", "XrcService"]
