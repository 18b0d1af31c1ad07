"""Where the broker is: a zocalo YAML configuration or an ``amqp://`` URL.

A password is kept in a :class:`Secret`: it never appears in a repr, a log
line or an exception.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote, unquote, urlsplit

#: The zocalo environments Diamond's Bluesky code uses: in production, and in
#: test mode (``DODAL_TEST_MODE=true``).
PRODUCTION_ENVIRONMENT = "bluesky"
TEST_ENVIRONMENT = "dev_bluesky"


#: What a pika plugin block must give.
PIKA_KEYS = ("host", "port", "username", "password", "vhost")


def default_environment() -> str:
    """The environment dodal uses: ``dev_bluesky`` when ``DODAL_TEST_MODE``
    is ``true``, else ``bluesky``."""
    return TEST_ENVIRONMENT if os.environ.get("DODAL_TEST_MODE") == "true" else PRODUCTION_ENVIRONMENT


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
        """``amqp://user:password@host:port/vhost`` (``amqps://`` for TLS; the
        scheme in any case). The vhost is URL-encoded (``%2F`` is ``/``), an
        empty one is ``/``. User and password may be URL-encoded; a password
        may also hold ``/``, ``#``, ``?`` or ``@`` as they are (everything up
        to the last ``@`` is user and password). No error shows the password."""
        parsed = cls._parse_url(url)
        if isinstance(parsed, str):  # raised here, with no frame below holding the URL
            del url
            raise ConfigurationError(parsed)
        return parsed

    @classmethod
    def _parse_url(cls, url: str) -> ConnectionSettings | str:
        """The settings, or what is wrong (the password redacted)."""
        m = re.fullmatch(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?:(?P<userinfo>.*)@)?(?P<rest>[^@]*)", url, re.S)
        if m is None:
            return f"not an amqp URL: {redact(url)}"
        scheme = m["scheme"].lower()
        if scheme not in ("amqp", "amqps"):
            return f"expected an amqp:// or amqps:// URL, got {redact(url)}"
        user, _, password = (m["userinfo"] or "").partition(":")
        hostport, _, vhost = m["rest"].partition("/")
        try:
            parts = urlsplit(f"//{hostport}")
            port = parts.port
        except ValueError:
            return f"not an amqp URL: {redact(url)} (bad host or port {hostport!r})"
        tls = scheme == "amqps"
        try:
            return cls(
                host=parts.hostname or "localhost",
                port=port or (5671 if tls else 5672),
                username=unquote(user) if user else "guest",
                password=Secret(unquote(password) if password else "guest"),
                vhost=unquote(vhost) if vhost else "/",
                tls=tls,
            )
        except ConfigurationError as e:
            return f"{redact(url)}: {e}"

    @classmethod
    def from_zocalo_config(cls, environment: str | None = None, path: str | os.PathLike[str] | None = None) -> ConnectionSettings:
        """The ``pika`` plugin settings of ``environment`` (default:
        :func:`default_environment`) in a zocalo YAML file (``path``, else
        ``$ZOCALO_CONFIG``), read as ``zocalo.configuration`` reads it (see
        :func:`zocalo_environment_blocks`): of the pika blocks the environment
        names, the last one counts."""
        environment = default_environment() if environment is None else environment
        if path is None:
            path = os.environ.get("ZOCALO_CONFIG")
            if not path:
                raise ConfigurationError(
                    f"no zocalo configuration for environment {environment!r}: set ZOCALO_CONFIG to a zocalo "
                    "YAML file, or give an amqp:// URL, or 'in-process' for a broker inside this process"
                )
        main = Path(path)
        pika = None
        for name, block in zocalo_environment_blocks(main, environment):
            if block.get("plugin") == "pika":
                pika = (name, block)
        if pika is None:
            raise ConfigurationError(f"{main}: environment {environment!r} has no pika plugin block")
        name, block = pika
        missing = [k for k in PIKA_KEYS if k not in block]
        if missing:
            raise ConfigurationError(f"{main}: pika block {name!r} lacks {', '.join(missing)}")
        host, port = str(block["host"]), str(block["port"])
        if "," in host or "," in port:
            raise ConfigurationError(f"{main}: pika block {name!r} names several hosts or ports; zocalo-xrc connects to one")
        try:
            return cls(host=host, port=int(port), username=str(block["username"]),
                       password=Secret(str(block["password"])), vhost=str(block["vhost"]))
        except (TypeError, ValueError) as e:
            raise ConfigurationError(f"{main}: bad pika settings in block {name!r}: {e}") from None


def zocalo_environment_blocks(path: str | os.PathLike[str], environment: str) -> list[tuple[str, Mapping[str, Any]]]:
    """The plugin blocks an environment of a zocalo YAML file activates, in
    zocalo's order, as ``(name, settings)``. The file is read as
    ``zocalo.configuration`` 1.x reads it:

    * ``version: 1`` is required;
    * an environment is a list of block names; or a mapping of groups, each a
      name or a list of names, taken in alphabetical order of group except
      ``plugins``, which comes last; or a string naming another environment
      (an alias; chains are followed, loops are an error). A name appearing
      twice counts once, where it first appears;
    * a block is a mapping with a ``plugin`` key, or the path of a YAML file
      holding one (relative to the directory of the main file, ``~``
      expanded)."""
    import yaml

    main = Path(path)
    config = _load_yaml(yaml, main)
    if "version" not in config:
        raise ConfigurationError(f"{main}: not a zocalo configuration (no 'version: 1')")
    if config["version"] != 1 or isinstance(config["version"], bool):
        raise ConfigurationError(f"{main}: zocalo configuration version {config['version']!r}; only version 1 is understood")
    if "include" in config:
        raise ConfigurationError(f"{main}: 'include' is not supported (zocalo does not support it either)")
    environments = config.get("environments", {})
    if not isinstance(environments, Mapping):
        raise ConfigurationError(f"{main}: 'environments' must be a mapping")
    # The whole file is checked, as zocalo checks it when it reads it: every
    # block (a file-path block when its environment is used) and every environment.
    for name, block in config.items():
        if name not in ("version", "environments") and not isinstance(block, str):
            _check_block(main, str(name), block)
    resolved = {str(env): _environment_block_names(main, config, environments, env) for env in environments}
    if environment not in resolved:
        known = ", ".join(sorted(resolved)) or "none"
        raise ConfigurationError(f"{main}: no environment {redact(environment)!r} (known: {known})")
    blocks = []
    for name in resolved[environment]:
        block = config[name]
        if isinstance(block, str):
            file = Path(block).expanduser()
            block = _load_yaml(yaml, file if file.is_absolute() else main.parent / file)
            if not isinstance(block, Mapping) or not block.get("plugin"):
                raise ConfigurationError(f"{main}: the file of block {name!r} lacks the mandatory 'plugin' key")
        blocks.append((str(name), block))
    return blocks


def _check_block(main: Path, name: str, block: Any) -> None:
    if not isinstance(block, Mapping) or not block.get("plugin"):
        raise ConfigurationError(f"{main}: block {name!r} lacks the mandatory 'plugin' key")
    if block["plugin"] == "pika":  # workflows' schema for it: five keys, four of them strings
        missing = [k for k in PIKA_KEYS if k not in block]
        if missing:
            raise ConfigurationError(f"{main}: pika block {name!r} lacks {', '.join(missing)}")
        for key in ("host", "username", "password", "vhost"):
            if not isinstance(block[key], str):
                raise ConfigurationError(f"{main}: pika block {name!r}: {key} must be a string (quote it)")


def _environment_block_names(main: Path, config: Mapping[str, Any], environments: Mapping[str, Any], environment: str) -> list[str]:
    seen = [environment]
    value = environments[environment]
    while isinstance(value, str):  # an alias
        if value not in environments:
            raise ConfigurationError(f"{main}: environment {seen[-1]!r} aliases undefined environment {value!r}")
        if value in seen:
            raise ConfigurationError(f"{main}: environments {' -> '.join(map(repr, seen + [value]))} alias each other in a loop")
        seen.append(value)
        value = environments[value]
    if isinstance(value, list):
        value = {"plugins": value}
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{main}: environment {seen[-1]!r} is not a list, a mapping or an alias")
    groups = []
    for group in sorted(value, key=lambda g: (g == "plugins", str(g))):
        names = value[group]
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list):
            raise ConfigurationError(f"{main}: environment {seen[-1]!r} group {group!r} is not a name or a list of names")
        groups.extend(names)
    names = list(dict.fromkeys(groups))
    for name in names:
        if name in ("version", "environments", "include") or name not in config:
            raise ConfigurationError(f"{main}: environment {environment!r} names {name!r}, which is not defined")
    return names


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


def looks_like_url(text: str) -> bool:
    """A string meant as a broker URL, however mistyped (``AMQP://``,
    ``amqp:/``, ``user:pass@host``): never to be taken for an environment name."""
    return "://" in text or "@" in text or text.lower().startswith("amqp")


def redact(text: str) -> str:
    """``text`` with any password of an URL in it replaced by ``********``:
    everything between the user's ``:`` and the last ``@``, or, where the
    text is not shaped like an URL, everything before the last ``@``."""
    if "@" not in text:
        return text
    m = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]*://[^:@/]*)(:.*)?@([^@]*)", text, re.S)
    if m is not None:
        return f"{m[1]}{':********' if m[2] else ''}@{m[3]}"
    return "********@" + text.rsplit("@", 1)[1]
