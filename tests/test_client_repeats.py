"""A result that comes twice is handed over once, whatever happened to the
first copy, for the receiver's lifetime (the centring service can publish a
result twice, with the same ``message_id``, when the broker is killed in the
middle of its commit); and a caller that gives up never takes a later
result with it. On the in-process broker and on RabbitMQ."""

import asyncio
import json
import signal
import time

import pytest

import zocalo_xrc as zx
from zocalo_xrc.messages import message_id_for
from test_transport import eventually
from test_zocalo import RECIPE_HEADER, ROW, WEAK, results_for, results_queue  # noqa: F401 (a fixture)


def result(dcid, rows=(ROW,)):
    return zx.build_result_message(zx.XrcResults(list(rows)), dcid=dcid, dcgid=8)


def send(transport, queue, body, message_id=None):
    """As the centring service sends a result: its message_id made from its content."""
    transport.publish("results", queue, body, RECIPE_HEADER, message_id or message_id_for(body)).result(10)


@pytest.fixture
def receiver(transport, results_queue):
    r = results_for(transport, results_queue, timeout_s=10)
    yield r
    r.close()


def test_a_result_sent_twice_is_not_the_next_collections(transport, results_queue, receiver):
    first = result(1)
    receiver.subscribe()
    send(transport, results_queue, first)
    assert receiver.trigger(any_collection=True) and receiver.last_message.dcid == 1
    send(transport, results_queue, first)  # the same result again: same bytes, same message_id
    with pytest.raises(zx.NoResultsFromZocaloError):
        receiver.trigger(any_collection=True, timeout_s=0.5)
    send(transport, results_queue, result(2, [WEAK]))
    assert list(receiver.trigger(any_collection=True)) == [WEAK] and receiver.last_message.dcid == 2
    assert eventually(lambda: transport.message_count(results_queue) == 0)


def test_the_same_message_id_is_the_same_result_whatever_its_bytes(transport, results_queue, receiver):
    first = result(1)
    again = json.dumps(json.loads(first), indent=1).encode()  # serialised anew: other bytes, the same content
    receiver.subscribe()
    send(transport, results_queue, first)
    receiver.trigger(dcids=1)
    send(transport, results_queue, again, message_id=message_id_for(first))
    send(transport, results_queue, result(2, [WEAK]))
    assert list(receiver.trigger(any_collection=True)) == [WEAK] and receiver.last_message.dcid == 2


def test_a_repeat_of_a_result_settled_as_stale_is_stale_too(transport, results_queue, receiver):
    """The first copy waited before staging (settled); the second comes after."""
    stale = result(1)
    send(transport, results_queue, stale)
    assert eventually(lambda: transport.message_count(results_queue) == 1)
    assert receiver.settle_waiting() == 1
    send(transport, results_queue, stale)
    send(transport, results_queue, result(2, [WEAK]))
    assert list(receiver.trigger(any_collection=True)) == [WEAK] and receiver.last_message.dcid == 2


def test_a_repeat_of_a_result_for_another_collection_is_not_the_next_ones(transport, results_queue, receiver):
    other = result(1)
    receiver.subscribe()
    send(transport, results_queue, other)  # not the collection asked for: dead-lettered
    send(transport, results_queue, result(2))
    receiver.trigger(dcids=2)
    send(transport, results_queue, other)
    send(transport, results_queue, result(3, [WEAK]))
    assert list(receiver.trigger(any_collection=True)) == [WEAK] and receiver.last_message.dcid == 3


def test_repeats_are_recognised_long_after(transport, results_queue, receiver):
    """Memory for thousands of results, not the last thousand."""
    receiver.subscribe()
    first = result(0)
    send(transport, results_queue, first)
    receiver.trigger(any_collection=True)
    for dcid in range(1, 1500):  # others meanwhile: evicted from a memory of 1,024
        receiver.settle_waiting()
        send(transport, results_queue, result(dcid))
        receiver.trigger(dcids=dcid)
    send(transport, results_queue, first)
    send(transport, results_queue, result(2000, [WEAK]))
    assert list(receiver.trigger(any_collection=True)) == [WEAK]


def test_a_cancelled_trigger_that_was_handed_a_result_leaves_it_for_the_next(transport, results_queue, receiver):
    """The result is handed over just as the caller's task is cancelled: it
    stays unacked, and the next trigger gets it."""
    receiver.subscribe()
    send(transport, results_queue, result(1))

    async def cancelled_as_it_is_handed_over():
        task = asyncio.create_task(receiver.trigger_async(dcids=1))
        await asyncio.sleep(0)  # the task waits now ...
        time.sleep(0.5)  # ... and the result is handed over while this loop is busy
        task.cancel()
        try:
            return list(await task)
        except asyncio.CancelledError:
            return None

    got = asyncio.run(cancelled_as_it_is_handed_over())
    if got is None:  # cancelled with the result in hand: it is the next trigger's
        assert list(receiver.trigger(dcids=1, timeout_s=5)) == [ROW]
    else:  # a loaded machine: the task had its result before the cancel came; it is not handed over again
        assert got == [ROW]
        with pytest.raises(zx.NoResultsFromZocaloError):
            receiver.trigger(dcids=1, timeout_s=1)
    assert eventually(lambda: transport.message_count(results_queue) == 0)


class Interrupted(Exception):
    """What Ctrl-C would raise in the waiting thread."""


def test_an_interrupted_trigger_that_was_handed_a_result_leaves_it_for_the_next(transport, results_queue, receiver):
    """A blocking trigger interrupted (a signal, as Ctrl-C) just as its result
    is handed over: the result stays unacked for the next trigger."""
    receiver.subscribe()

    def interrupt(signum, frame):
        send(transport, results_queue, result(1))
        assert eventually(lambda: transport.message_count(results_queue) == 0)  # delivered ...
        time.sleep(0.3)  # ... and handed over, while this thread runs the handler
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        t0 = time.monotonic()
        with pytest.raises(Interrupted):
            receiver.trigger(dcids=1)
        assert time.monotonic() - t0 < 3
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert list(receiver.trigger(dcids=1, timeout_s=5)) == [ROW]
    assert eventually(lambda: transport.message_count(results_queue) == 0)
