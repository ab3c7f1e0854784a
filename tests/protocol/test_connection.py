"""Broker settings: TLS files and credentials, from flags, a credentials file or the environment."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from fedprune.protocol.connection import (
    PASSWORD_ENV,
    USERNAME_ENV,
    BrokerSettings,
    BrokerUrl,
    Reminder,
    check_exposure,
    exposure,
)
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


@pytest.mark.parametrize(
    ("url", "signed", "credentials", "expected"),
    [
        ("mqtt://127.0.0.1:1883", False, False, None),
        ("mqtt://localhost:1883", False, False, None),
        ("mqtt://[::1]:1883", False, False, None),
        ("mqtt://broker.example:1883", False, False, ("is unsigned", True)),
        ("mqtts://broker.example:8883", False, True, ("is unsigned", True)),
        ("mqtt://broker.example:1883", True, False, ("takes anyone", False)),
        ("mqtt://broker.example:1883", True, True, None),
        ("mqtts://broker.example:8883", True, False, None),
    ],
)
def test_a_broker_elsewhere_is_named_as_a_risk_unless_the_run_is_protected(
    url: str, signed: bool, credentials: bool, expected: tuple[str, bool] | None
) -> None:
    environ = {USERNAME_ENV: "u", PASSWORD_ENV: "p"} if credentials else {}
    settings = BrokerSettings.load(url, environ=environ)

    found = exposure(settings, signed=signed)

    if expected is None:
        assert found is None
    else:
        assert found is not None and expected[0] in found[0] and found[1] == expected[1]
        assert "Deploying securely" in found[0]


def test_insecure_is_needed_only_to_run_unsigned_elsewhere() -> None:
    elsewhere = BrokerSettings.load("mqtt://broker.example:1883", environ={})

    with pytest.raises(ConfigError, match="--insecure runs it anyway"):
        check_exposure(elsewhere, signed=False, insecure=False)
    assert "is unsigned" in str(check_exposure(elsewhere, signed=False, insecure=True))
    assert "takes anyone" in str(check_exposure(elsewhere, signed=True, insecure=False))


def test_a_reminder_says_its_text_at_once_then_once_per_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    remind = Reminder(logging.getLogger("test.reminder"), "the broker is open", every=0.2)

    with caplog.at_level(logging.WARNING, logger="test.reminder"):
        remind()
        remind()  # too soon: nothing
        time.sleep(0.25)
        remind()

    assert [r.getMessage() for r in caplog.records] == ["the broker is open"] * 2
