"""The filter language's parser (``retrieval.filters``): linear, bounded before it parses, every value range
checked at parse time (issue 21, items 1 and 4), and what the index and the CLI make of a refused value:
one line, nothing written."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pytest

from mae.errors import UsageError
from retrieval.filters import (
    MAX_CONDITION_CHARS,
    MAX_FILTERS,
    Condition,
    FilterError,
    parse_filters,
    parse_where,
    time_bounds,
)


def test_conditions_are_typed():
    assert parse_where("  label  =  cat ") == Condition("label", "=", "cat")
    assert parse_where("id>=12").number == 12
    c = parse_where("added=2026-02-03")
    assert c.whole_day and c.time == datetime(2026, 2, 3, tzinfo=timezone.utc)
    assert [o for o, _ in time_bounds(c)] == [">=", "<"]
    later = parse_where("added<2026-02-03T12:30+02:00")
    assert not later.whole_day and later.time == datetime(2026, 2, 3, 10, 30, tzinfo=timezone.utc)
    assert parse_where("tag.my camera^=X1").tag == "my camera"
    assert parse_where("path^=a=b/c").value == "a=b/c", "the first operator splits; the value keeps the rest"
    assert parse_where("label=").value == ""


@pytest.mark.parametrize("bad, words", [
    ("colour=red", "FIELD OP VALUE"), ("label>cat", r"label takes = != \^="), ("labelcat", "FIELD OP VALUE"),
    ("tag.=x", "FIELD OP VALUE"), ("tag. x=1", "FIELD OP VALUE"), ("id^=1", "id takes"), ("id=1.5", "whole number"),
    ("id=-1", "whole number"), ("id=\u0663", "whole number"), ("added>=yesterday", "ISO date"), ("sha256<x", "sha256"),
    ("label^x", "FIELD OP VALUE"),
])
def test_bad_filters_say_how(bad, words):
    with pytest.raises(FilterError, match=words):
        parse_where(bad)


@pytest.mark.parametrize("bad, words", [
    ("added=9999-12-31", "out of range"),  # its whole day ends in year 10000
    ("added>9999-12-31", "out of range"),
    ("added<0001-01-01T00:00+01:00", "out of range"),  # before year 1 in UTC
    ("id=9223372036854775808", "out of range"),  # past int64
    ("id<99999999999999999999999", "out of range"),
    ("label=\ud800", "Unicode"),  # a lone surrogate, as JSON's "\\ud800" escape gives it
    ("tag.\udfff=x", "Unicode"),
    ("path^=/a/\udc80", "Unicode"),
])
def test_values_out_of_range_are_usage_errors_naming_the_condition(bad, words):
    with pytest.raises(UsageError, match=words) as e:
        parse_where(bad)
    assert repr(bad[:12])[1:-1][:8] in str(e.value) or bad[:5] in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
    str(e.value).encode("utf-8")  # the message itself prints anywhere


def test_sizes_are_checked_before_parsing():
    huge = "tag.a" + " " * 65_536 + "b"  # what made the old expression quadratic: 64 KB of spaces, no operator
    with pytest.raises(FilterError, match=f"at most {MAX_CONDITION_CHARS:,}"):
        parse_filters([huge])
    with pytest.raises(FilterError, match=f"at most {MAX_CONDITION_CHARS:,}"):
        parse_where("label=" + "x" * MAX_CONDITION_CHARS)

    class Exploding(str):
        def strip(self, *args):  # would be called by a parse: the count is refused first
            raise AssertionError("parsed")

    with pytest.raises(FilterError, match=f"at most {MAX_FILTERS} conditions"):
        parse_filters(["label=a"] * MAX_FILTERS + [Exploding("label=b")])
    assert len(parse_filters(["label=a"] * MAX_FILTERS)) == MAX_FILTERS
    under = "tag.a" + " " * (MAX_CONDITION_CHARS - 7) + "b"  # the worst case within the limit reads in one pass
    with pytest.raises(FilterError, match="FIELD OP VALUE"):
        parse_where(under)


def test_parsing_is_pure_and_thread_safe():
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"tag.k{i}>={i:04d}" for i in range(200)]
    with ThreadPoolExecutor(4) as pool:
        parsed = list(pool.map(parse_where, texts))
    assert parsed == [parse_where(t) for t in texts] and parsed[7].value == "0007"


# ----------------------------------------------------------------------------------------------- the index, the CLI


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    pytest.importorskip("faiss")
    from retrieval.catalog import Item
    from retrieval.index import build

    x = np.random.default_rng(0).standard_normal((30, 16)).astype(np.float32)
    out = tmp_path_factory.mktemp("parser") / "i"
    build(out, x, [Item(f"/c/{i}.png", f"s{i}", "a") for i in range(30)], artifact_sha256="a" * 64).close()
    return out


@pytest.mark.parametrize("where", ["added=9999-12-31", "added<0001-01-01T00:00+01:00", "id=9223372036854775808",
                                   "label=\ud800"])
def test_the_index_refuses_them_and_writes_nothing(folder, where):
    from retrieval.catalog import Item
    from retrieval.index import Index

    with Index.open(folder) as idx:
        with pytest.raises(UsageError, match="out of range|Unicode"):
            idx.search(np.ones((1, 16), np.float32), 3, where=[where])
        generation, count = idx.generation, idx.count
        for item in (Item("/c/new.png", "new", "\ud800"), Item("/c/new.png", "new", "a", {"k": "\udc00"}),
                     Item("/c/\ud800.png", "new")):
            with pytest.raises(UsageError, match="Unicode"):
                idx.add(np.ones((1, 16), np.float32), [item])
        assert (idx.generation, idx.count) == (generation, count) and idx.ids_by_sha256(["new"]) == {}
        assert idx.manifest["log"] == [], "nothing reached the log"


def test_the_cli_says_it_in_one_line(folder, tmp_path, capsys):
    from cli.main import main

    for where in ("added=9999-12-31", "id=9223372036854775808", "tag.a" + " " * 65_536 + "b"):
        capsys.readouterr()
        assert main(["search", "--index", str(folder), "--id", "1", "--where", where]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and len(err) < 400, err


def test_a_metadata_field_past_the_csv_limit_is_one_line(folder, tmp_path, capsys):
    from cli.main import main

    sidecar = tmp_path / "items.csv"
    sidecar.write_text("path,label,note\n/c/1.png,a," + "x" * 131_073 + "\n")
    assert main(["index", "build", "--artifact", str(tmp_path / "none"), "--images", str(tmp_path), "--out",
                 str(tmp_path / "out"), "--metadata", str(sidecar)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "line 2" in err and "131,072 characters" in err, err
    assert not (tmp_path / "out").exists()
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text(json.dumps({"path": "/c/1.png", "label": "\ud800"}) + "\n")  # JSON's escape: a lone surrogate
    from retrieval.index import Index
    from retrieval.metadata import read_sidecar

    with Index.open(folder) as idx, pytest.raises(UsageError, match="Unicode"):
        idx.annotate(read_sidecar(jsonl, ["/c"]).entries)
