"""Connection settings: zocalo YAML, amqp URLs, and passwords kept out of sight."""

import logging
from pathlib import Path

import pytest

import zocalo_xrc as zx
from zocalo_xrc.messaging.rabbitmq import AmqpTransport

SECRET = "s3cr3t-Pa55"


def test_from_url():
    s = zx.ConnectionSettings.from_url(f"amqp://gda:{SECRET}@rabbit.example:5673/zocalo")
    assert (s.host, s.port, s.username, s.vhost, s.tls) == ("rabbit.example", 5673, "gda", "zocalo", False)
    assert s.password.reveal() == SECRET
    assert zx.ConnectionSettings.from_url("amqps://h").port == 5671
    assert zx.ConnectionSettings.from_url("amqp://h/%2F").vhost == "/"
    assert zx.ConnectionSettings.from_url("amqp://h").vhost == "/"
    assert zx.ConnectionSettings.from_url("amqp://u:p%40ss@h").password.reveal() == "p@ss"


@pytest.mark.parametrize("url", [f"http://u:{SECRET}@h/", f"amqp://u:{SECRET}@h:notaport/", "amqp://u@h:99999/"])
def test_bad_urls_hide_the_password(url):
    with pytest.raises(zx.ConfigurationError) as e:
        zx.ConnectionSettings.from_url(url)
    assert SECRET not in str(e.value)


def test_password_never_shows():
    s = zx.ConnectionSettings.from_url(f"amqp://gda:{SECRET}@rabbit.example:5673/zocalo")
    for text in (repr(s), str(s), s.url(), repr(s.password), str(s.password), f"{s}"):
        assert SECRET not in text
    assert s.url() == "amqp://gda@rabbit.example:5673/zocalo"


def test_the_client_objects_say_where_they_talk_to_without_the_password():
    url = f"amqp://gda:{SECRET}@rabbit.example:5673/zocalo"
    where = "RabbitMQ at amqp://gda@rabbit.example:5673/zocalo"
    trigger = zx.ZocaloTrigger(url, timeout_s=5.0)
    assert repr(trigger) == (f"<ZocaloTrigger: start/end of recipe 'mimas' to processing_recipe on {where}, "
                             "each confirmed by the broker within 5.0 s>")
    with zx.ZocaloResults(url, beamline="i04") as results, zx.ZocaloResults2D(url, private_queue=True) as private:
        assert repr(results) == (f"<ZocaloResults: 3d results from queue 'xrc.i04' on {where}, "
                                 "idle (a trigger waits up to 180.0 s)>")
        assert repr(private).startswith("<ZocaloResults2D: 2d results from a private queue bound to 'xrc.i03' on ")
        assert not any(SECRET in text for o in (trigger, results, private) for text in (repr(o), str(o)))


def write(path, text):
    path.write_text(text)
    return path


def zocalo_reads(path, environment, monkeypatch):
    """What zocalo itself makes of a configuration: the settings its pika
    plugin gives workflows' PikaTransport once the environment is active."""
    import zocalo.configuration
    from workflows.transport.pika_transport import PikaTransport

    monkeypatch.setattr(PikaTransport, "defaults", {})
    config = zocalo.configuration.from_file(str(path))
    config.activate_environment(environment)
    d = PikaTransport.defaults
    return (d["--rabbit-host"], int(d["--rabbit-port"]), d["--rabbit-user"], d["--rabbit-pass"], d["--rabbit-vhost"])


def ours(path, environment):
    s = zx.ConnectionSettings.from_zocalo_config(environment, path)
    return (s.host, s.port, s.username, s.password.reveal(), s.vhost)


