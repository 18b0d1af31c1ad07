"""Unmodified workflows and zocalo services on the in-process broker: the
workflows transport (InProcessWorkflowsTransport) behaving as PikaTransport
does on RabbitMQ, and services run in threads (ServiceThread): zocalo's
Dispatcher and this project's XRayCenteringGPU."""

import json
import logging
import queue
import threading
import time

import pytest
import workflows
import workflows.recipe
import zocalo.configuration
from workflows.services.common_service import CommonService
from workflows.transport.common_transport import CommonTransport
from workflows.transport.offline_transport import OfflineTransport
from zocalo.service.dispatcher import Dispatcher

import zocalo_xrc as zx
from test_service import recipe
from test_service_assembly import CASE_2D
from test_transport import eventually
from zocalo_xrc.local.host import ServiceStartError, ServiceThread, isolate_transport_tables
from zocalo_xrc.messaging import InProcessBroker, InProcessTransport, QueueSpec
from zocalo_xrc.messaging.workflows_inprocess import InProcessWorkflowsTransport
from zocalo_xrc.service.workflows_service import XRayCenteringGPU

PIKA_HEADER_KEYS = {"consumer_tag", "delivery_mode", "exchange", "message-id", "redelivered", "routing_key",
                    "subscription"}


@pytest.fixture
def broker():
    b = InProcessBroker()
    yield b
    b.close()


@pytest.fixture
def connect(broker):
    """Connected workflows transports to the test's broker, disconnected at the end."""
    made = []

    def connect(**kwargs):
        t = InProcessWorkflowsTransport(broker, **kwargs)
        assert t.connect() and t.is_connected()
        made.append(t)
        return t

    yield connect
    for t in made:
        t.disconnect()


def work_queue(broker, name):
    """A queue dead-lettering to dlq.<name>, as the deployment declares it."""
    broker.declare_queue(name, dead_letter_to=broker.declare_queue(f"dlq.{name}"))
    return name


def receiver(t, name, **kwargs):
    got = queue.Queue()
    sub = t.subscribe(name, lambda header, message: got.put((header, message)), **kwargs)
    return sub, got


def nothing_more(got, wait=0.2):
    with pytest.raises(queue.Empty):
        got.get(timeout=wait)
    return True


# ---- the transport ----------------------------------------------------------

def test_a_recipe_wrapper_send_reaches_wrap_subscribe_with_pikas_headers(broker, connect):
    work_queue(broker, "step.a")
    work_queue(broker, "step.b")
    sender, consumer = connect(), connect()
    r = {"1": {"queue": "step.a", "output": 2}, "2": {"queue": "step.b", "parameters": {"p": 1}},
         "start": [[1, []]]}
    wrapper = workflows.recipe.RecipeWrapper(
        message={"environment": {"ID": "guid-1"}, "recipe": r, "recipe-path": [], "recipe-pointer": 1,
                 "payload": None}, transport=sender)
    wrapper.send({"n": 42})
    got = queue.Queue()
    workflows.recipe.wrap_subscribe(consumer, "step.b", lambda rw, header, message: got.put((rw, header, message)),
                                    acknowledgement=True)
    rw, header, message = got.get(timeout=5)
    assert message == {"n": 42}
    assert rw.recipe_step == r["2"] and rw.environment == {"ID": "guid-1"} and rw.recipe_path == [1]
    assert set(header) == PIKA_HEADER_KEYS | {"workflows-recipe"}
    assert header["workflows-recipe"] is True and header["message-id"] == 1 and header["subscription"] == 1
    assert (header["exchange"], header["routing_key"], header["redelivered"]) == ("", "step.b", False)
    consumer.ack(header)
    assert eventually(lambda: broker.message_count("step.b") == 0)
    consumer.disconnect()  # an acked message does not come back
    consumer.connect()
    _, again = receiver(consumer, "step.b", acknowledgement=True)
    assert nothing_more(again)


