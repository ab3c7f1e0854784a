"""Broker settings: TLS files and credentials, from flags, a credentials file or the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedprune.protocol.connection import BrokerSettings, BrokerUrl
from fedprune.protocol.errors import ConfigError


def test_credentials_in_the_url_are_refused_without_echoing_the_password() -> None:
    # Execute
    with pytest.raises(ConfigError) as caught:
        BrokerUrl.parse("mqtts://pi-7:s3cret@broker:8883")

    # Assert
    message = str(caught.value)
    assert "s3cret" not in message
    assert message.startswith("broker URL 'mqtts://broker:8883': credentials do not belong in")
    assert "FEDPRUNE_MQTT_USERNAME" in message


def test_a_credentials_file_gives_username_and_password(tmp_path: Path) -> None:
    # Prepare
    file = tmp_path / "credentials.toml"
    file.write_text('username = "pi-7"\npassword = "s3cret"\n')

    # Execute
    settings = BrokerSettings.load("mqtts://b", credentials=file, environ={})

    # Assert
    assert (settings.username, settings.password) == ("pi-7", "s3cret")
    assert "s3cret" not in repr(settings)


def test_credentials_come_from_the_environment_when_no_file_is_given() -> None:
    # Execute
    environ = {"FEDPRUNE_MQTT_USERNAME": "coord", "FEDPRUNE_MQTT_PASSWORD": "pw"}
    settings = BrokerSettings.load("mqtt://b", environ=environ)

    # Assert
    assert (settings.username, settings.password) == ("coord", "pw")
    assert BrokerSettings.load("mqtt://b", environ={}).username is None


@pytest.mark.parametrize(
    ("kwargs", "environ", "message"),
    [
        ({"ca": "ca.crt"}, {}, "--ca is for TLS; use an mqtts:// or mqtts5:// broker URL"),
        ({"url": "mqtts://b", "cert": "c.crt"}, {}, "a client certificate needs its key"),
        ({"url": "mqtts://b", "ca": "missing.crt"}, {}, "missing.crt: no such file (--ca)"),
        ({}, {"FEDPRUNE_MQTT_USERNAME": "u"}, "set both FEDPRUNE_MQTT_USERNAME and"),
        ({"credentials": "none.toml"}, {}, "none.toml: no such credentials file"),
        ({"credentials": "bad.toml"}, {}, 'bad.toml: a credentials file holds username = "..."'),
    ],
)
def test_bad_broker_settings_are_one_line_naming_what_to_fix(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kwargs: dict[str, str],
    environ: dict[str, str],
    message: str,
) -> None:
    # Prepare
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "c.crt").write_text("x")
    (tmp_path / "bad.toml").write_text('user = "u"\n')
    url = kwargs.pop("url", "mqtt://b")

    # Execute
    with pytest.raises(ConfigError) as caught:
        BrokerSettings.load(url, environ=environ, **kwargs)  # type: ignore[arg-type]

    # Assert
    assert str(caught.value).startswith(message)
