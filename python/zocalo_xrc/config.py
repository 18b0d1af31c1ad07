"""Where the broker is: a zocalo YAML configuration or an ``amqp://`` URL.

A password is kept in a :class:`Secret`: it never appears in a repr, a log
line or an exception.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote, unquote, urlsplit

#: The zocalo environment Diamond's Bluesky code uses for testing.
DEFAULT_ENVIRONMENT = "dev_bluesky"


class ConfigurationError(ValueError):
    """The connection settings cannot be read or make no sense."""


class Secret:
    """A string that does not show itself. ``reveal()`` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class ConnectionSettings:
    """How to reach a RabbitMQ broker."""

    host: str = "localhost"
    port: int = 5672
    username: str = "guest"
    password: Secret = field(default_factory=lambda: Secret("guest"), repr=False)
    vhost: str = "/"
    tls: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.password, str):
            object.__setattr__(self, "password", Secret(self.password))
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 < self.port < 65536:
            raise ConfigurationError(f"port must be an integer from 1 to 65535, got {self.port!r}")
        if not self.host:
            raise ConfigurationError("host must not be empty")

    def __repr__(self) -> str:
        return f"ConnectionSettings({self.url()!r}, password=********)"

    def url(self) -> str:
        """The broker's address as an URL, without the password."""
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://{quote(self.username, safe='')}@{self.host}:{self.port}/{quote(self.vhost, safe='')}"

    @classmethod
    def from_url(cls, url: str) -> ConnectionSettings:
        """``amqp://user:password@host:port/vhost`` (``amqps://`` for TLS); the
        vhost is URL-encoded (``%2F`` is ``/``), an empty one is ``/``."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise ConfigurationError(f"not an amqp URL: {_without_password(url)} ({e})") from None
        if parts.scheme not in ("amqp", "amqps"):
            raise ConfigurationError(f"expected an amqp:// or amqps:// URL, got {_without_password(url)}")
        tls = parts.scheme == "amqps"
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        return cls(
            host=parts.hostname or "localhost",
            port=port or (5671 if tls else 5672),
            username=unquote(parts.username) if parts.username else "guest",
            password=Secret(unquote(parts.password) if parts.password else "guest"),
            vhost=unquote(path) if path else "/",
            tls=tls,
        )

    @classmethod
    def from_zocalo_config(cls, environment: str = DEFAULT_ENVIRONMENT, path: str | os.PathLike | None = None) -> ConnectionSettings:
        """The ``pika`` plugin settings of ``environment`` in a zocalo YAML file
        (``path``, else ``$ZOCALO_CONFIG``). A plugin given as a string is the
        path of a separate YAML file holding that plugin's settings (relative
        paths are relative to the main file). Several pika blocks in one
        environment are merged in order."""
        import yaml

        if path is None:
            path = os.environ.get("ZOCALO_CONFIG")
            if not path:
                raise ConfigurationError("no zocalo configuration: set ZOCALO_CONFIG or give a path")
        main = Path(path)
        config = _load_yaml(yaml, main)
        environments = config.get("environments")
        if not isinstance(environments, Mapping) or environment not in environments:
            known = sorted(environments) if isinstance(environments, Mapping) else []
            raise ConfigurationError(f"{main}: no environment {environment!r} (known: {', '.join(known) or 'none'})")
        blocks = environments[environment]
        if isinstance(blocks, str):
            blocks = [blocks]
        settings: dict[str, Any] = {}
        for name in blocks:
            if name not in config:
                raise ConfigurationError(f"{main}: environment {environment!r} names {name!r}, which is not defined")
            block = config[name]
            if isinstance(block, str):
                block = _load_yaml(yaml, (main.parent / block) if not Path(block).is_absolute() else Path(block))
            if not isinstance(block, Mapping):
                raise ConfigurationError(f"{main}: {name!r} must be a mapping or a file path")
            if block.get("plugin") == "pika":
                settings.update({k: v for k, v in block.items() if k != "plugin"})
        if not settings:
            raise ConfigurationError(f"{main}: environment {environment!r} has no pika plugin block")
        try:
            return cls(
                host=str(settings.get("host", "localhost")),
                port=int(settings.get("port", 5672)),
                username=str(settings.get("username", "guest")),
                password=Secret(str(settings.get("password", "guest"))),
                vhost=str(settings.get("vhost", "/")),
                tls=bool(settings.get("tls", False)),
            )
        except (TypeError, ValueError) as e:
            raise ConfigurationError(f"{main}: bad pika settings in {environment!r}: {e}") from None


def _load_yaml(yaml: Any, path: Path) -> Mapping[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigurationError(f"cannot read zocalo configuration {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigurationError(f"{path}: not valid YAML ({type(e).__name__})") from None
    if not isinstance(data, Mapping):
        raise ConfigurationError(f"{path}: expected a mapping at the top level")
    return data


def _without_password(url: str) -> str:
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":********@")
        return parts._replace(netloc=netloc).geturl()
    except ValueError:
        return "<unparseable URL>"