def test_the_broker_says_which_exchanges_exist_and_holds_still_when_asked(broker):
    """The two faces the workflows transport uses: no reaching into the broker."""
    assert broker.exchange_exists("") and not broker.exchange_exists("results")
    broker.declare_exchange("results")
    assert broker.exchange_exists("results")
    work_queue(broker, "step.a")
    got = queue.Queue()
    sub = InProcessTransport(broker).subscribe(QueueSpec("step.a"), got.put)
    other = threading.Thread(target=lambda: broker.publish("", "step.a", b"theirs", {}))
    with broker.atomically():
        broker.publish("", "step.a", b"one", {})  # the broker's own calls work inside
        other.start()
        assert nothing_more(got, 0.3)  # held still: nothing handed out, the other thread's publish waits
        broker.publish("", "step.a", b"two", {})
        assert broker.message_count("step.a") == 2
    other.join(5)
    assert [got.get(timeout=5).body for _ in range(3)] == [b"one", b"two", b"theirs"]
    sub.cancel()


def test_nack_requeues_by_default_as_pika_does_until_the_delivery_limit(broker, connect):
    q = work_queue(broker, "nacked")
    t = connect(delivery_limit=2)
    t.send(q, {"x": 1})
    _, got = receiver(t, q, acknowledgement=True)
    seen = []
    for _ in range(3):
        header, message = got.get(timeout=5)
        seen.append((header["redelivered"], header.get("x-delivery-count")))
        t.nack(header)
    assert seen == [(False, None), (True, 1), (True, 2)]
    assert nothing_more(got)
    assert eventually(lambda: broker.message_count(f"dlq.{q}") == 1)


def test_nack_without_requeue_dead_letters_and_ack_works_by_header(broker, connect):
    q = work_queue(broker, "rejected")
    t = connect()
    t.send(q, {"bad": True})
    t.send(q, {"good": True})
    _, got = receiver(t, q, acknowledgement=True, prefetch_count=2)
    first, second = got.get(timeout=5), got.get(timeout=5)
    t.nack(first[0], requeue=False)
    t.ack(second[0])
    assert eventually(lambda: broker.message_count(f"dlq.{q}") == 1)
    _, dead = receiver(t, f"dlq.{q}", acknowledgement=True)
    header, message = dead.get(timeout=5)
    assert message == {"bad": True}  # with the headers RabbitMQ adds
    assert (header["x-first-death-queue"], header["x-first-death-reason"]) == (q, "rejected")
    assert [(d["queue"], d["reason"], d["count"]) for d in header["x-death"]] == [(q, "rejected", 1)]
    with pytest.raises(workflows.Error, match="unknown delivery tag 2"):
        t.ack(second[0])  # RabbitMQ would close the channel


def test_a_transaction_acks_and_sends_at_commit_all_at_once(broker, connect):
    q_in, q_out = work_queue(broker, "tx.in"), work_queue(broker, "tx.out")
    t = connect()
    t.send(q_in, {"k": 1})
    t.send(q_in, {"k": 2})
    sub, got = receiver(t, q_in, acknowledgement=True, prefetch_count=1)  # the second waits for the first's ack
    header, _ = got.get(timeout=5)
    seen_at_first = []
    InProcessTransport(broker).subscribe(QueueSpec(q_out), lambda d: (
        seen_at_first.append(broker.message_count(q_out)) if not seen_at_first else None, d.ack()))

    txn = t.transaction_begin(subscription_id=sub)
    with pytest.raises(workflows.Error, match="Transaction state mismatch"):
        t.ack(header)  # as pika: the subscription's channel is in a transaction
    t.ack(header, transaction=txn)
    for k in range(3):
        t.send(q_out, {"out": k}, transaction=txn)
    t.send("no.such.queue", {"dropped": True}, transaction=txn)  # unroutable: dropped at commit, as pika
    time.sleep(0.2)
    assert broker.message_count(q_out) == 0 and not seen_at_first and nothing_more(got, 0)
    t.transaction_commit(txn)
    assert got.get(timeout=5)[1] == {"k": 2}  # the ack took effect
    assert eventually(lambda: seen_at_first == [2])  # the three were there together when the first was delivered
    assert eventually(lambda: broker.message_count(q_out) == 0)


