"""Connection settings: zocalo YAML, amqp URLs, and passwords kept out of sight."""

import logging

import pytest

import zocalo_xrc as zx
from zocalo_xrc.amqp import AmqpTransport

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


def write(path, text):
    path.write_text(text)
    return path


def test_zocalo_yaml_with_plugin_in_a_separate_file(tmp_path, monkeypatch):
    write(tmp_path / "secrets.yml", f"plugin: pika\nusername: gda\npassword: {SECRET}\n")
    write(tmp_path / "zocalo.yml", """
version: 1
rabbit-host: {plugin: pika, host: 127.0.0.1, port: 5672, vhost: zocalo}
rabbit-credentials: secrets.yml
graylog: {plugin: graylog, host: log.example}
environments:
  dev_bluesky: [rabbit-host, rabbit-credentials, graylog]
  bluesky: [rabbit-host]
""")
    monkeypatch.setenv("ZOCALO_CONFIG", str(tmp_path / "zocalo.yml"))
    s = zx.ConnectionSettings.from_zocalo_config("dev_bluesky")
    assert (s.host, s.port, s.vhost, s.username, s.password.reveal()) == ("127.0.0.1", 5672, "zocalo", "gda", SECRET)
    assert zx.ConnectionSettings.from_zocalo_config("bluesky").username == "guest"


@pytest.mark.parametrize(
    "text, words",
    [
        ("environments: {x: [a]}\n", "no environment 'dev_bluesky' (known: x)"),
        ("environments: {dev_bluesky: [a]}\n", "names 'a', which is not defined"),
        ("a: {plugin: graylog}\nenvironments: {dev_bluesky: [a]}\n", "has no pika plugin block"),
        ("a: missing.yml\nenvironments: {dev_bluesky: [a]}\n", "cannot read zocalo configuration"),
        ("[1, 2", "not valid YAML"),
        ("- 1\n", "expected a mapping"),
        (f"a: {{plugin: pika, port: x, password: {SECRET}}}\nenvironments: {{dev_bluesky: [a]}}\n", "bad pika settings"),
    ],
)
def test_bad_zocalo_yaml(tmp_path, text, words):
    with pytest.raises(zx.ConfigurationError) as e:
        zx.ConnectionSettings.from_zocalo_config(path=write(tmp_path / "z.yml", text))
    assert words in str(e.value) and SECRET not in str(e.value)


def test_no_config_means_the_embedded_broker(monkeypatch):
    monkeypatch.delenv("ZOCALO_CONFIG", raising=False)
    assert isinstance(zx.ZocaloTrigger().transport, zx.InProcessTransport)


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
    write(tmp_path / "z.yml", f"r: {{plugin: pika, host: 127.0.0.1, port: {settings.port}, username: guest, "
                              f"password: guest, vhost: /}}\nenvironments: {{dev_bluesky: [r]}}\n")
    monkeypatch.setenv("ZOCALO_CONFIG", str(tmp_path / "z.yml"))
    by_env = zx.ZocaloTrigger("dev_bluesky").transport
    by_url = zx.ZocaloResults(rabbit.url).transport
    by_default = zx.ZocaloTrigger().transport
    assert by_env is by_url is by_default
    assert isinstance(by_env, AmqpTransport) and SECRET not in repr(by_env)
    by_env.close()