# The four layouts zocalo accepts, as Diamond's deployments write them.
LAYOUTS = {
    "list": ("dev_bluesky", """
version: 1
rabbit-test: {plugin: pika, host: 127.0.0.1, port: 5672, username: guest, password: s3cr3t-Pa55, vhost: /}
storage: {plugin: storage, zocalo.default.queue: processing_recipe}
environments:
  dev_bluesky: [storage, rabbit-test]
"""),
    # Hyperion's production ConfigMap: the environment names its groups, the
    # credentials live in a file of their own (an absolute path there).
    "mapping": ("bluesky", """
version: 1
rabbitmq: {secrets}
default-transport:
  plugin: transport
  default: PikaTransport
environments:
  bluesky:
    plugins:
      - default-transport
      - rabbitmq
"""),
    "alias": ("default", """
version: 1
rmq-dev: {plugin: pika, host: dev-rabbit.example, port: 5672, username: dev, password: s3cr3t-Pa55, vhost: dev}
rmq-live: {plugin: pika, host: rabbit.example, port: "5673", username: gda, password: s3cr3t-Pa55, vhost: zocalo}
environments:
  default: bluesky
  bluesky: dev_bluesky
  dev_bluesky: [rmq-live, rmq-dev]
"""),
    "file": ("dev_bluesky", """
version: 1.0
rabbitmq: secrets/rabbitmq-credentials.yml
environments:
  dev_bluesky:
    zz-late: [rabbitmq]
    plugins: rabbitmq
"""),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_reads_as_zocalo_reads_it(layout, tmp_path, monkeypatch):
    environment, text = LAYOUTS[layout]
    secrets = write_secrets(tmp_path)
    main = write(tmp_path / "zocalo.yml", text.replace("{secrets}", str(secrets)))
    assert ours(main, environment) == zocalo_reads(main, environment, monkeypatch)
    assert ours(main, environment)[3] == SECRET


def write_secrets(tmp_path):
    (tmp_path / "secrets").mkdir()
    return write(tmp_path / "secrets" / "rabbitmq-credentials.yml",
                 f"plugin: pika\nhost: 127.0.0.2\nport: 5674\nusername: hyperion\npassword: {SECRET}\nvhost: i03\n")


def test_the_last_pika_block_counts_and_groups_come_in_zocalo_order(tmp_path, monkeypatch):
    write_secrets(tmp_path)
    main = write(tmp_path / "z.yml", f"""
version: 1
a: {{plugin: pika, host: a.example, port: 1, username: a, password: {SECRET}, vhost: a}}
b: {{plugin: pika, host: b.example, port: 2, username: b, password: {SECRET}, vhost: b}}
c: secrets/rabbitmq-credentials.yml
environments:
  e: {{plugins: [a], beta: [c, b], alpha: b}}
""")
    # groups alpha, beta, then plugins: b, c, a; a comes last and wins
    assert ours(main, "e") == zocalo_reads(main, "e", monkeypatch) == ("a.example", 1, "a", SECRET, "a")


def test_default_environment_is_dodals(tmp_path, monkeypatch):
    main = write(tmp_path / "z.yml", f"""
version: 1
live: {{plugin: pika, host: live.example, port: 5672, username: u, password: {SECRET}, vhost: /}}
test: {{plugin: pika, host: test.example, port: 5672, username: u, password: {SECRET}, vhost: /}}
environments: {{bluesky: [live], dev_bluesky: [test]}}
""")
    monkeypatch.setenv("ZOCALO_CONFIG", str(main))
    monkeypatch.delenv("DODAL_TEST_MODE", raising=False)
    assert zx.ConnectionSettings.from_zocalo_config().host == "live.example"
    assert "live.example" in zx.ZocaloTrigger().broker
    monkeypatch.setenv("DODAL_TEST_MODE", "true")
    assert zx.ConnectionSettings.from_zocalo_config().host == "test.example"
    assert "test.example" in zx.ZocaloResults().broker


PIKA = f"{{plugin: pika, host: h, port: 1, username: u, password: {SECRET}, vhost: /}}"


@pytest.mark.parametrize(
    "text, words",
    [
        ("environments: {x: [a]}\n", "no 'version: 1'"),
        ("version: 2\nenvironments: {x: [a]}\n", "version 2; only version 1"),
        (f"version: 1\na: {PIKA}\nenvironments: {{x: [a]}}\n", "no environment 'dev_bluesky' (known: x)"),
        ("version: 1\nenvironments: {dev_bluesky: [a]}\n", "names 'a', which is not defined"),
        (f"version: 1\na: {PIKA}\nenvironments: {{dev_bluesky: [a], other: [b]}}\n", "'other' names 'b', which is not"),
        ("version: 1\na: {plugin: graylog}\nenvironments: {dev_bluesky: [a]}\n", "has no pika plugin block"),
        ("version: 1\na: missing.yml\nenvironments: {dev_bluesky: [a]}\n", "cannot read zocalo configuration"),
        (f"version: 1\na: {PIKA}\nb: {{host: h}}\nenvironments: {{dev_bluesky: [a]}}\n", "'b' lacks the mandatory 'plugin'"),
        ("version: 1\nenvironments: {dev_bluesky: other}\n", "aliases undefined environment 'other'"),
        (f"version: 1\na: {PIKA}\nenvironments: {{dev_bluesky: [a], x: nope}}\n", "'x' aliases undefined environment"),
        ("version: 1\nenvironments: {dev_bluesky: x, x: dev_bluesky}\n", "alias each other in a loop"),
        ("version: 1\nenvironments: {dev_bluesky: 3}\n", "is not a list, a mapping or an alias"),
        ("version: 1\nenvironments: {dev_bluesky: {plugins: {a: 1}}}\n", "is not a name or a list of names"),
        (f"version: 1\na: {{plugin: pika, host: h, port: 1, password: {SECRET}}}\nenvironments: {{dev_bluesky: [a]}}\n",
         "pika block 'a' lacks username, vhost"),
        (f"version: 1\na: {PIKA}\nb: {{plugin: pika, host: h, port: 1, username: u, password: {SECRET}}}\n"
         "environments: {dev_bluesky: [a]}\n", "pika block 'b' lacks vhost"),
        ("version: 1\na: {plugin: pika, host: h, port: 1, username: u, password: 1234, vhost: /}\n"
         "environments: {dev_bluesky: [a]}\n", "password must be a string"),
    ],
)
def test_bad_zocalo_yaml_is_refused_as_zocalo_refuses_it(tmp_path, text, words, monkeypatch):
    path = write(tmp_path / "z.yml", text)
    with pytest.raises(zx.ConfigurationError) as e:
        zx.ConnectionSettings.from_zocalo_config("dev_bluesky", path=path)
    assert words in str(e.value) and SECRET not in str(e.value)
    with pytest.raises(Exception):  # zocalo too: reading, activating, or no pika settings at all
        assert zocalo_reads(path, "dev_bluesky", monkeypatch)


@pytest.mark.parametrize(
    "text, words",
    [
        ("[1, 2", "not valid YAML"),
        ("- 1\n", "expected a mapping"),
        (f"version: 1\na: {{plugin: pika, host: h, port: x, username: u, password: {SECRET}, vhost: /}}\n"
         f"environments: {{dev_bluesky: [a]}}\n", "bad pika settings"),
        (f"version: 1\na: {{plugin: pika, host: 'h1,h2', port: 1, username: u, password: {SECRET}, vhost: /}}\n"
         f"environments: {{dev_bluesky: [a]}}\n", "several hosts"),
    ],
)
def test_what_zocalo_xrc_cannot_use(tmp_path, text, words):
    with pytest.raises(zx.ConfigurationError) as e:
        zx.ConnectionSettings.from_zocalo_config("dev_bluesky", path=write(tmp_path / "z.yml", text))
    assert words in str(e.value) and SECRET not in str(e.value)


def test_no_configuration_is_an_error_at_construction_not_a_silent_broker(monkeypatch):
    monkeypatch.delenv("ZOCALO_CONFIG", raising=False)
    monkeypatch.delenv("DODAL_TEST_MODE", raising=False)
    for make in (zx.ZocaloTrigger, zx.ZocaloResults, zx.ZocaloResults2D):
        with pytest.raises(zx.ConfigurationError, match="no zocalo configuration for environment 'bluesky': set ZOCALO_CONFIG"):
            make()
    with pytest.raises(zx.ConfigurationError, match="'nowhere'"):
        zx.ZocaloTrigger("nowhere")


def test_an_unknown_environment_is_an_error_at_construction(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOCALO_CONFIG", str(write(tmp_path / "z.yml", "version: 1\nenvironments: {x: []}\n")))
    with pytest.raises(zx.ConfigurationError, match="no environment 'dev_bluseky' \\(known: x\\)"):
        zx.ZocaloResults("dev_bluseky")


def test_the_in_process_broker_only_when_asked_for(monkeypatch):
    monkeypatch.delenv("ZOCALO_CONFIG", raising=False)
    trigger = zx.ZocaloTrigger("in-process")
    assert isinstance(trigger.transport, zx.InProcessTransport) and trigger.broker == "the in-process broker"
    assert zx.ZocaloTrigger(zx.IN_PROCESS).transport.broker is trigger.transport.broker


def test_the_shipped_example_configuration(monkeypatch):
    example = Path(__file__).resolve().parent.parent / "docs" / "zocalo-config.example.yml"
    for environment in ("dev_bluesky", "bluesky", "default"):
        assert ours(example, environment) == zocalo_reads(example, environment, monkeypatch)


def test_wrong_password_is_a_clear_error_without_the_password(rabbit, caplog):
    if rabbit.close_all_connections is None:
        pytest.skip("external broker")
    url = rabbit.url.replace("guest:guest", f"guest:{SECRET}")
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(zx.TransportError) as e:
            AmqpTransport(zx.ConnectionSettings.from_url(url), connect_timeout=20)
    assert "ACCESS_REFUSED" in str(e.value) or "Authentication" in str(e.value)
    assert SECRET not in str(e.value)
    assert all(SECRET not in r.getMessage() for r in caplog.records)


def test_unreachable_broker(caplog):
    import rabbitmq

    url = f"amqp://guest:{SECRET}@127.0.0.1:{rabbitmq.free_port()}/"
    with pytest.raises(zx.TransportError, match="cannot connect to amqp://guest@127.0.0.1"):
        AmqpTransport(zx.ConnectionSettings.from_url(url), connect_timeout=10)


def test_environment_names_and_urls_resolve_to_one_shared_connection(rabbit, tmp_path, monkeypatch):
    settings = zx.ConnectionSettings.from_url(rabbit.url)
    write(tmp_path / "z.yml", f"version: 1\nr: {{plugin: pika, host: 127.0.0.1, port: {settings.port}, username: guest, "
                              f"password: guest, vhost: /}}\nenvironments: {{dev_bluesky: [r]}}\n")
    monkeypatch.setenv("ZOCALO_CONFIG", str(tmp_path / "z.yml"))
    by_env = zx.ZocaloTrigger("dev_bluesky").transport
    by_url = zx.ZocaloResults(rabbit.url).transport
    monkeypatch.setenv("DODAL_TEST_MODE", "true")
    by_default = zx.ZocaloTrigger().transport
    assert by_env is by_url is by_default
    assert isinstance(by_env, AmqpTransport) and SECRET not in repr(by_env)
    by_env.close()


def test_passwords_with_url_characters_parse():
    for password in ("pa/ss", "p#ss", "p?ss", "p@ss:word", "p%40ss"):
        s = zx.ConnectionSettings.from_url(f"amqp://gda:{password}@rabbit.example:5673/zocalo")
        assert (s.host, s.port, s.username, s.vhost) == ("rabbit.example", 5673, "gda", "zocalo")
        assert s.password.reveal() == password.replace("%40", "@")
    assert zx.ConnectionSettings.from_url(f"AMQPS://gda:{SECRET}@h/").tls


def secret_free_traceback(make):
    """``make()`` fails with a ConfigurationError that shows no password,
    not even in the locals of its traceback's frames."""
    import traceback

    with pytest.raises(zx.ConfigurationError) as e:
        make()
    text = "".join(traceback.TracebackException.from_exception(e.value, capture_locals=True).format())
    assert SECRET not in text and SECRET not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("url", [
    "AMQP:/u:{}@h", "amqp:/u:{}@h/", "amqp//u:{}@h", "http://u:{}@h/", "amqp://u:{}@h:notaport/", "amqp://u:{}@h:99999/",
])
def test_a_mistyped_url_never_shows_its_password(url, tmp_path, monkeypatch):
    monkeypatch.setenv("ZOCALO_CONFIG", str(write(tmp_path / "z.yml", "version: 1\nenvironments: {}\n")))
    for make in (zx.ZocaloTrigger, zx.ZocaloResults, zx.ConnectionSettings.from_url):
        message = secret_free_traceback(lambda: make(url.format("s3cr3t-" + "Pa55")))
        assert "********" in message


def test_object_state_holds_no_password():
    trigger = zx.ZocaloTrigger(f"amqp://gda:{SECRET}@rabbit.example/zocalo")
    for text in (repr(vars(trigger)), repr(trigger.broker), str(vars(zx.ZocaloResults(f"amqp://gda:{SECRET}@h/")))):
        assert SECRET not in text


def test_a_wrong_password_does_not_ride_on_a_good_connection(rabbit):
    if rabbit.close_all_connections is None:
        pytest.skip("external broker")
    good = zx.ZocaloTrigger(rabbit.url)
    good.transport.declare_queue("processing_recipe")
    bad = zx.ZocaloTrigger(rabbit.url.replace("guest:guest", f"guest:{SECRET}"), timeout_s=30)
    try:
        assert bad.transport is not good.transport
        with pytest.raises(zx.TransportError, match="ACCESS_REFUSED") as e:
            bad.run_end(1)  # at once, not after 30 s
        assert SECRET not in str(e.value)
    finally:
        bad.transport.close()