def test_an_aborted_transaction_sends_nothing_and_its_acks_are_undone(broker, connect):
    q_in, q_out = work_queue(broker, "abort.in"), work_queue(broker, "abort.out")
    t = connect()
    t.send(q_in, {"k": 1})
    t.send(q_in, {"k": 2})
    sub, got = receiver(t, q_in, acknowledgement=True, prefetch_count=1)
    header, _ = got.get(timeout=5)
    txn = t.transaction_begin(subscription_id=sub)
    t.ack(header, transaction=txn)
    t.send(q_out, {"never": True}, transaction=txn)
    t.transaction_abort(txn)
    assert nothing_more(got) and broker.message_count(q_out) == 0
    t.ack(header)  # still held, as on RabbitMQ: acked now
    assert got.get(timeout=5)[1] == {"k": 2}
    with pytest.raises(KeyError, match="Could not find transaction"):
        t._transaction_commit(txn)


def test_one_transaction_per_channel_and_the_shared_one(broker, connect):
    q, out = work_queue(broker, "channels"), work_queue(broker, "channels.out")
    t = connect()
    sub, _ = receiver(t, q, acknowledgement=True)
    t.transaction_begin(subscription_id=sub)
    with pytest.raises(KeyError, match="already running transaction"):
        t.transaction_begin(subscription_id=sub)
    shared = t.transaction_begin()
    t.send(out, {"in": "shared"}, transaction=shared)
    with pytest.raises(KeyError, match="already running transaction"):
        t.transaction_begin()
    with pytest.raises(workflows.Error, match="NOT_FOUND - no exchange 'nowhere'"):
        t.send("x", {}, exchange="nowhere", transaction=shared)
    assert broker.message_count(out) == 0
    t.transaction_commit(shared)
    assert broker.message_count(out) == 1


def test_a_delayed_send_arrives_no_earlier_than_the_delay(broker, connect):
    q = work_queue(broker, "later")
    t = connect()
    _, got = receiver(t, q)
    sent = time.monotonic()
    t.send(q, {"late": True}, delay=0.5)
    header, message = got.get(timeout=5)
    assert time.monotonic() - sent >= 0.5
    assert message == {"late": True} and header["x-delay"] == 500
    txn = t.transaction_begin()  # in a transaction, the delay starts at commit
    t.send(q, {"later": True}, transaction=txn, delay=0.3)
    time.sleep(0.4)
    committed = time.monotonic()
    t.transaction_commit(txn)
    assert got.get(timeout=5)[1] == {"later": True} and time.monotonic() - committed >= 0.3


def test_an_expired_message_is_dead_lettered_not_delivered(broker, connect):
    q = work_queue(broker, "expiring")
    t = connect()
    t.send(q, {"stale": True}, expiration=0.1)
    t.send(q, {"fresh": True}, expiration=60)
    time.sleep(0.3)
    _, got = receiver(t, q, acknowledgement=True)
    header, message = got.get(timeout=5)
    assert message == {"fresh": True}
    t.ack(header)
    assert nothing_more(got)
    assert eventually(lambda: broker.message_count(f"dlq.{q}") == 1)


def test_broadcasts_reach_every_subscriber(broker, connect):
    broker.declare_exchange("transient.status")
    a, b, sender = connect(), connect(), connect()
    sender.broadcast("transient.status", {"nobody": "listens"})  # dropped, no error
    got_a, got_b = queue.Queue(), queue.Queue()
    a.subscribe_broadcast("transient.status", lambda h, m: got_a.put((h, m)))
    b.subscribe_broadcast("transient.status", lambda h, m: got_b.put((h, m)))
    sender.broadcast_status({"host": "here", "workflows": workflows.version(), "status": 2})
    for got in (got_a, got_b):
        header, message = got.get(timeout=5)
        assert message["host"] == "here" and message["status"] == 2
        assert set(header) == PIKA_HEADER_KEYS
        assert (header["exchange"], header["routing_key"]) == ("transient.status", "")
        assert nothing_more(got, 0.05)
    with pytest.raises(workflows.Disconnected, match="NOT_FOUND - no exchange 'nothing.here'"):
        a.subscribe_broadcast("nothing.here", lambda h, m: None)


