"""Sessions and user files in the database, on SQLite and PostgreSQL (what replicas share)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from zimage_platform.browser import (
    SessionStore,
    UserDataStore,
    UserFileExists,
    UserPathRefused,
    UserQuotaExceeded,
)
from zimage_platform.db import create_db_engine


def test_sessions(database_url):
    store = SessionStore(create_db_engine(database_url))
    token, row = store.create("acme", "key1", timedelta(hours=1))
    assert row.token_hash != token and len(token) >= 43
    assert store.get(token).tenant_id == "acme" and store.get(token + "x") is None
    dead, _ = store.create("acme", "key1", timedelta(seconds=-1))
    assert store.get(dead) is None
    other, _ = store.create("acme", "key2", timedelta(hours=1))  # sweeps the expired one
    assert store.end_key("key1") == 1 and store.get(token) is None and store.get(other) is not None
    assert store.end(other) and not store.end(other)


def test_user_files(database_url):
    store = UserDataStore(create_db_engine(database_url), max_file_bytes=100, max_total_bytes=200, max_files=5)
    store.write("acme", "workflows/a_%.json", b"\x00binary\xff")
    store.write("acme", "workflows/deep/b.json", b"{}")
    store.write("acme", "workflowsX/c.json", b"{}")  # a sibling folder whose name starts alike
    store.write("globex", "workflows/a_%.json", b"theirs")
    assert store.read("acme", "workflows/a_%.json").data == b"\x00binary\xff"
    assert [r.path for r in store.list("acme", "workflows", recurse=False)] == ["workflows/a_%.json"]
    assert [r.path for r in store.list("acme", "workflows/", recurse=True)] == [
        "workflows/a_%.json",
        "workflows/deep/b.json",
    ]
    assert store.list("acme", "workflows_", recurse=True) is None  # LIKE wildcards are escaped
    with pytest.raises(UserFileExists):
        store.write("acme", "workflows/deep/b.json", b"[]", overwrite=False)
    with pytest.raises(UserPathRefused):
        store.write("acme", "workflows", b"{}")  # a folder already
    with pytest.raises(UserPathRefused):
        store.write("acme", "workflows/a_%.json/inner", b"{}")  # under a file
    with pytest.raises(UserPathRefused):
        store.read("acme", "../globex/workflows/a_%.json")
    with pytest.raises(UserQuotaExceeded):
        store.write("acme", "big", b"x" * 101)
    store.write("acme", "f1", b"x" * 100)
    with pytest.raises(UserQuotaExceeded):
        store.write("acme", "f2", b"x" * 100)  # 200 bytes together
    store.write("acme", "f2", b"x")
    with pytest.raises(UserQuotaExceeded):
        store.write("acme", "f3", b"x")  # 5 files
    moved = store.move("acme", "workflows/deep/b.json", "workflows/b.json")
    assert moved.path == "workflows/b.json" and store.read("acme", "workflows/deep/b.json") is None
    assert store.move("acme", "nope", "x") is None
    with pytest.raises(UserFileExists):
        store.move("acme", "workflows/b.json", "workflows/a_%.json", overwrite=False)
    assert store.move("acme", "workflows/b.json", "workflows/a_%.json").data == b"{}"
    assert store.delete("acme", "workflows/a_%.json") and not store.delete("acme", "workflows/a_%.json")
    assert store.read("globex", "workflows/a_%.json").data == b"theirs"
    assert store.has_any("globex") and not store.has_any("initech")
