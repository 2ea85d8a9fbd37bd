"""Config parsing and ``check-config``: good files pass, each problem is one line naming its field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dbpool_exporter.cli import main
from dbpool_exporter.config import ConfigError, from_environment, load_file, parse

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "dbpool-exporter.yml"
SECRET = "Tr0ub4dor-and-3"


def _write(tmp_path: Path, text: str, name: str = "dbpool.yml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_file(_write(tmp_path, text), env=env or {})
    return info.value.problems


def test_example_file_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    replica = tmp_path / "replica-dsn"
    replica.write_text(f"postgresql://monitor:{SECRET}@replica:5432/postgres\n")
    monkeypatch.setenv("MAIN_DSN", "postgresql://monitor@db1:5432/postgres")
    monkeypatch.setenv("REPLICA_DSN_FILE", str(replica))
    monkeypatch.delenv("PGPORT", raising=False)
    assert main(["check-config", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("ok: ") and "3 server(s) (main, replica, local)" in out and not err
    config = load_file(str(EXAMPLE))
    main_, replica_, local = config.servers
    assert replica_.dsn == f"postgresql://monitor:{SECRET}@replica:5432/postgres"  # the file, stripped
    assert replica_.interval == 30 and main_.interval == 10
    assert local.dsn == "postgresql://monitor@127.0.0.1:5432/postgres?sslmode=disable"  # ${PGPORT:-5432}
    assert config.const_labels == {"environment": "production"}
    assert SECRET not in repr(config)


def test_defaults_durations_and_interpolation(tmp_path: Path) -> None:
    path = _write(tmp_path, """
defaults: {interval: 500ms, statement_timeout: "2s", backoff_max: 1m}
servers:
  - name: a
    dsn: "postgresql://u:${PW}@h:${PORT:-6543}/d"
    max_label_values: 7
  - name: b
    dsn: "host=h user=u password=$$ecret"
    interval: 3
""")
    config = load_file(path, env={"PW": SECRET})
    a, b = config.servers
    assert a.dsn == f"postgresql://u:{SECRET}@h:6543/d"
    assert (a.interval, a.statement_timeout, a.backoff_max, a.max_label_values) == (0.5, 2.0, 60.0, 7)
    assert b.dsn == "host=h user=u password=$ecret" and b.interval == 3 and b.connect_timeout == 5


@pytest.mark.parametrize(("text", "expected"), [
    ("servers: []", "servers: at least one server is required"),
    ("{}", "servers: required"),
    ("servers: {a: 1}", "servers: expected a list"),
    ("- 1\n- 2", "config: expected a mapping at the top level"),
    ("servers: [{name: a, dsn: 'postgresql://h/d'}]\nextra: 1", "extra: unknown key"),
    ("servers: [{name: a, dsn: 'postgresql://h/d', intervall: 1}]", "servers[0].intervall: unknown key"),
    ("servers: [{name: a}]", "servers[0]: set exactly one of dsn, dsn_env, dsn_file (got none)"),
    ("servers: [{name: a, dsn: 'postgresql://h/d', dsn_env: X}]", "servers[0]: set exactly one of"),
    ("servers: [{dsn: 'postgresql://h/d'}]", "servers[0].name: required"),
    ("servers: [{name: a, dsn: 'postgresql://h/d'}, {name: a, dsn: 'postgresql://h/d'}]",
     "servers[1].name: duplicate server name 'a'"),
    ("servers: [{name: a, dsn: 'postgresql://h/d'}, {name: b, dsn: 'host=h password'}]",
     "servers[1].dsn: not a valid PostgreSQL connection string"),
    ("servers: [{name: a, dsn: 42}]", "servers[0].dsn: expected a non-empty string"),
    ("servers: [{name: a, dsn: 'postgresql://h:5433/d'}, {name: b, dsn: 'host=h port=5433 dbname=e'}]",
     "servers[1].dsn: same server (h:5433) as servers[0]"),
    ("servers: [{name: a, dsn_env: NOT_SET_ANYWHERE}]", "servers[0].dsn_env: environment variable NOT_SET_ANYWHERE"),
    ("servers: [{name: a, dsn_file: /nonexistent/dsn}]", "servers[0].dsn_file: cannot read /nonexistent/dsn"),
    ("servers: [{name: a, dsn: '${NOPE}'}]", "servers[0].dsn: environment variable NOPE is not set"),
    ("servers: [{name: a, dsn: 'postgresql://h/d', interval: -1}]", "servers[0].interval: must be greater than 0"),
    ("servers: [{name: a, dsn: 'postgresql://h/d', interval: soon}]", "servers[0].interval: expected a duration"),
    ("servers: [{name: a, dsn: 'postgresql://h/d', statement_timeout: true}]",
     "servers[0].statement_timeout: expected a duration"),
    ("servers: [{name: a, dsn: 'postgresql://h/d', max_label_values: 0}]",
     "servers[0].max_label_values: must be at least 1"),
    ("servers: [{name: a, dsn: 'postgresql://h/d', max_label_values: 2.5}]",
     "servers[0].max_label_values: expected a whole number"),
    ("defaults: {interval: 0}\nservers: [{name: a, dsn: 'postgresql://h/d'}]", "defaults.interval: must be greater"),
    ("defaults: {name: x}\nservers: [{name: a, dsn: 'postgresql://h/d'}]", "defaults.name: unknown key"),
    ("defaults: []\nservers: [{name: a, dsn: 'postgresql://h/d'}]", "defaults: expected a mapping"),
    ("const_labels: {server: x}\nservers: [{name: a, dsn: 'postgresql://h/d'}]",
     "const_labels.server: the exporter sets this label itself"),
    ("const_labels: {'bad-name': x}\nservers: [{name: a, dsn: 'postgresql://h/d'}]",
     "const_labels.bad-name: not a valid label name"),
    ("const_labels: {env: [1]}\nservers: [{name: a, dsn: 'postgresql://h/d'}]", "const_labels.env: expected a string"),
    ("servers: [{name: a, dsn: 'postgresql://h/d', name: b}]", "invalid YAML: duplicate key 'name'"),
    ("servers:\n  - name: a\n   dsn: x", "invalid YAML"),
])
def test_each_problem_names_its_field(tmp_path: Path, text: str, expected: str) -> None:
    problems = _problems(tmp_path, text)
    assert any(expected in p for p in problems), problems


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    problems = _problems(tmp_path, """
servers:
  - name: a
    dsn: postgresql://h/d
    interval: 0
  - name: b
    dsn_env: NOPE
    colour: blue