def test_temporary_queues_are_named_from_the_hint_and_go_at_unsubscribe(broker, connect):
    t = connect()
    got = queue.Queue()
    sub = t.subscribe_temporary("replies", lambda h, m: got.put((h, m)))
    assert sub.queue_name.startswith("transient.replies.")
    connect().send(sub.queue_name, {"reply": 1})
    header, message = got.get(timeout=5)
    assert message == {"reply": 1} and header["routing_key"] == sub.queue_name
    t.unsubscribe(sub.subscription_id)
    assert not broker.queue_exists(sub.queue_name)


def test_our_transport_reads_what_workflows_sends_and_the_other_way_round(broker, connect):
    q = work_queue(broker, "both.ways")
    broker.declare_exchange("results")
    broker.bind(q, "results", "xrc.#")
    wt, ours = connect(), InProcessTransport(broker)
    read = queue.Queue()
    ours.subscribe(QueueSpec(q), read.put)
    wt.send("xrc.i03", {"r": [1, 2]}, headers={"workflows-recipe": True, "n": 3}, exchange="results")
    d = read.get(timeout=5)
    assert d.body == json.dumps({"r": [1, 2]}).encode() and dict(d.headers) == {"workflows-recipe": True, "n": 3}
    assert (d.exchange, d.routing_key, d.message_id) == ("results", "xrc.i03", None)  # pika sets no message id
    d.ack()
    ours.close()

    _, got = receiver(wt, q, acknowledgement=True)
    ours = InProcessTransport(broker)
    ours.publish("", q, b'{"from": "ours"}', {"workflows-recipe": True}).result(5)
    header, message = got.get(timeout=5)
    assert message == {"from": "ours"} and header["workflows-recipe"] is True
    wt.ack(header)


def test_unroutable_sends_are_dropped_as_pika_drops_them_and_missing_things_raise(broker, connect, caplog):
    t = connect()
    t.send("no.such.queue", {"lost": True})  # no error: PikaTransport never hears the broker's return
    assert any("no queue took a message for queue 'no.such.queue'" in r.getMessage() for r in caplog.records)
    with pytest.raises(workflows.Error, match="NOT_FOUND - no exchange 'nowhere'"):
        t.send("x", {}, exchange="nowhere")
    with pytest.raises(workflows.Disconnected, match="NOT_FOUND - no queue 'no.such.queue'"):
        t.subscribe("no.such.queue", lambda h, m: None)
    assert t.is_connected()
    t.disconnect()
    with pytest.raises(workflows.Disconnected):
        t.send("x", {})


def test_two_transports_in_one_process_keep_their_own_subscriptions(broker, connect):
    """CommonTransport's subscription table is shared by the class; each
    transport here has its own, so both subscription 1s keep their callbacks."""
    work_queue(broker, "one")
    work_queue(broker, "two")
    a, b = connect(), connect()
    _, got_a = receiver(a, "one")
    _, got_b = receiver(b, "two")
    a.send("one", "for a")
    a.send("two", "for b")
    (header_a, message_a), (header_b, message_b) = got_a.get(timeout=5), got_b.get(timeout=5)
    assert (message_a, message_b) == ("for a", "for b")
    assert header_a["subscription"] == header_b["subscription"] == 1
    assert nothing_more(got_a) and nothing_more(got_b, 0)


def test_any_workflows_transport_can_get_tables_of_its_own(broker):
    shared = vars(CommonTransport)["_CommonTransport__subscriptions"]
    t = OfflineTransport()
    assert t._CommonTransport__subscriptions is shared  # workflows' own: one table for the process
    isolate_transport_tables(t)
    assert t._CommonTransport__subscriptions == {} and t._CommonTransport__subscriptions is not shared
    assert vars(InProcessWorkflowsTransport(broker))["_CommonTransport__subscriptions"] is not shared


