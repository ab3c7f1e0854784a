"""Where the broker is and how to prove who we are to it: URL, TLS files and credentials.

Every command that talks to a broker takes the same settings (``options.add_broker_arguments``)
or reads them from a device's config file. Credentials never come from the command line, where
other users of the machine can read them (``ps``), nor from the URL: they come from a credentials
file or from ``FEDPRUNE_MQTT_USERNAME`` / ``FEDPRUNE_MQTT_PASSWORD``.

    mqtt://host:1883      MQTT 3.1.1, no TLS          mqtt5://host:1883     MQTT 5, no TLS
    mqtts://host:8883     MQTT 3.1.1 over TLS         mqtts5://host:8883    MQTT 5 over TLS
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from fedprune.protocol.errors import ConfigError

USERNAME_ENV = "FEDPRUNE_MQTT_USERNAME"
PASSWORD_ENV = "FEDPRUNE_MQTT_PASSWORD"

_SCHEMES = {  # scheme: (MQTT 5, TLS)
    "mqtt": (False, False),
    "tcp": (False, False),
    "mqtt5": (True, False),
    "mqtts": (False, True),
    "ssl": (False, True),
    "mqtts5": (True, True),
}


@dataclass(frozen=True, kw_only=True)
class BrokerUrl:
    """``mqtt[s][5]://host[:port]``; the port defaults to 1883, or 8883 with TLS."""

    host: str
    port: int
    mqtt5: bool
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> BrokerUrl:
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in _SCHEMES:
            raise ConfigError(
                f"broker URL {url!r}: scheme must be mqtt://, mqtts://, mqtt5:// or mqtts5://"
            )
        if parts.username is not None or parts.password is not None:
            raise ConfigError(
                f"broker URL {_redacted(url)!r}: credentials do not belong in the URL; put them in"
                f" a credentials file (--credentials) or in {USERNAME_ENV} and {PASSWORD_ENV}"
            )
        mqtt5, tls = _SCHEMES[parts.scheme]
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ConfigError(f"broker URL {url!r}: bad port") from exc
        if not parts.hostname:
            raise ConfigError(f"broker URL {url!r}: no host")
        return cls(host=parts.hostname, port=port, mqtt5=mqtt5, tls=tls)

    @property
    def loopback(self) -> bool:
        """Whether the broker is on this machine (``localhost`` or a loopback address)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        scheme = ("mqtts" if self.tls else "mqtt") + ("5" if self.mqtt5 else "")
        return f"{scheme}://{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    """A broker URL plus what proves who we are: a CA to check the broker's certificate, an
    optional client certificate and key (mutual TLS), an optional username and password."""

    url: BrokerUrl
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        files = {"ca": self.ca, "cert": self.cert, "key": self.key}
        given = [name for name, path in files.items() if path is not None]
        if given and not self.url.tls:
            raise ConfigError(
                f"--{given[0]} is for TLS; use an mqtts:// or mqtts5:// broker URL, not {self.url}"
            )
        if (self.cert is None) != (self.key is None):
            raise ConfigError("a client certificate needs its key: give both --cert and --key")
        for name in given:
            path = files[name]
            if path is not None and not path.is_file():
                raise ConfigError(f"{path}: no such file (--{name})")
        if (self.username is None) != (self.password is None):
            raise ConfigError("MQTT credentials need both a username and a password")

    @classmethod
    def load(
        cls,
        url: str,
        *,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        credentials: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> BrokerSettings:
        """Settings from a URL, file paths and the credentials file or the environment (the
        file wins when both are given)."""
        username, password = _credentials(credentials, os.environ if environ is None else environ)
        return cls(
            url=BrokerUrl.parse(url),
            ca=_path(ca),
            cert=_path(cert),
            key=_path(key),
            username=username,
            password=password,
        )


SECURE_DOCS = "see 'Deploying securely' in fedprune's README"


def exposure(settings: BrokerSettings, *, signed: bool) -> tuple[str, bool] | None:
    """What anyone who reaches the broker can do to a run, when the broker is not on this
    machine, and whether that needs the user's ``--insecure`` (an unsigned run); ``None`` when
    the broker is on this machine, or the run is signed on a broker that checks who connects."""
    url = settings.url
    if url.loopback:
        return None
    if not signed:
        return (
            f"the run is unsigned and the broker {url} is not on this machine: anyone who can"
            " publish there can end the run, deploy a model of theirs to every device or outweigh"
            f" every device's update; {SECURE_DOCS}",
            True,
        )
    if not url.tls and settings.username is None:
        return (
            f"the broker {url} takes anyone (no TLS, no credentials): the run is signed, but"
            " anyone can read every update (made from the devices' private data) and flood the"
            f" run; {SECURE_DOCS}",
            False,
        )
    return None


def check_exposure(settings: BrokerSettings, *, signed: bool, insecure: bool) -> str | None:
    """The warning to give about the broker (:func:`exposure`); ``ConfigError`` when the run is
    unsigned on a broker elsewhere and ``insecure`` was not given."""
    found = exposure(settings, signed=signed)
    if found is None:
        return None
    text, needs_insecure = found
    if needs_insecure and not insecure:
        raise ConfigError(f"{text} (--insecure runs it anyway)")
    return text


class Reminder:
    """Says ``text`` in the log now and again every ``every`` seconds, when called."""

    def __init__(self, log: logging.Logger, text: str, *, every: float = 3600.0) -> None:
        self.log, self.text, self.every = log, text, every
        self._said: float | None = None

    def __call__(self) -> None:
        now = time.monotonic()
        if self._said is None or now - self._said >= self.every:
            self.log.warning("%s", self.text)
            self._said = now


def _path(value: str | Path | None) -> Path | None:
    return None if value is None or value == "" else Path(value)


def _credentials(
    path: str | Path | None, environ: Mapping[str, str]
) -> tuple[str | None, str | None]:
    """``username``/``password`` from a TOML credentials file, else from the environment."""
    if path is None or path == "":
        username, password = environ.get(USERNAME_ENV), environ.get(PASSWORD_ENV)
        if (username is None) != (password is None):
            raise ConfigError(f"set both {USERNAME_ENV} and {PASSWORD_ENV}, or neither")
        return username, password
    try:
        table = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such credentials file") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable credentials file ({exc})") from exc
    values = [table.get(k) for k in ("username", "password")]
    if not all(isinstance(v, str) and v for v in values) or set(table) - {"username", "password"}:
        raise ConfigError(f'{path}: a credentials file holds username = "..." and password = "..."')
    return values[0], values[1]


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    return url.replace(parts.netloc, parts.netloc.rpartition("@")[2]) if parts.netloc else url
