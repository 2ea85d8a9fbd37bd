"""Property-based fuzzing of the config loader: whatever the file holds, ``check-config`` exits 0 or 2 and never
prints a traceback, a password, or a problem spread over several lines; a file it accepts can really be run.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote, quote_plus

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemonproc import clean_env, exporter_command
from dbpool_exporter.cli import main
from dbpool_exporter.config import SERVER_DEFAULTS, ConfigError, load_file

SECRET = "Fuzz-s3cret:pw@x"
SECRET_FORMS = (SECRET, quote(SECRET, safe=""), quote_plus(SECRET))
SECRET_DSN = f"postgresql://mon:{quote(SECRET, safe='')}@db.example:5432/postgres"
# The same password reached through an environment variable and through a file, each for another server.
ENV_DSN = f"postgresql://mon:{quote(SECRET, safe='')}@env.example:5432/postgres"
FILE_DSN = f"host=file.example user=mon password='{SECRET}'"
ENV_NAME = "DBPOOL_FUZZ_DSN"
SETTINGS = settings(max_examples=200, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DURATION_KEYS = [k for k in SERVER_DEFAULTS if k != "max_label_values"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory for the generated files, a DSN file holding the secret, and an env var that does too."""
    path = tmp_path_factory.mktemp("fuzz")
    (path / "dsn").write_text(FILE_DSN + "\n")
    old = os.environ.get(ENV_NAME)
    os.environ[ENV_NAME] = ENV_DSN
    yield path
    if old is None:
        os.environ.pop(ENV_NAME, None)
    else:
        os.environ[ENV_NAME] = old


# --- what a config file might hold --------------------------------------------------------------------
def _dsns(workdir: Path) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from([SECRET_DSN, f"host=db.example user=mon password='{SECRET}'", f"host=h password {SECRET}",
                         "postgresql://mon@127.0.0.1:5432/postgres", "host=h port=5433 dbname=d", "not a dsn",
                         f"${{{ENV_NAME}}}", "${NOT_SET_FUZZ}", "${NOT_SET_FUZZ:-postgresql://h/d}", "$$", "",
                         f"postgresql://mon:{quote(SECRET, safe='')}@db.example:99999/postgres"]),
        st.text(max_size=40), st.integers(), st.none())


def _durations() -> st.SearchStrategy[Any]:
    number = st.one_of(st.integers(-5, 10**20), st.floats(allow_nan=True, allow_infinity=True))
    unit = st.sampled_from(["", "ms", "s", "m", "h", " s", "x", "sec"])
    return st.one_of(number, st.builds(lambda n, u: f"{n}{u}", number, unit), st.text(max_size=10), st.booleans(),
                     st.none())


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
                     st.text(max_size=30), st.sampled_from([SECRET_DSN, "\n", "a\nb", "x" * 10_000, "ünï☃"]))
_anything = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.one_of(st.text(max_size=10), st.integers()), inner, max_size=4),
                         max_leaves=12)
_unknown_keys = st.one_of(st.text(max_size=12), st.sampled_from(["servers_typo", "a\nb", "x" * 500]))


def _server(workdir: Path) -> st.SearchStrategy[Any]:
    paths = st.sampled_from([str(workdir / "dsn"), str(workdir / "missing"), str(workdir), SECRET_DSN, ""])
    fields: dict[str, st.SearchStrategy[Any]] = {
        "name": st.one_of(st.text(max_size=20), st.sampled_from(["a", "b", "x" * 200]), _scalars),
        "dsn": _dsns(workdir),
        "dsn_env": st.one_of(st.sampled_from([ENV_NAME, "NOT_SET_FUZZ", SECRET_DSN, "A\nB"]), _scalars),
        "dsn_file": st.one_of(paths, _scalars),
        "max_label_values": st.one_of(st.integers(-3, 2**70), st.text(max_size=5), _scalars),
        **{key: _durations() for key in DURATION_KEYS},
    }
    known = st.fixed_dictionaries({}, optional=fields)
    return st.one_of(known, st.builds(lambda d, k, v: {**d, k: v}, known, _unknown_keys, _anything), _anything)


