"""The pure-Python conninfo parser against libpq's own (through psycopg): same parameters, same refusals."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict

from dbpool_exporter import conninfo

CASES = [
    "", "   ", "host=db port=5432 dbname=app user=u password=secret",
    "host= port=5432", "host = 'a b' dbname='it''s'", r"host='a\' b' user=x\ y", "host='unterminated",
    "host", "host=a nosuch=1", "dbname=x=y", "password='p w' host=h\tport=1",
    "postgresql://", "postgres://h", "postgresql://u:p@h:5433/db?sslmode=disable&application_name=x",
    "postgresql://u:p@x@h/d", "postgresql://h1:1,h2/db", "postgresql://[::1]:5/d", "postgresql://[::1/d",
    "postgresql://%68ost/d?port=1", "postgresql://h/d?ssl=true", "postgresql://h/d?ssl=false",
    "postgresql://h/d?nosuch=1", "postgresql://h/d?port", "postgresql://h/d?port=1=2", "postgresql://h/%zz",
    "postgresql://h/%00", "postgresql:///db?host=/tmp/sock&port=6432", "postgresql://:@h", "postgresql://u:@h",
    "postgresql://h?dbname=x&&port=2", "postgresql://h/d?", "postgresql://@/", "postgresql://u%3Ap@h/d%2Fx",
    "postgresql://h:/d", "postgresql://,/", "POSTGRESQL://h/d", "postgresql://h/db?options=-c%20a%3Db",
    "sslmode=\\", "host=h\\", "postgresql:// ", "postgresql://\t", "postgresql://h/%e9", "postgresql://h?&a=1",
]


def libpq(dsn: str) -> dict[str, str] | None:
    try:
        return {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except Exception:
        return None


def ours(dsn: str) -> dict[str, str] | None:
    try:
        return conninfo.parse(dsn)
    except conninfo.ConninfoError:
        return None


@pytest.mark.parametrize("dsn", CASES)
def test_same_as_libpq(dsn: str) -> None:
    assert ours(dsn) == libpq(dsn)


def test_keywords_cover_libpqs() -> None:
    # An older libpq knows fewer; none it knows may be refused.
    assert {o.keyword.decode() for o in pq.Conninfo.get_defaults()} <= conninfo.KEYWORDS


PIECES = st.sampled_from(["postgresql://", "postgres://", "host", "port", "dbname", "user", "password", "sslmode",
                          "ssl", "true", "=", " ", "'", "\\", "@", ":", "/", "?", "&", ",", "[", "]", "%", "%2", "%41",
                          "%00", "::1", "h", "5432", "x y", "é", "\t"])


@settings(max_examples=3000, deadline=None)
@given(st.lists(PIECES, max_size=14).map("".join))
def test_fuzz_same_as_libpq(dsn: str) -> None:
    assert ours(dsn) == libpq(dsn)
