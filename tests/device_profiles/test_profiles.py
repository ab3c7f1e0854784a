"""Device profiles: shipped files, user files, validation messages and the command line."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from fedprune.device_profiles import (
    Arch,
    DeviceProfile,
    Precision,
    ProfileError,
    Trainer,
    available,
    load,
)
from fedprune.device_profiles.cli import main

SHIPPED = [
    "generic-x86-64",
    "jetson-nano",
    "jetson-orin-nano",
    "raspberry-pi-3b",
    "raspberry-pi-4",
    "raspberry-pi-5",
    "raspberry-pi-zero-2w",
]


def _valid_fields(name: str = "my-board") -> dict[str, object]:
    return {
        "name": name,
        "description": "a test board",
        "arch": "aarch64",
        "memory_mb": 1024,
        "cores": 4,
        "precision": "full_int8",
        "sparse_format": True,
        "max_model_bytes": 4_194_304,
        "max_payload_bytes": 262_144,
        "uplink_kbps": 5_000,
        "trainer": "keras",
        "local_epochs": 1,
        "batch_size": 16,
        "accuracy_tolerance": 0.02,
    }


def _toml_line(key: str, value: object) -> str:
    if isinstance(value, bool):
        return f"{key} = {'true' if value else 'false'}"
    return f"{key} = {json.dumps(value)}"


def _write_profile(directory: Path, fields: dict[str, object], stem: str = "my-board") -> Path:
    path = directory / f"{stem}.toml"
    path.write_text("\n".join(_toml_line(k, v) for k, v in fields.items()) + "\n")
    return path


def test_available_lists_every_shipped_profile_sorted() -> None:
    assert available() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads_with_its_own_name_and_trainer(name: str) -> None:
    profile = load(name)

    assert profile.name == name
    # Raspberry Pis train without TensorFlow; the others have room for it.
    expected = Trainer.LITERT if name.startswith("raspberry-pi") else Trainer.KERAS
    assert profile.trainer is expected
    assert profile.max_payload_bytes <= profile.max_model_bytes


def test_shipped_profiles_pick_precision_and_payload_for_the_hardware() -> None:
    zero = load("raspberry-pi-zero-2w")
    pi3 = load("raspberry-pi-3b")
    jetson = load("jetson-nano")
    x86 = load("generic-x86-64")

    assert (zero.precision, zero.max_payload_bytes, zero.memory_mb) == (
        Precision.FULL_INT8,
        128 * 1024,
        512,
    )
    assert pi3.max_payload_bytes == 256 * 1024
    assert jetson.precision is Precision.FLOAT16
    assert (x86.arch, x86.precision) == (Arch.X86_64, Precision.FLOAT32)


def test_user_profile_file_loads_from_its_path(tmp_path: Path) -> None:
    path = _write_profile(tmp_path, _valid_fields())

    profile = load(str(path))

    assert profile == DeviceProfile.from_dict(_valid_fields())
    assert profile.arch is Arch.AARCH64
    assert profile.cores == 4


def test_to_dict_round_trips_through_from_dict() -> None:
    profile = load("raspberry-pi-4")

    data = profile.to_dict()

    assert data["precision"] == "dynamic_int8"
    assert DeviceProfile.from_dict(data) == profile


def test_constructor_accepts_enum_strings_and_integer_tolerance() -> None:
    fields = _valid_fields() | {"precision": "float16", "accuracy_tolerance": 0}

    profile = DeviceProfile.from_dict(fields)

    assert profile.precision is Precision.FLOAT16
    assert profile.accuracy_tolerance == 0.0
    assert isinstance(profile.accuracy_tolerance, float)


def test_profiles_are_frozen() -> None:
    profile = load("raspberry-pi-5")

    with pytest.raises(AttributeError):
        profile.cores = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("cores", -1, "field 'cores' must be an integer > 0, got -1"),
        ("cores", "4", "field 'cores' must be an integer > 0, got '4'"),
        ("memory_mb", 1.5, "field 'memory_mb' must be an integer > 0, got 1.5"),
        ("batch_size", True, "field 'batch_size' must be an integer > 0, got True"),
        ("max_payload_bytes", 512, "field 'max_payload_bytes' must be an integer >= 1024, got 512"),
        ("sparse_format", "yes", "field 'sparse_format' must be a boolean, got 'yes'"),
        ("description", "", "field 'description' must be a non-empty string, got ''"),
        (
            "accuracy_tolerance",
            1.5,
            "field 'accuracy_tolerance' must be a number in [0, 1], got 1.5",
        ),
        (
            "arch",
            "armv7l",
            "field 'arch' must be one of 'aarch64', 'x86_64', got 'armv7l'",
        ),
        (
            "precision",
            "int4",
            "field 'precision' must be one of 'float32', 'float16', 'dynamic_int8', "
            "'full_int8', got 'int4'",
        ),
        ("trainer", "torch", "field 'trainer' must be one of 'keras', 'litert', got 'torch'"),
        ("latency_budget_ms", -1, "field 'latency_budget_ms' must be a number >= 0, got -1"),
        ("size_budget_bytes", 0.5, "field 'size_budget_bytes' must be an integer >= 0, got 0.5"),
    ],
)
def test_bad_value_error_names_file_field_and_value(
    tmp_path: Path, field: str, value: object, expected: str
) -> None:
    path = _write_profile(tmp_path, _valid_fields() | {field: value})

    with pytest.raises(ProfileError) as caught:
        load(str(path))

    assert str(caught.value) == f"profile {path}: {expected}"


def test_unknown_key_is_an_error_naming_the_key_and_value(tmp_path: Path) -> None:
    path = _write_profile(tmp_path, _valid_fields() | {"gpu": "maxwell"})

    with pytest.raises(ProfileError, match="gpu") as caught:
        load(str(path))

    assert str(caught.value) == f"profile {path}: field 'gpu' is not a profile field, got 'maxwell'"


def test_missing_key_is_an_error_naming_the_key(tmp_path: Path) -> None:
    fields = _valid_fields()
    del fields["uplink_kbps"]
    path = _write_profile(tmp_path, fields)

    with pytest.raises(ProfileError) as caught:
        load(str(path))

    assert str(caught.value) == f"profile {path}: field 'uplink_kbps' is missing"


def test_budgets_are_optional_and_load_when_given(tmp_path: Path) -> None:
    plain = load(str(_write_profile(tmp_path, _valid_fields())))
    budgeted = _valid_fields(name="budgeted") | {"latency_budget_ms": 2, "size_budget_bytes": 9}
    path = _write_profile(tmp_path, budgeted, stem="budgeted")

    loaded = load(str(path))

    assert (plain.latency_budget_ms, plain.size_budget_bytes) == (0.0, 0)
    assert (loaded.latency_budget_ms, loaded.size_budget_bytes) == (2.0, 9)


def test_name_must_match_the_file_stem(tmp_path: Path) -> None:
    path = _write_profile(tmp_path, _valid_fields(name="other-board"))

    with pytest.raises(ProfileError) as caught:
        load(str(path))

    assert str(caught.value) == (
        f"profile {path}: field 'name' must equal the file name 'my-board', got 'other-board'"
    )


def test_invalid_toml_names_the_file_and_the_parse_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "broken"\ncores 4\n')

    with pytest.raises(ProfileError) as caught:
        load(str(path))

    message = str(caught.value)
    assert message.startswith(f"profile {path}: invalid TOML: ")
    assert "line 2" in message
    assert "\n" not in message


def test_argument_with_a_directory_part_is_a_path_not_a_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ProfileError) as caught:
        load("./raspberry-pi-4")

    assert str(caught.value) == "profile ./raspberry-pi-4: no such file"


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(ProfileError) as caught:
        load(str(path))

    assert str(caught.value) == f"profile {path}: no such file"


def test_unknown_profile_name_lists_the_known_names() -> None:
    with pytest.raises(ProfileError) as caught:
        load("foo")

    assert str(caught.value) == f"unknown device profile 'foo' (known: {', '.join(SHIPPED)})"


def test_profile_error_is_a_value_error() -> None:
    assert issubclass(ProfileError, ValueError)


def test_cli_list_prints_a_row_per_shipped_profile(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["list"])

    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert code == 0
    assert err == ""
    assert lines[0].split() == ["NAME", "ARCH", "MEMORY", "PRECISION", "TRAINER"]
    assert [line.split()[0] for line in lines[1:]] == SHIPPED
    zero_row = "raspberry-pi-zero-2w  aarch64  512 MB    full_int8     litert"
    assert lines[-1] == zero_row


def test_cli_show_prints_toml_that_loads_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["show", "jetson-orin-nano"])

    out, _ = capsys.readouterr()
    assert code == 0
    assert tomllib.loads(out) == load("jetson-orin-nano").to_dict()
    copy = tmp_path / "jetson-orin-nano.toml"
    copy.write_text(out)
    assert load(str(copy)) == load("jetson-orin-nano")


def test_cli_show_json_accepts_a_user_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_profile(tmp_path, _valid_fields())

    code = main(["show", "--json", str(path)])

    out, _ = capsys.readouterr()
    assert code == 0
    assert json.loads(out) == _valid_fields() | {"latency_budget_ms": 0.0, "size_budget_bytes": 0}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "foo"], "unknown device profile 'foo'"),
        (["show", "/nonexistent/board.toml"], "profile /nonexistent/board.toml: no such file"),
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_cli_error_exits_2_with_one_line_on_stderr(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(argv)

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("fedprune-profiles: error: ")
    assert message in err