def _documents(workdir: Path) -> st.SearchStrategy[Any]:
    settings_ = st.fixed_dictionaries({}, optional={key: _durations() for key in DURATION_KEYS})
    labels = st.dictionaries(st.one_of(st.sampled_from(["env", "team", "server", "__x", "bad-name", SECRET_DSN]),
                                       st.text(max_size=8)), _scalars, max_size=3)
    top = st.fixed_dictionaries({}, optional={
        "servers": st.one_of(st.lists(_server(workdir), max_size=4), _anything),
        "defaults": st.one_of(settings_, _anything),
        "const_labels": st.one_of(labels, _anything),
    })
    return st.one_of(top, st.builds(lambda d, k, v: {**d, k: v}, top, _unknown_keys, _anything), _anything)


def _render(doc: Any, flow: bool | None, unicode: bool) -> bytes:
    return yaml.safe_dump(doc, default_flow_style=flow, allow_unicode=unicode, sort_keys=False).encode()


# --- the property ---------------------------------------------------------------------------------
def check_config(path: Path) -> tuple[int, str, str]:
    """``dbpool-exporter check-config`` in-process; any exception escaping ``main`` fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["check-config", str(path)])
    return code, out.getvalue(), err.getvalue()


def assert_well_behaved(path: Path, content: bytes) -> int:
    path.write_bytes(content)
    code, out, err = check_config(path)
    for form in SECRET_FORMS:
        assert form not in out + err, f"the password shows in check-config's output:\n{out}{err}"
    assert "Traceback" not in out + err
    assert "\r" not in out + err
    if code == 0:
        assert not err and out.startswith("ok: ") and out.count("\n") == 1, (out, err)
        config = load_file(str(path))
        for server in config.servers:
            for key in DURATION_KEYS:
                seconds = getattr(server, key)
                # The scheduler and the timeouts need a finite timedelta; check-config must not pass what run
                # would crash on.
                assert math.isfinite(seconds) and seconds > 0, (key, seconds)
                try:
                    timedelta(seconds=seconds)
                except OverflowError:
                    pytest.fail(f"{key}: check-config accepts {seconds:g} s, which the scheduler cannot take")
        return code
    assert code == 2, (code, out, err)
    assert not out and err.endswith("\n"), (out, err)
    with pytest.raises(ConfigError) as info:
        load_file(str(path))
    lines = err[:-1].split("\n")
    # Exactly one line per problem, each naming where: "field: what is wrong".
    assert len(lines) == len(info.value.problems), lines
    assert all(line.strip() and ": " in line for line in lines), lines
    return code


@SETTINGS
@given(data=st.data(), flow=st.sampled_from([None, True, False]), unicode=st.booleans())
def test_structured_documents(workdir: Path, data: st.DataObject, flow: bool | None, unicode: bool) -> None:
    doc = data.draw(_documents(workdir))
    assert_well_behaved(workdir / "doc.yml", _render(doc, flow, unicode))


VALID = (f"defaults: {{interval: 10s}}\nconst_labels: {{env: prod}}\nservers:\n"
         f"  - name: main\n    dsn: '{SECRET_DSN}'\n    max_label_values: 20\n"
         f"  - name: env\n    dsn_env: {ENV_NAME}\n    interval: 500ms\n").encode()


@SETTINGS
@given(edits=st.lists(st.tuples(st.integers(0, len(VALID)), st.integers(0, 5), st.binary(max_size=4)), max_size=4))
def test_mutated_valid_file(workdir: Path, edits: list[tuple[int, int, bytes]]) -> None:
    """The valid file with bytes cut and inserted at random places: indentation, quotes and colons break."""
    content = VALID
    for at, cut, insert in edits:
        content = content[:at] + insert + content[at + cut:]
    assert_well_behaved(workdir / "mutated.yml", content)


@SETTINGS
@given(content=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_random_bytes_and_text(workdir: Path, content: bytes) -> None:
    assert_well_behaved(workdir / "random.yml", content)


@pytest.mark.parametrize("depth", [50, 500, 5000])
@pytest.mark.parametrize("opener", ["[", "{a: ", "- "])
def test_deep_nesting(workdir: Path, depth: int, opener: str) -> None:
    # Not drawn by hypothesis: where recursion breaks depends on the caller's stack, which would make it flaky.
    if opener == "- ":
        text = "servers:\n" + "".join("  " * i + "- " for i in range(depth)) + "x\n"
    else:
        text = "servers: " + opener * depth + "x" + {"[": "]", "{a: ": "}"}[opener] * depth + "\n"
    assert_well_behaved(workdir / "deep.yml", text.encode())


# --- regressions the fuzzer found, spelled out ---------------------------------------------------------
@pytest.mark.parametrize(("content", "expected"), [
    pytest.param(b"{[a]: 1}", "unhashable", id="sequence-as-key"),
    pytest.param(b"? {a: 1}\n: 1\nservers: []\n", "unhashable", id="mapping-as-key"),
    pytest.param(b"servers: &a [*a]\n", "recursive", id="self-referencing-alias"),
    pytest.param(b"servers: [{name: a, dsn: 'postgresql://h/d', \"bad\\nkey\": 1}]\n", "newline", id="newline-key"),
    pytest.param(b"servers: [{name: a, dsn_env: \"A\\nB\"}]\n", "newline", id="newline-env-name"),
    pytest.param(b"servers: [{name: a, dsn: 'postgresql://h/d', interval: .inf}]\n", "inf", id="infinite-interval"),
    pytest.param(b"servers: [{name: a, dsn: 'postgresql://h/d', interval: 99999999999999999h}]\n", "huge",
                 id="huge-interval"),
    pytest.param(b"servers: [{name: a, dsn: 'postgresql://h/d', statement_timeout: .inf}]\n", "inf",
                 id="infinite-statement-timeout"),
])
def test_found_cases(workdir: Path, content: bytes, expected: str) -> None:
    assert_well_behaved(workdir / "case.yml", content)


def test_alias_bomb_bounded(workdir: Path) -> None:
    """500 bytes of nested aliases name 10^9 values; reading them must not take the machine's memory.

    A real process under a 400 MB address-space cap (the checker alone needs under 200 MB): it must answer
    with exit 0 or 2, not die of MemoryError after walking the expanded tree.
    """
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path = workdir / "bomb.yml"
    path.write_text("\n".join(lines) + "\nservers: [{name: a, dsn: 'postgresql://h/d'}]\n")
    import resource

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (400 * 2**20, 400 * 2**20))

    result = subprocess.run([*exporter_command(), "check-config", str(path)], capture_output=True, text=True,
                            timeout=120, env=clean_env(), preexec_fn=cap)
    assert result.returncode in (0, 2) and "Traceback" not in result.stderr, result.stderr[-2000:]


# --- the real process behaves the same ----------------------------------------------------------------
@pytest.mark.parametrize("content", [
    VALID,
    b"servers: [{name: a, dsn: 'postgresql://h/d', interval: soon}, {name: b}]\n",
    b"servers: [\n",
    b"\xff\xfe\x00binary",
    b"",
    b"- a\n- list\n",
    b"servers: [{name: a, dsn: 'host=h password " + SECRET.encode() + b"'}]\n",
], ids=["valid", "two-problems", "broken-yaml", "binary", "empty", "list", "bad-conninfo-with-password"])
def test_real_process_matches_in_process(workdir: Path, content: bytes) -> None:
    path = workdir / "real.yml"
    path.write_bytes(content)
    code, out, err = check_config(path)
    result = subprocess.run([*exporter_command(), "check-config", str(path)], capture_output=True, text=True,
                            timeout=60, env={**clean_env(), ENV_NAME: ENV_DSN})
    assert (result.returncode, result.stdout, result.stderr) == (code, out, err)
    assert code in (0, 2) and "Traceback" not in result.stderr and SECRET not in result.stdout + result.stderr
    assert_well_behaved(path, content)
