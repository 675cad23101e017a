"""Unit tests for common/config.py with the real option tables of the `naiad` command.

Precedence: flag > NAIAD_* environment > TOML file ([command] table > top level) > default.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from common.config import ConfigError, Option, add_options, resolve
from naiad.cli import PEER_OPTIONS, SCHEDULER_OPTIONS

MiB = 1 << 20

TABLES = {"peer": PEER_OPTIONS, "scheduler": SCHEDULER_OPTIONS}


def parser_for(section: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"naiad {section}", exit_on_error=False)
    add_options(parser, TABLES[section])
    return parser


def run(section: str = "peer", argv: list[str] | None = None,
        environ: dict[str, str] | None = None) -> dict[str, Any]:
    args = parser_for(section).parse_args(argv or [])
    return resolve(TABLES[section], args, section, environ=environ or {}, commands=TABLES)


@pytest.fixture
def toml(tmp_path: Path):
    """Write a TOML file and return the `--config` arguments naming it."""

    def write(text: str) -> list[str]:
        path = tmp_path / "naiad.toml"
        path.write_text(text, encoding="utf-8")
        return ["--config", str(path)]

    return write


# --- defaults ---------------------------------------------------------------------------------

def test_peer_defaults() -> None:
    opts = run("peer")
    assert set(opts) == {o.name for o in PEER_OPTIONS}
    assert opts["scheduler"] == ["http://127.0.0.1:8002"]
    assert opts["listen"] == "127.0.0.1:65001"
    assert opts["upload"] == "127.0.0.1:65002"
    assert opts["registry"] == "https://registry-1.docker.io"
    assert opts["allow_registry"] == []
    assert opts["data_dir"] == "~/.local/share/naiad"
    assert opts["upload_slots"] == 8
    assert opts["origin_concurrency"] == 4
    assert opts["seed"] is False
    assert opts["insecure"] is False
    assert opts["no_verify_on_serve"] is False
    assert opts["piece_size"] is None
    assert opts["id"] is None
    assert opts["cluster_secret"] is None
    assert opts["log_format"] == "text"


def test_scheduler_defaults() -> None:
    opts = run("scheduler")
    assert set(opts) == {o.name for o in SCHEDULER_OPTIONS}
    assert opts["listen"] == "127.0.0.1:8002"
    assert opts["heartbeat_interval"] == 2.0
    assert opts["lease_timeout"] == 2.0
    assert opts["token"] is None


@pytest.mark.parametrize(("name", "flag", "env"), [
    ("heartbeat_interval", "--heartbeat-interval", "NAIAD_HEARTBEAT_INTERVAL"),
    ("allow_registry", "--allow-registry", "NAIAD_ALLOW_REGISTRY"),
    ("id", "--id", "NAIAD_ID"),
])
def test_option_names(name: str, flag: str, env: str) -> None:
    opt = Option(name, None, "")
    assert opt.flag == flag
    assert opt.env == env


# --- precedence -------------------------------------------------------------------------------

# (top-level file value, [peer] file value, env value, flag value) -> expected upload_slots
PRECEDENCE = [
    (None, None, None, None, 8),
    (3, None, None, None, 3),
    (None, 4, None, None, 4),
    (3, 4, None, None, 4),  # the command's own table beats the top level
    (3, 4, "5", None, 5),  # environment beats the file
    (None, None, "5", None, 5),
    (3, 4, "5", "6", 6),  # flag beats everything
    (3, None, None, "6", 6),
    (None, 4, None, "6", 6),
    (None, None, "5", "6", 6),
]


@pytest.mark.parametrize(("top", "table", "env", "flag", "expected"), PRECEDENCE)
def test_precedence(toml, top: int | None, table: int | None, env: str | None,
                    flag: str | None, expected: int) -> None:
    text = ""
    if top is not None:
        text += f"upload_slots = {top}\n"
    if table is not None:
        text += f"[peer]\nupload-slots = {table}\n"
    argv = toml(text) if text else []
    if flag is not None:
        argv += ["--upload-slots", flag]
    environ = {"NAIAD_UPLOAD_SLOTS": env} if env is not None else {}
    assert run("peer", argv, environ)["upload_slots"] == expected


def test_precedence_per_option_is_independent(toml) -> None:
    argv = toml('idc = "file-idc"\nlocation = "file|loc"\nlisten = "0.0.0.0:1"\n'
                '[peer]\nlisten = "0.0.0.0:2"\n')
    opts = run("peer", [*argv, "--idc", "flag-idc"], {"NAIAD_LOCATION": "env|loc"})
    assert opts["idc"] == "flag-idc"
    assert opts["location"] == "env|loc"
    assert opts["listen"] == "0.0.0.0:2"
    assert opts["upload"] == "127.0.0.1:65002"


@pytest.mark.parametrize("key", ["heartbeat_interval", "heartbeat-interval"])
def test_file_keys_with_dashes_or_underscores(toml, key: str) -> None:
    assert run("scheduler", toml(f"{key} = 0.5\n"))["heartbeat_interval"] == 0.5
    assert run("scheduler", toml(f"[scheduler]\n{key} = 0.25\n"))["heartbeat_interval"] == 0.25


def test_each_command_reads_only_its_own_table(toml) -> None:
    argv = toml('listen = "0.0.0.0:9"\n'
                '[peer]\nlisten = "0.0.0.0:1"\n'
                '[scheduler]\nlisten = "0.0.0.0:2"\ntoken = "t"\n')
    assert run("peer", argv)["listen"] == "0.0.0.0:1"
    sched = run("scheduler", argv)
    assert sched["listen"] == "0.0.0.0:2"
    assert sched["token"] == "t"


def test_top_level_is_shared_between_commands(toml) -> None:
    argv = toml('log_format = "json"\ncluster-secret = "s3cret"\n')
    for section in ("peer", "scheduler"):
        opts = run(section, argv)
        assert opts["log_format"] == "json"
        assert opts["cluster_secret"] == "s3cret"


def test_config_file_from_environment(toml, tmp_path: Path) -> None:
    toml("upload_slots = 3\n")
    path = str(tmp_path / "naiad.toml")
    assert run("peer", [], {"NAIAD_CONFIG": path})["upload_slots"] == 3
    other = tmp_path / "other.toml"
    other.write_text("upload_slots = 7\n")
    # --config beats NAIAD_CONFIG
    assert run("peer", ["--config", str(other)], {"NAIAD_CONFIG": path})["upload_slots"] == 7


def test_no_config_file_reads_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file lying in the working directory is not read unless named.
    (tmp_path / "naiad.toml").write_text("upload_slots = 3\n")
    monkeypatch.chdir(tmp_path)
    assert run("peer")["upload_slots"] == 8


def test_process_environment_is_not_read_when_environ_given(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAIAD_UPLOAD_SLOTS", "99")
    assert run("peer", [], {})["upload_slots"] == 8
    args = parser_for("peer").parse_args([])
    assert resolve(PEER_OPTIONS, args, "peer")["upload_slots"] == 99  # default: os.environ


# --- repeatable options -----------------------------------------------------------------------

def test_repeat_flags_are_appended() -> None:
    opts = run("peer", ["--scheduler", "http://a:1", "--scheduler", "http://b:2",
                        "--allow-registry", "http://r:5000"])
    assert opts["scheduler"] == ["http://a:1", "http://b:2"]
    assert opts["allow_registry"] == ["http://r:5000"]


@pytest.mark.parametrize(("env", "expected"), [
    ("http://a:1", ["http://a:1"]),
    ("http://a:1,http://b:2", ["http://a:1", "http://b:2"]),
    ("http://a:1, http://b:2", ["http://a:1", "http://b:2"]),
    (" http://a:1 ,http://b:2 ", ["http://a:1", "http://b:2"]),
    ("http://a:1,,http://b:2,", ["http://a:1", "http://b:2"]),
    ("", []),
])
def test_repeat_env_is_comma_separated(env: str, expected: list[str]) -> None:
    assert run("peer", [], {"NAIAD_SCHEDULER": env})["scheduler"] == expected


@pytest.mark.parametrize("env", ["http://a:1, ", "http://a:1, ,http://b:2"])
def test_repeat_env_blank_items_dropped(env: str) -> None:
    assert "" not in run("peer", [], {"NAIAD_ALLOW_REGISTRY": env})["allow_registry"]


@pytest.mark.parametrize(("text", "expected"), [
    ('scheduler = ["http://a:1", "http://b:2"]\n', ["http://a:1", "http://b:2"]),
    ('[peer]\nscheduler = ["http://a:1"]\n', ["http://a:1"]),
    ('scheduler = "http://a:1"\n', ["http://a:1"]),  # a single string is a one-item list
    ('scheduler = []\n', []),
])
def test_repeat_from_file(toml, text: str, expected: list[str]) -> None:
    assert run("peer", toml(text))["scheduler"] == expected


def test_repeat_sources_are_not_merged(toml) -> None:
    argv = toml('scheduler = ["http://file:1"]\n')
    env = {"NAIAD_SCHEDULER": "http://env:1,http://env:2"}
    assert run("peer", argv, env)["scheduler"] == ["http://env:1", "http://env:2"]
    assert run("peer", [*argv, "--scheduler", "http://flag:1"], env)["scheduler"] == [
        "http://flag:1"]


# --- switches ---------------------------------------------------------------------------------

def test_switch_flags() -> None:
    opts = run("peer", ["--seed", "--insecure", "--no-verify-on-serve"])
    assert opts["seed"] is True
    assert opts["insecure"] is True
    assert opts["no_verify_on_serve"] is True


def test_switch_flag_takes_no_value() -> None:
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        parser_for("peer").parse_args(["--seed=yes"])


@pytest.mark.parametrize(("env", "expected"), [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True), (" On ", True),
    ("0", False), ("false", False), ("no", False), ("off", False), ("", False),
])
def test_switch_from_env(env: str, expected: bool) -> None:
    assert run("peer", [], {"NAIAD_SEED": env})["seed"] is expected


@pytest.mark.parametrize("env", ["2", "maybe", "y", "enabled", "tru"])
def test_switch_bad_env_value(env: str) -> None:
    with pytest.raises(ConfigError, match="seed"):
        run("peer", [], {"NAIAD_SEED": env})


def test_switch_flag_beats_env() -> None:
    assert run("peer", ["--seed"], {"NAIAD_SEED": "false"})["seed"] is True


@pytest.mark.parametrize(("value", "expected"), [
    ("true", True), ("false", False), ('"yes"', True), ('"off"', False), ("1", True),
    ("0", False),
])
def test_switch_from_file(toml, value: str, expected: bool) -> None:
    assert run("peer", toml(f"[peer]\nseed = {value}\n"))["seed"] is expected


def test_switch_env_beats_file(toml) -> None:
    assert run("peer", toml("seed = true\n"), {"NAIAD_SEED": "0"})["seed"] is False


@pytest.mark.parametrize("value", ['"perhaps"', "2", "1.5"])
def test_switch_bad_file_value(toml, value: str) -> None:
    with pytest.raises(ConfigError, match="seed"):
        run("peer", toml(f"seed = {value}\n"))


# --- type conversion --------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "env", "text", "name", "expected"), [
    (["--upload-slots", "16"], {}, "", "upload_slots", 16),
    ([], {"NAIAD_UPLOAD_SLOTS": "12"}, "", "upload_slots", 12),
    ([], {}, "upload_slots = 2\n", "upload_slots", 2),
    ([], {}, 'upload_slots = "3"\n', "upload_slots", 3),
    (["--piece-size", "4MiB"], {}, "", "piece_size", 4 * MiB),
    ([], {"NAIAD_PIECE_SIZE": "2M"}, "", "piece_size", 2 * MiB),
    ([], {"NAIAD_PIECE_SIZE": ""}, "", "piece_size", None),
    ([], {}, "piece_size = 1048576\n", "piece_size", MiB),
    ([], {}, 'piece-size = "512k"\n', "piece_size", 512 * 1024),
])
def test_peer_type_conversion(toml, argv: list[str], env: dict[str, str], text: str,
                              name: str, expected: Any) -> None:
    full = argv + (toml(text) if text else [])
    value = run("peer", full, env)[name]
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(("argv", "env", "text", "expected"), [
    (["--heartbeat-interval", "0.5"], {}, "", 0.5),
    ([], {"NAIAD_HEARTBEAT_INTERVAL": "3"}, "", 3.0),
    ([], {}, "heartbeat_interval = 1\n", 1.0),  # a TOML integer for a float option
    ([], {}, "heartbeat_interval = 1.5\n", 1.5),
])
def test_scheduler_float_conversion(toml, argv: list[str], env: dict[str, str],
                                    text: str, expected: float) -> None:
    value = run("scheduler", argv + (toml(text) if text else []), env)["heartbeat_interval"]
    assert value == expected
    assert isinstance(value, float)


@pytest.mark.parametrize(("section", "argv", "env", "text", "name", "origin"), [
    ("peer", ["--upload-slots", "many"], {}, "", "upload_slots", "--upload-slots"),
    ("peer", ["--upload-slots", "1.5"], {}, "", "upload_slots", "--upload-slots"),
    ("peer", [], {"NAIAD_UPLOAD_SLOTS": "x"}, "", "upload_slots", "NAIAD_UPLOAD_SLOTS"),
    ("peer", [], {"NAIAD_UPLOAD_SLOTS": ""}, "", "upload_slots", "NAIAD_UPLOAD_SLOTS"),
    ("peer", [], {}, 'upload_slots = "x"\n', "upload_slots", "naiad.toml"),
    ("peer", [], {}, "upload_slots = true\n", "upload_slots", "naiad.toml"),
    ("peer", [], {}, "upload_slots = 1.5\n", "upload_slots", "naiad.toml"),
    ("peer", [], {}, "[peer]\norigin-concurrency = [1, 2]\n", "origin_concurrency",
     "naiad.toml"),
    ("peer", ["--piece-size", "lots"], {}, "", "piece_size", "--piece-size"),
    ("peer", [], {"NAIAD_PIECE_SIZE": "-1M"}, "", "piece_size", "NAIAD_PIECE_SIZE"),
    ("scheduler", ["--heartbeat-interval", "fast"], {}, "", "heartbeat_interval",
     "--heartbeat-interval"),
    ("scheduler", [], {"NAIAD_LEASE_TIMEOUT": "2s"}, "", "lease_timeout",
     "NAIAD_LEASE_TIMEOUT"),
    ("scheduler", [], {}, 'lease_timeout = "soon"\n', "lease_timeout", "naiad.toml"),
])
def test_conversion_errors_name_the_option(toml, section: str, argv: list[str],
                                           env: dict[str, str], text: str, name: str,
                                           origin: str) -> None:
    full = argv + (toml(text) if text else [])
    with pytest.raises(ConfigError) as info:
        run(section, full, env)
    assert name in str(info.value)
    assert origin in str(info.value)


def test_conversion_error_is_not_masked_by_a_good_lower_source(toml) -> None:
    # A bad value in a higher source is an error even when a lower one would have been fine.
    with pytest.raises(ConfigError, match="upload_slots"):
        run("peer", toml("upload_slots = 4\n"), {"NAIAD_UPLOAD_SLOTS": "four"})


def test_shadowed_bad_value_in_a_lower_source_is_not_read(toml) -> None:
    # The file's bad value is shadowed by the flag: resolve only converts what it uses.
    opts = run("peer", [*toml('upload_slots = "x"\n'), "--upload-slots", "2"])
    assert opts["upload_slots"] == 2


@pytest.mark.parametrize("text", ['registry = ["https://a", "https://b"]\n',
                                  '[peer]\nlisten = ["0.0.0.0:1"]\n'])
def test_array_for_scalar_option_is_an_error(toml, text: str) -> None:
    with pytest.raises(ConfigError):
        run("peer", toml(text))


# --- unknown keys and bad files ---------------------------------------------------------------

def test_unknown_key_in_own_section_is_an_error(toml) -> None:
    with pytest.raises(ConfigError) as info:
        run("peer", toml('[peer]\nlisten = "0.0.0.0:1"\nupload_slot = 3\nbogus = 1\n'))
    message = str(info.value)
    assert "upload_slot" in message
    assert "bogus" in message
    assert "[peer]" in message


def test_other_commands_option_in_own_section_is_an_error(toml) -> None:
    # `token` is a scheduler option: in [peer] it is a mistake, not something to ignore.
    with pytest.raises(ConfigError, match="token"):
        run("peer", toml('[peer]\ntoken = "t"\n'))
    with pytest.raises(ConfigError, match="seed"):
        run("scheduler", toml("[scheduler]\nseed = true\n"))


def test_other_commands_top_level_keys_are_theirs(toml) -> None:
    argv = toml('token = "for-the-scheduler"\nseed = true\n'
                '[scheduler]\nheartbeat-interval = 9.0\n')
    opts = run("peer", argv)
    assert opts["seed"] is True
    assert "token" not in opts
    sched = run("scheduler", argv)
    assert sched["token"] == "for-the-scheduler"
    assert sched["heartbeat_interval"] == 9.0


@pytest.mark.parametrize(("text", "named"), [
    ("bogus = 1\n", "bogus"),  # no command has it: a typo
    ("uplod-slots = 3\n", "uplod-slots"),
    ('[other]\nanything = "goes"\n', "other"),  # a table no command reads
    ("peer = 3\n", "peer"),  # a command's name, not a table
])
def test_unknown_top_level_key_or_table_is_an_error(toml, text: str, named: str) -> None:
    for section in ("peer", "scheduler"):
        with pytest.raises(ConfigError, match=named):
            run(section, toml(text))


@pytest.mark.parametrize(("section", "argv", "env", "text", "name"), [
    ("peer", ["--upload-slots", "0"], {}, "", "upload_slots"),
    ("peer", [], {"NAIAD_ORIGIN_CONCURRENCY": "0"}, "", "origin_concurrency"),
    ("peer", [], {}, "upload-slots-per-address = 0\n", "upload_slots_per_address"),
    ("peer", ["--disk-quota", "0"], {}, "", "disk_quota"),
    ("peer", ["--upload-rate", "0"], {}, "", "upload_rate"),
    ("peer", ["--piece-size", "3M"], {}, "", "piece_size"),  # not a power of two
    ("peer", ["--piece-size", "128M"], {}, "", "piece_size"),
    ("peer", ["--header-timeout", "0"], {}, "", "header_timeout"),
    ("peer", ["--connections-per-address", "0"], {}, "", "connections_per_address"),
    ("peer", ["--listen", "127.0.0.1:70000"], {}, "", "listen"),
    ("peer", ["--upload", "nowhere"], {}, "", "upload"),
    ("peer", ["--scheduler", "ftp://x"], {}, "", "scheduler"),
    ("peer", ["--log-level", "loud"], {}, "", "log_level"),
    ("scheduler", ["--heartbeat-interval", "-1"], {}, "", "heartbeat_interval"),
    ("scheduler", [], {}, "lease_timeout = 0\n", "lease_timeout"),
    ("scheduler", ["--redis", "localhost:6379"], {}, "", "redis"),
    ("scheduler", ["--udp", "8003"], {}, "", "udp"),
])
def test_out_of_range_values_name_the_option(toml, section: str, argv: list[str],
                                             env: dict[str, str], text: str,
                                             name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        run(section, argv + (toml(text) if text else []), env)


@pytest.mark.parametrize(("argv", "name", "expected"), [
    (["--upload-min-rate", "0"], "upload_min_rate", 0),  # 0: never cut off
    (["--scrub-rate", "0"], "scrub_rate", 0),  # 0: no scrubbing
    (["--upload-slots", "1"], "upload_slots", 1),
    (["--udp", "off"], "udp", "off"),
    (["--redis", "unix:///run/redis.sock"], "redis", "unix:///run/redis.sock"),
    (["--advertise", "https://10.0.0.1:65002"], "advertise", "https://10.0.0.1:65002"),
    (["--log-level", "DEBUG"], "log_level", "debug"),
])
def test_edge_values_are_accepted(argv: list[str], name: str, expected: Any) -> None:
    section = "scheduler" if name in ("udp", "redis") else "peer"
    assert run(section, argv)[name] == expected


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        run("peer", ["--config", str(missing)])
    with pytest.raises(ConfigError):
        run("peer", [], {"NAIAD_CONFIG": str(missing)})


@pytest.mark.parametrize("text", [
    "listen = ",
    "listen = 0.0.0.0:1",  # unquoted string
    "[peer\nlisten = 'x'",
    "a = 1\na = 2\n",  # duplicate key
    "= 3",
])
def test_invalid_toml(toml, text: str) -> None:
    with pytest.raises(ConfigError, match="config file"):
        run("peer", toml(text))


def test_config_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        run("peer", ["--config", str(tmp_path)])


def test_non_utf8_config_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'idc = "caf\xe9"\n')
    with pytest.raises(ConfigError):
        run("peer", ["--config", str(path)])