def test_unsubscribe_hands_unacked_messages_back(broker, connect):
    q = work_queue(broker, "handback")
    t = connect()
    t.send(q, {"k": 1})
    sub, got = receiver(t, q, acknowledgement=True)
    header, _ = got.get(timeout=5)
    t.unsubscribe(sub)
    with pytest.raises(KeyError, match=f"Could not find subscription {sub} to ACK"):
        t.ack(header)
    _, again = receiver(t, q, acknowledgement=True)
    header, message = again.get(timeout=5)
    assert message == {"k": 1} and header["redelivered"] is True
    t.ack(header)


# ---- services in threads ----------------------------------------------------

def zocalo_config(**storage):
    lines = ["version: 1", "store:", "  plugin: storage",
             *(f"  {key}: {value}" for key, value in storage.items()),
             "environments:", "  local: [store]"]
    config = zocalo.configuration.from_string("\n".join(lines) + "\n")
    config.activate_environment("local")
    return config


def test_zocalos_dispatcher_in_a_thread_starts_a_recipe(broker, connect, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="zocalo.service.dispatcher")
    broker.declare_queue("processing_recipe")
    work_queue(broker, "first.step")
    work_queue(broker, "second.step")
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "myrecipe.json").write_text(json.dumps({
        "1": {"service": "First", "queue": "first.step", "parameters": {"x": "{x}", "guid": "{guid}"}, "output": 2},
        "2": {"service": "Second", "queue": "second.step"},
        "start": [[1, []]],
    }))
    config = zocalo_config(**{"zocalo.recipe_directory": recipes,
                              "zocalo.dispatcher.logbook_location": tmp_path / "logbook"})
    with ServiceThread(Dispatcher, InProcessWorkflowsTransport(broker), environment={"config": config}) as dispatcher:
        assert dispatcher.alive and dispatcher.status == CommonService.SERVICE_STATUS_IDLE
        t = connect()
        got = queue.Queue()
        workflows.recipe.wrap_subscribe(t, "first.step", lambda rw, h, m: got.put((rw, h)), acknowledgement=True)
        t.send("processing_recipe", {"recipes": ["myrecipe"], "parameters": {"x": 5}})
        rw, header = got.get(timeout=5)
        t.ack(header)
        guid = rw.environment["ID"]
        assert rw.recipe_step["queue"] == "first.step"
        assert rw.recipe_step["parameters"] == {"x": "5", "guid": guid} and len(guid) == 36
        assert eventually(lambda: broker.message_count("processing_recipe") == 0)
        (entry,) = (p for p in (tmp_path / "logbook").rglob("*") if p.is_file())
        assert (entry.parent.name, entry.name) == (guid[:2], guid[2:])
        assert '"myrecipe"' in entry.read_text()
    assert not dispatcher.alive and dispatcher.error is None
    # its records went to Python logging, once each, and the test's handler is still there
    starting = [r for r in caplog.records if r.getMessage() == "Dispatcher starting"]
    assert len(starting) == 1 and starting[0].name == "zocalo.service.dispatcher"
    (processed,) = (r for r in caplog.records if r.getMessage().startswith("Processed incoming message"))
    assert processed.recipe_ID == guid  # what the dispatcher's extend_log adds, as through a frontend
    assert caplog.handler in logging.getLogger().handlers


def test_the_dispatcher_dead_letters_a_message_it_cannot_read(broker, tmp_path):
    broker.declare_queue("processing_recipe", dead_letter_to=broker.declare_queue("dlq.processing_recipe"))
    config = zocalo_config(**{"zocalo.recipe_directory": tmp_path})
    with ServiceThread(Dispatcher, InProcessWorkflowsTransport(broker, delivery_limit=1),
                       environment={"config": config}):
        InProcessTransport(broker).publish("", "processing_recipe", b'{"recipes": ["no-such-recipe"]}', {})
        # the dispatcher nacks it (requeue, pika's default); past the delivery limit it is dead-lettered
        assert eventually(lambda: broker.message_count("dlq.processing_recipe") == 1)


