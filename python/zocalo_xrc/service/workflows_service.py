"""The X-ray centring service as a ``workflows`` service, for a Zocalo
installation: ``zocalo.service -s XRayCentering -e ENV`` (CPU spot finding,
queue ``reduce.xray_centering``) or ``-s XRayCenteringGPU``
(``reduce.xray_centering.gpu``). The frontend brings what every Zocalo
service has: zocalo YAML configuration, status on ``transient.status``,
``zocalo.shutdown``, Graylog when the configuration names it.

The centring is :class:`~zocalo_xrc.service.runner.XrcService`, the same as
``zocalo-xrc service`` runs; here it talks through the frontend's transport
(:class:`WorkflowsTransport`), and everything it does happens on the
service's main thread. A commit (a result, a checkpoint) is two workflows
transactions on the subscription's channel: the publishes, then, once the
broker has answered that commit, the acks. workflows' PikaTransport offers
no publisher confirms (3.3 to 3.7); a transaction of publishes alone stands
in for them, as RabbitMQ answers ``tx.commit`` only once every message in
it is confirmed by its queues. So the service keeps the promise it keeps
with ``zocalo-xrc service``, at the price of a second round trip.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Mapping, Sequence

from workflows.services.common_service import CommonService

from ..messaging import Delivery, Outgoing, QueueSpec, Subscription, Transport, TransportError
from ..messaging.timers import Timers
from .metrics import ServiceMetrics
from .runner import IDLE_S, XrcService


class WorkflowsTransport(Transport):
    """The face :class:`XrcService` needs, on the transport of a running
    ``workflows`` service. Queues belong to the deployment here
    (``zocalo.configure_rabbitmq``): this face consumes and sends, it does
    not declare or inspect them."""

    def __init__(self, service: CommonService) -> None:
        if service._transport is None:
            raise TransportError("the workflows service has no transport yet (make this in initializing())")
        self._service = service
        self._transport: Any = service._transport
        self._timers = Timers("X-ray centring: timers")

    def __repr__(self) -> str:
        return f"WorkflowsTransport({type(self._transport).__name__})"

    def publish(self, exchange: str, routing_key: str, body: bytes, headers: Mapping[str, Any],
                message_id: str | None = None) -> Future[None]:
        future: Future[None] = Future()
        try:
            self._send(Outgoing(exchange, routing_key, body, headers, message_id), None)
            future.set_result(None)
        except Exception as e:
            future.set_exception(TransportError(f"cannot send to {routing_key!r}: {e}"))
        return future

    def _send(self, m: Outgoing, transaction: int | None) -> None:
        self._transport.raw_send(m.routing_key, m.body, headers=dict(m.headers), exchange=m.exchange or None,
                                 transaction=transaction)

    def subscribe(self, queue: QueueSpec, callback: Callable[[Delivery], None], *, prefetch: int = 32,
                  wait: float | None = 30.0, atomic: bool = False) -> Subscription:
        if queue.name is None:
            raise TransportError("a workflows service consumes a named queue")
        subscription = _WorkflowsSubscription(self, callback)
        subscription.id = self._transport.subscribe(queue.name, subscription.on_message, acknowledgement=True,
                                                    prefetch_count=prefetch, disable_mangling=True)
        return subscription

    def call_soon(self, fn: Callable[[], None]) -> None:
        """On the service's main thread, after what is queued there."""
        enqueue: Any = self._service._transport_interceptor  # puts work on the service's main queue
        enqueue(lambda header, message: fn())(None, None)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self._timers.call_later(delay, lambda: self.call_soon(fn))

    def _not_here(self, what: str) -> TransportError:
        return TransportError(f"{what}: queues belong to the Zocalo deployment under a workflows frontend "
                              "(zocalo.configure_rabbitmq), not to the service")

    def declare_results_queue(self, name: str, *, exchange: str = "results", routing_key: str | None = None) -> None:
        raise self._not_here(f"cannot declare {name}")

    def declare_work_queue(self, name: str, *, shared: bool = False) -> None:
        raise self._not_here(f"cannot declare {name}")

    def declare_queue(self, name: str) -> None:
        raise self._not_here(f"cannot declare {name}")

    def declare_broadcast(self, name: str) -> None:
        raise self._not_here(f"cannot declare {name}")

    def declare_shards(self, name: str, count: int) -> None:
        raise self._not_here(f"cannot declare the shards of {name}")

    def queue_exists(self, name: str) -> bool:
        raise self._not_here(f"cannot look {name} up")

    def message_count(self, name: str) -> int:
        raise self._not_here(f"cannot count {name}")

    def consumer_count(self, name: str) -> int:
        raise self._not_here(f"cannot count {name}'s consumers")

    def delete_queue(self, name: str) -> None:
        raise self._not_here(f"cannot delete {name}")

    def purge_queue(self, name: str) -> int:
        raise self._not_here(f"cannot purge {name}")

    def close(self) -> None:
        self._timers.close()