""")
    assert [p.split(":")[0] for p in problems] == ["servers[0].interval", "servers[1].colour", "servers[1].dsn_env"]


def test_problems_never_quote_a_password(tmp_path: Path) -> None:
    # A malformed conninfo (libpq would quote the fragment after the password) and YAML broken on the DSN line.
    for text in (f"servers: [{{name: a, dsn: 'host=h password {SECRET}'}}]",
                 f"servers:\n  - name: a\n     dsn: postgresql://u:{SECRET}@h/d\n   bad"):
        problems = _problems(tmp_path, text)
        assert problems and not any(SECRET in p for p in problems), problems


def test_environment_mode(tmp_path: Path) -> None:
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text("postgresql://u@h/d\n")
    assert from_environment({"DATA_SOURCE_NAME": "postgresql://x@h/d"}).servers[0].dsn == "postgresql://x@h/d"
    config = from_environment({"DATA_SOURCE_NAME_FILE": str(dsn_file)})
    assert config.servers[0].name == "default" and config.servers[0].dsn == "postgresql://u@h/d"
    for env in ({}, {"DATA_SOURCE_NAME": "postgresql://h/d", "DATA_SOURCE_NAME_FILE": str(dsn_file)}):
        with pytest.raises(ConfigError) as info:
            from_environment(env)
        assert len(info.value.problems) == 1 and info.value.problems[0].startswith(("config:", "DATA_SOURCE_NAME"))


def test_parse_accepts_an_empty_document_as_missing_servers() -> None:
    with pytest.raises(ConfigError, match="servers: required"):
        parse(None, env={})


@pytest.mark.parametrize("content", [b"servers: [", b"\xff\xfe\x00binary", b"- just\n- a list\n", b""])
def test_check_config_bad_files_exit_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         content: bytes) -> None:
    path = tmp_path / "bad.yml"
    path.write_bytes(content)
    assert main(["check-config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert not out and err.strip() and "Traceback" not in err
    assert all(": " in line for line in err.strip().splitlines())


def test_check_config_cli_process(tmp_path: Path) -> None:
    """The installed console script: exit codes and output, including for a directory and a missing file."""
    exe = Path(sys.executable).with_name("dbpool-exporter")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "dbpool_exporter.cli"]
    good = _write(tmp_path, "servers: [{name: a, dsn: 'postgresql://u@127.0.0.1/d'}]", "good.yml")
    bad = _write(tmp_path, "servers: [{name: a, dsn: 'postgresql://h/d', interval: x}, {name: b}]", "bad.yml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATA_SOURCE_NAME")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, env=env)

    ok = run("check-config", good)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: ") and not ok.stderr
    failed = run("check-config", bad)
    assert failed.returncode == 2 and not failed.stdout
    assert failed.stderr.splitlines() == [
        "servers[0].interval: expected a duration (seconds, or a string like '500ms', '10s', '1m'), got str",
        "servers[1]: set exactly one of dsn, dsn_env, dsn_file (got none)"]
    for args in (("check-config", str(tmp_path / "missing.yml")), ("check-config", str(tmp_path)),
                 ("check-config",), ("check-config", good, "extra"), ("no-such-command",), ()):
        result = run(*args)
        assert result.returncode == 2, (args, result)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, (args, result)


def test_readme_shows_the_example_file_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "```yaml\n" + EXAMPLE.read_text() + "```" in readme


def test_subcommands_plug_in_from_their_own_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """demo/budget-style modules add a subcommand through add_parser(subparsers); absent ones are skipped."""
    (tmp_path / "plug_ok.py").write_text(
        "def add_parser(subparsers):\n"
        "    p = subparsers.add_parser('hello')\n"
        "    p.add_argument('--times', type=int, default=1)\n"
        "    p.set_defaults(func=lambda args: print('hi' * args.times) or 0)\n")
    (tmp_path / "plug_broken.py").write_text("import module_that_is_not_installed_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("dbpool_exporter.cli.PLUGINS", ("plug_ok", "plug_broken", "plug_absent"))
    assert main(["hello", "--times", "2"]) == 0
    assert capsys.readouterr().out == "hihi\n"
    assert main(["plug_broken"]) == 1
    assert "plug_broken is unavailable" in capsys.readouterr().err
    assert main(["hello", "--bogus"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize(("text", "seconds"), [("1m30s", 90.0), ("1h 30m", 5400.0), ("250ms", 0.25), (" 2 s ", 2.0),
                                               ("1.5", 1.5), (".5m", 30.0), (7, 7.0), (0.25, 0.25)])
def test_one_duration_grammar(tmp_path: Path, text: object, seconds: float) -> None:
    """Go's duration syntax, as the web config reads it, plus bare numbers of seconds."""
    value = repr(text) if isinstance(text, str) else text
    config = load_file(_write(tmp_path, f"servers: [{{name: a, dsn: 'postgresql://h/d', interval: {value}}}]"))
    assert config.servers[0].interval == pytest.approx(seconds)