def test_our_xrc_service_in_a_thread_centres_a_2d_scan(broker, connect, unique):
    ours = InProcessTransport(broker)
    ours.declare_work_queue(XRayCenteringGPU.queue)
    ours.declare_results_queue(f"xrc.{unique}")
    with ServiceThread(XRayCenteringGPU, InProcessWorkflowsTransport(broker)) as service:
        grid = {"dcid": 555, "counts": CASE_2D["counts"], "gridinfo": CASE_2D["gridinfo"]}
        r = recipe({"dcid": "555", "dcg_dcids": None, "experiment_type": "Mesh", "beamline": "i03"},
                   grid["gridinfo"], unique)
        r["2"]["queue"] = XRayCenteringGPU.queue
        wrapper = workflows.recipe.RecipeWrapper(
            message={"environment": {"ID": "env-555"}, "recipe": r, "recipe-path": [], "recipe-pointer": 1,
                     "payload": None}, transport=connect())
        for k, n in enumerate(grid["counts"], 1):
            wrapper.send({"file-number": k, "n_spots_total": n, "file-seen-at": time.time()})
        with zx.ZocaloResults2D(ours, beamline=unique, source=zx.Source.GPU, timeout_s=10) as reader:
            (result,) = reader.trigger(dcids=555)
        assert result == zx.centre_2d(CASE_2D["counts"], zx.GridInfo.from_ispyb(CASE_2D["gridinfo"]))
        assert service.service.xrc.completed == 1
        assert eventually(lambda: broker.message_count(XRayCenteringGPU.queue) == 0)
    assert broker.message_count(f"dlq.{XRayCenteringGPU.queue}") == 0 and service.error is None


class Broken(CommonService):
    _service_name = "broken on purpose"

    def initializing(self):
        raise ValueError("no detector configured")


def test_a_service_that_fails_to_initialize_says_why(broker):
    thread = ServiceThread(Broken, InProcessWorkflowsTransport(broker))
    with pytest.raises(ServiceStartError, match="broken on purpose failed to start: ValueError: no detector"):
        thread.start()
    assert not thread.alive and thread.error == "ValueError: no detector configured"
    assert thread.status == CommonService.SERVICE_STATUS_ERROR
    assert not thread.transport.is_connected()  # it stopped its transport on the way out


class Ticking(CommonService):
    """Sends a message from its idle timer, on its own thread; stops itself when told to."""

    _service_name = "ticking"

    def initializing(self):
        self.ticks = 0
        self._register_idle(0.05, self.tick)
        self._transport.subscribe("stop.ticking", lambda header, message: self._request_termination())

    def tick(self):
        self.ticks += 1
        self._transport.send("ticks", {"tick": self.ticks, "thread": threading.current_thread().name})


def test_stop_start_and_a_service_asking_to_end(broker, connect):
    work_queue(broker, "ticks")
    work_queue(broker, "stop.ticking")
    t = connect()
    _, got = receiver(t, "ticks")
    thread = ServiceThread(Ticking, InProcessWorkflowsTransport(broker), name="ticker")
    thread.start()
    header, message = got.get(timeout=5)
    assert message["thread"] == "workflows service: ticker"
    thread.stop()
    assert not thread.alive and thread.error is None and thread.status == CommonService.SERVICE_STATUS_END
    with pytest.raises(RuntimeError, match="started already"):
        thread.start()
    with pytest.raises(ValueError, match="already serves a service"):
        ServiceThread(Ticking, thread.transport)

    again = ServiceThread(Ticking, InProcessWorkflowsTransport(broker)).start()
    assert eventually(lambda: again.service.ticks > 0)
    t.send("stop.ticking", {})
    assert eventually(lambda: not again.alive)
    assert again.status == CommonService.SERVICE_STATUS_END