class _WorkflowsSubscription(Subscription):
    """Acks, rejects and commits each go out in workflows transactions on
    the subscription's channel (once a channel has been in one, RabbitMQ
    holds everything on it until a commit)."""

    def __init__(self, transport: WorkflowsTransport, callback: Callable[[Delivery], None]) -> None:
        self.transport, self.callback = transport, callback
        self.id: int = 0
        self.cancelled = False
        self.ready: Future[None] = Future()
        self.ready.set_result(None)

    def on_message(self, header: Mapping[str, Any], body: Any) -> None:
        if not self.cancelled:
            self.callback(_WorkflowsDelivery(self, header, body))

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.transport._transport.unsubscribe(self.id)

    def commit(self, messages: Sequence[Outgoing], acks: Sequence[Delivery]) -> Future[list[Outgoing]]:
        future: Future[list[Outgoing]] = Future()
        t = self.transport._transport

        def publish(transaction: int) -> None:
            for m in messages:
                self.transport._send(m, transaction)

        def ack(transaction: int) -> None:
            for d in acks:
                t.ack(_header(d), transaction=transaction)

        try:
            if messages:  # answered once the broker has them all: then the acks
                self._transaction(publish)
        except Exception as e:
            future.set_exception(TransportError(f"publishing failed ({e}); nothing was acked"))
            return future
        try:
            if acks:
                self._transaction(ack)
        except Exception as e:
            future.set_exception(TransportError(f"the messages went, the acks failed ({e}); they come again"))
        else:
            future.set_result([])  # workflows does not say which mandatory messages came back
        return future

    def _transaction(self, work: Callable[[int], object]) -> None:
        """``work(transaction)`` in one workflows transaction on this
        subscription's channel, committed (the broker's answer waited for)."""
        t = self.transport._transport
        transaction = t.transaction_begin(subscription_id=self.id)
        try:
            work(transaction)
        except BaseException:
            t.transaction_abort(transaction)
            raise
        t.transaction_commit(transaction)

    def settle(self, delivery: _WorkflowsDelivery, requeue: bool | None) -> None:
        t = self.transport._transport
        if requeue is None:
            self._transaction(lambda transaction: t.ack(delivery.header, transaction=transaction))
        else:
            self._transaction(lambda transaction: t.nack(delivery.header, requeue=requeue, transaction=transaction))


def _header(d: Delivery) -> Mapping[str, Any]:
    assert isinstance(d, _WorkflowsDelivery)
    return d.header


class _WorkflowsDelivery(Delivery):
    def __init__(self, subscription: _WorkflowsSubscription, header: Mapping[str, Any], body: Any) -> None:
        self._subscription, self.header = subscription, header
        self.body = body if isinstance(body, bytes) else str(body).encode()
        self.headers = header
        self.message_id = None  # workflows hands over the delivery tag, not the message's id
        self.exchange = str(header.get("exchange", ""))
        self.routing_key = str(header.get("routing_key", ""))
        self.redelivered = bool(header.get("redelivered"))

    def ack(self) -> None:
        self._subscription.settle(self, None)

    def reject(self, requeue: bool = False) -> None:
        self._subscription.settle(self, requeue)


class XRayCentering(CommonService):
    """X-ray centring from CPU per-image analysis (``reduce.xray_centering``)."""

    _service_name = "X-ray centring (zocalo-xrc)"
    _logger_name = "zocalo_xrc.service"
    queue = "reduce.xray_centering"
    idle_s = IDLE_S

    def initializing(self) -> None:
        # with the frontend's metrics option, the frontend serves prometheus-client's registry: count into it
        metrics = ServiceMetrics() if self._environment.get("metrics") else None
        # in a local Zocalo, its configuration sets the idle time and names the logbook
        from ..local import logbook
        from ..local.settings import Settings

        idle_s = Settings.of(self.config).idle_s or self.idle_s
        self.journal = logbook.attach(self)
        if metrics is not None and self.journal is not None:
            journal = self.journal
            metrics.journal_unwritten.set_function(lambda: journal.unwritten)
        self.xrc = XrcService(WorkflowsTransport(self), self.queue, idle_s=idle_s, metrics=metrics)
        self.xrc.start()
        threading.Thread(target=self._end_with_the_frontend, args=(os.getppid(),), daemon=True,
                         name="X-ray centring: frontend watch").start()

    def _end_with_the_frontend(self, frontend: int) -> None:
        """The frontend runs this service in a child process and, killed with
        SIGTERM, leaves it behind, still consuming. Stop when it goes: what is
        held goes back to the queue, for the next service."""
        while os.getppid() == frontend:
            time.sleep(1.0)
        self.log.warning("the frontend (process %d) is gone; stopping", frontend)
        self._shutdown()  # type: ignore[no-untyped-call]

    def in_shutdown(self) -> None:
        from ..local import logbook

        logbook.detach(self)
        xrc = getattr(self, "xrc", None)
        if xrc is not None:
            self.log.info("X-ray centring stopping: %d result(s) sent, %d message(s) dead-lettered, %d open scan(s)",
                          xrc.completed, xrc.rejected, len(xrc.open))


class XRayCenteringGPU(XRayCentering):
    """X-ray centring from GPU per-image analysis (``reduce.xray_centering.gpu``)."""

    _service_name = "X-ray centring, GPU (zocalo-xrc)"
    queue = "reduce.xray_centering.gpu"