@pytest.mark.parametrize(("value", "expected"), [
    ("'-1s'", "must be greater than 0, got '-1s'"), ("1s5", "expected a duration"), ("'1d'", "expected a duration"),
    ("25h", "must be at most 86400 seconds (a day)"), (".nan", "must be greater than 0"),
])
def test_bad_durations(tmp_path: Path, value: str, expected: str) -> None:
    problems = _problems(tmp_path, f"servers: [{{name: a, dsn: 'postgresql://h/d', interval: {value}}}]")
    assert problems == [f"servers[0].interval: {expected}"] or problems[0].startswith(
        f"servers[0].interval: {expected}"), problems


def test_empty_keys_are_unset_and_aliases_refused(tmp_path: Path) -> None:
    config = load_file(_write(tmp_path, "defaults:\nconst_labels:\nservers: [{name: a, dsn: 'postgresql://h/d'}]"))
    assert config.servers[0].interval == 10 and config.const_labels == {}
    problems = _problems(tmp_path, "x: &dsn 'postgresql://h/d'\nservers: [{name: a, dsn: *dsn}]")
    assert len(problems) == 1 and problems[0].endswith("invalid YAML: aliases (*name) are not supported"), problems


def test_redaction_is_one_function() -> None:
    """Exact secrets go first (longest first, so a DSN before the password in it), then anything password-like."""
    from dbpool_exporter.redact import redact, secrets

    dsn = f"postgresql://u:{SECRET}@h/d"
    hidden = secrets(SECRET, dsn, "abc", None, "")
    assert hidden == (dsn, SECRET)  # short ones are left to the patterns: blanking them would garble everything
    assert redact(f"bad {dsn}; pw {SECRET}; host=h password=abc", hidden) == "bad ***; pw ***; host=h password=***"


def test_config_module_needs_no_asyncpg() -> None:
    code = ("import sys; import dbpool_exporter.config as c; "
            "print(sorted(m for m in ('asyncpg', 'sqlalchemy', 'bcrypt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "asyncpg" not in out, out
