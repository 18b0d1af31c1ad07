"""The transport semantics, tested alike on the in-process broker and RabbitMQ."""

import queue
import threading
import time

import pytest

import zocalo_xrc as zx
from zocalo_xrc.messaging import QueueSpec, TransportError
from zocalo_xrc.messaging.inprocess import topic_matches


def collect(transport, spec, prefetch=32):
    got = queue.Queue()
    subscription = transport.subscribe(spec, got.put, prefetch=prefetch)
    return got, subscription


def eventually(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def test_default_exchange_delivers_and_ack_removes(transport, unique):
    transport.declare_queue(unique)
    transport.publish("", unique, b'{"a": 1}', {"k": "v"}).result(10)
    got, sub = collect(transport, QueueSpec(unique))
    d = got.get(timeout=10)
    assert (d.body, d.headers["k"], d.redelivered, d.routing_key) == (b'{"a": 1}', "v", False, unique)
    d.ack()
    sub.cancel()
    assert eventually(lambda: transport.message_count(unique) == 0)
    transport.delete_queue(unique)


def test_publish_to_a_missing_queue_raises(transport, unique):
    with pytest.raises(zx.UnroutableError, match=f"routing key '{unique}-missing'"):
        transport.publish("", f"{unique}-missing", b"{}", {}).result(10)


def test_topic_routing(transport, unique):
    transport.declare_results_queue(unique, routing_key=f"xrc.{unique}")
    transport.publish("results", f"xrc.{unique}", b"1", {}).result(10)
    with pytest.raises(zx.UnroutableError):
        transport.publish("results", f"xrc.{unique}.other", b"2", {}).result(10)
    assert eventually(lambda: transport.message_count(unique) == 1)
    transport.delete_queue(unique)
    transport.delete_queue(f"dlq.{unique}")


def test_unacked_messages_come_back_redelivered(transport, unique):
    transport.declare_queue(unique)
    transport.publish("", unique, b"x", {}).result(10)
    got, sub = collect(transport, QueueSpec(unique))
    assert got.get(timeout=10).redelivered is False
    sub.cancel()  # never acked
    got2, sub2 = collect(transport, QueueSpec(unique))
    again = got2.get(timeout=10)
    assert (again.body, again.redelivered) == (b"x", True)
    again.ack()
    sub2.cancel()
    transport.delete_queue(unique)


def test_reject_dead_letters_and_requeue_redelivers(transport, unique):
    transport.declare_results_queue(unique)
    for body in (b"bad", b"retry"):
        transport.publish("results", unique, body, {}).result(10)
    got, sub = collect(transport, QueueSpec(unique))
    first = got.get(timeout=10)
    assert first.body == b"bad"
    first.reject(requeue=False)
    second = got.get(timeout=10)
    second.reject(requeue=True)
    third = got.get(timeout=10)
    assert (third.body, third.redelivered) == (b"retry", True)
    third.ack()
    sub.cancel()
    assert eventually(lambda: transport.message_count(f"dlq.{unique}") == 1)
    assert transport.message_count(unique) == 0
    transport.delete_queue(unique)
    transport.delete_queue(f"dlq.{unique}")


def test_prefetch_bounds_unacked_deliveries(transport, unique):
    transport.declare_queue(unique)
    for i in range(5):
        transport.publish("", unique, str(i).encode(), {}).result(10)
    got, sub = collect(transport, QueueSpec(unique), prefetch=2)
    a, b = got.get(timeout=10), got.get(timeout=10)
    with pytest.raises(queue.Empty):
        got.get(timeout=0.3)
    a.ack()
    c = got.get(timeout=10)
    assert [m.body for m in (a, b, c)] == [b"0", b"1", b"2"]
    for m in (b, c):
        m.ack()
    sub.cancel()
    transport.delete_queue(unique)


def test_private_queue_sees_a_copy(transport, unique):
    transport.declare_results_queue(unique)
    private, psub = collect(transport, QueueSpec(None, "results", unique))
    transport.publish("results", unique, b"r", {}).result(10)
    p = private.get(timeout=10)
    assert p.body == b"r"
    p.ack()
    assert eventually(lambda: transport.message_count(unique) == 1)  # the durable queue still has its own
    psub.cancel()
    transport.delete_queue(unique)
    transport.delete_queue(f"dlq.{unique}")


def test_subscribing_to_a_missing_queue_raises(transport, unique):
    with pytest.raises(TransportError, match="NOT_FOUND"):
        transport.subscribe(QueueSpec(f"{unique}-none"), lambda d: None)
    assert not transport.queue_exists(f"{unique}-none")


def test_timers_run_on_the_transport_thread(transport):
    ran = queue.Queue()
    transport.call_later(0.05, lambda: ran.put(threading.current_thread().name))
    transport.call_soon(lambda: ran.put("soon"))
    assert ran.get(timeout=5) == "soon"
    assert ran.get(timeout=5) != threading.current_thread().name


@pytest.mark.parametrize(
    "pattern, key, match",
    [("xrc.i03", "xrc.i03", True), ("xrc.*", "xrc.i03", True), ("xrc.*", "xrc.i03.x", False), ("#", "a.b", True),
     ("xrc.#", "xrc", True), ("*.i03", "xrc.i04", False), ("a.#.z", "a.b.c.z", True)],
)
def test_topic_patterns(pattern, key, match):
    assert topic_matches(pattern, key) is match


def test_publish_to_a_missing_exchange_raises_and_publishing_goes_on(transport, unique):
    with pytest.raises(TransportError, match="NOT_FOUND"):
        transport.publish(f"{unique}-no-exchange", "x", b"1", {}).result(10)
    transport.declare_queue(unique)
    transport.publish("", unique, b"2", {}).result(10)
    assert eventually(lambda: transport.message_count(unique) == 1)
    transport.delete_queue(unique)


def test_many_publishes_in_flight(transport, unique):
    transport.declare_queue(unique)
    futures = [transport.publish("", unique, str(i).encode(), {}) for i in range(200)]
    futures.append(transport.publish("", f"{unique}-missing", b"x", {}))
    for f in futures[:-1]:
        f.result(10)
    with pytest.raises(zx.UnroutableError):
        futures[-1].result(10)
    assert eventually(lambda: transport.message_count(unique) == 200)
    got, sub = collect(transport, QueueSpec(unique), prefetch=500)
    bodies = [got.get(timeout=10) for _ in range(200)]
    assert [int(d.body) for d in bodies] == list(range(200))  # in order
    for d in bodies:
        d.ack()
    sub.cancel()
    transport.delete_queue(unique)


# ---- atomic subscriptions: publish and ack as one step --------------------------------------------


def test_commit_publishes_and_acks_together(transport, unique):
    """The messages appear and the deliveries go at the same commit; what no
    queue takes is handed back, and its acks stand."""
    transport.declare_queue(unique)
    transport.declare_queue(f"{unique}.out")
    for k in range(5):
        transport.publish("", unique, str(k).encode(), {}).result(10)
    got = queue.Queue()
    sub = transport.subscribe(QueueSpec(unique), got.put, atomic=True)
    held = [got.get(timeout=10) for _ in range(5)]
    out = zx.messaging.Outgoing("", f"{unique}.out", b"result", {"h": 1}, "mid-1")
    nowhere = zx.messaging.Outgoing("", f"{unique}.missing", b"lost?", {}, "mid-2")
    # acks of deliveries 1, 2, 4 (3 stays held): not a prefix, so some go one by one
    returned = sub.commit([out, nowhere], [held[0], held[1], held[3]]).result(10)
    assert returned == [nowhere]
    assert eventually(lambda: transport.message_count(f"{unique}.out") == 1)
    assert [d.live for d in held] == [False, False, True, False, True]
    sub.commit([], [held[2], held[4]]).result(10)
    sub.cancel()
    assert eventually(lambda: transport.message_count(unique) == 0)
    for name in (unique, f"{unique}.out"):
        transport.delete_queue(name)


def test_work_not_committed_is_undone(transport, unique):
    """A consumer that goes before committing has published nothing; its
    deliveries come back, to the next consumer."""
    transport.declare_queue(unique)
    transport.declare_queue(f"{unique}.out")
    transport.publish("", unique, b"image", {}).result(10)
    got = queue.Queue()
    sub = transport.subscribe(QueueSpec(unique), got.put, atomic=True)
    d = got.get(timeout=10)
    d.ack()  # an ack on an atomic subscription is committed by itself, soon: then it stands
    assert eventually(lambda: not d.live)
    transport.publish("", unique, b"image 2", {}).result(10)
    d2 = got.get(timeout=10)
    sub.cancel()  # gone with d2 held, before any commit of it
    assert eventually(lambda: transport.message_count(unique) == 1)
    with pytest.raises(TransportError):
        sub.commit([zx.messaging.Outgoing("", f"{unique}.out", b"late")], [d2]).result(10)
    assert transport.message_count(f"{unique}.out") == 0
    got2 = queue.Queue()
    sub2 = transport.subscribe(QueueSpec(unique), got2.put, atomic=True)
    again = got2.get(timeout=10)
    assert (again.body, again.redelivered) == (b"image 2", True)
    sub2.commit([], [again]).result(10)
    sub2.cancel()
    for name in (unique, f"{unique}.out"):
        transport.delete_queue(name)


def test_commit_needs_an_atomic_subscription(transport, unique):
    transport.declare_queue(unique)
    sub = transport.subscribe(QueueSpec(unique), lambda d: None)
    with pytest.raises(TransportError, match="atomic=True"):
        sub.commit([], []).result(10)
    sub.cancel()
    transport.delete_queue(unique)


def test_shared_connections_close_together_and_the_next_is_new(rabbit):
    """One connection per broker and credentials; ``close_shared`` closes
    them all (a test session does, before its broker goes, so that none
    keeps trying to reach it as the process exits)."""
    from zocalo_xrc.messaging.rabbitmq import AmqpTransport

    settings = zx.ConnectionSettings.from_url(rabbit.url)
    first = AmqpTransport.shared(settings)
    assert AmqpTransport.shared(settings) is first and eventually(first.connected.is_set)
    AmqpTransport.close_shared()
    assert not first.connected.is_set() and not first._thread.is_alive()
    second = AmqpTransport.shared(settings)
    try:
        assert second is not first and eventually(second.connected.is_set)
    finally:
        AmqpTransport.close_shared()
