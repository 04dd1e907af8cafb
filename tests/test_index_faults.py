"""Damaged indexes: every part (manifest.json, index.faiss, items.sqlite) truncated, emptied, garbled or deleted,
against every command that reads it; then ``mae index check`` and ``--repair``.

Each command must stop with one line naming the damaged file and the way out (exit 1, no traceback), and
never write: an index whose parts disagree is refused, not silently recreated.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import retrieval  # noqa: F401  (first: sets passive OpenMP waiting before faiss loads its runtime)

pytest.importorskip("faiss")

from cli.main import main  # noqa: E402
from retrieval.index import Index, IndexDamagedError  # noqa: E402
from tests.conftest import DAMAGES, damage  # noqa: E402
from tests.serving_support import tiny_artifact  # noqa: E402

PARTS = ("manifest.json", "index.faiss", "items.sqlite")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny artifact, 40 digits in class folders, their index, and 4 more digits to add."""
    from mae.sources import export_source, load_source
    from retrieval.build import build_index

    tmp = tmp_path_factory.mktemp("faults")
    artifact = tiny_artifact(tmp / "artifact")
    source = load_source("digits")
    export_source(source, tmp / "digits", range(40))
    export_source(source, tmp / "more", range(100, 104))
    build_index(artifact, [tmp / "digits"], tmp / "index", workers=0, progress=False)
    return {"artifact": artifact, "index": tmp / "index", "digits": tmp / "digits", "more": tmp / "more",
            "query": sorted((tmp / "digits").rglob("*.png"))[3]}


def commands(p: dict, index: Path) -> dict[str, list[str]]:
    return {
        "search": ["search", "--index", str(index), str(p["query"]), "-k", "3"],
        "search --id": ["search", "--index", str(index), "--id", "2"],
        "add": ["index", "add", "--index", str(index), str(p["more"]), "--workers", "0"],
        "remove": ["index", "remove", "--index", str(index), "1"],
        "info": ["index", "info", "--index", str(index)],
        "duplicates": ["index", "duplicates", "--index", str(index)],
    }


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("part", PARTS)
def test_a_damaged_part_is_refused_by_every_command(pristine, tmp_path, capsys, part, how):
    index = tmp_path / "index"
    shutil.copytree(pristine["index"], index)
    damage(index / part, how)
    before = {f.name: f.read_bytes() for f in index.iterdir() if f.is_file()}
    for name, argv in commands(pristine, index).items():
        capsys.readouterr()
        assert main(argv) == 1, f"{name} accepted an index with {part} {how}"
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, f"{name}: {err}"
        assert part in err and "mae index check" in err, f"{name}: {err}"
    after = {f.name: f.read_bytes() for f in index.iterdir() if f.is_file()}
    assert after == before, "a refused command changed the index"
    # mae serve stops the same way before starting any worker
    from serving.command import add_arguments, command_line

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--artifact", str(pristine["artifact"]), "--index", str(index), "--port", "1"])
    with pytest.raises(IndexDamagedError, match=part.replace(".", r"\.")):
        command_line(args)
    # and `mae index check` says what is wrong, exit 1
    assert main(["index", "check", "--index", str(index)]) == 1
    out = capsys.readouterr().out
    assert "problem" in out and part in out and "--repair" in out


def test_a_deleted_catalogue_no_longer_lets_an_old_vector_answer_as_a_new_file(pristine, tmp_path, capsys):
    """Finding 1 of issue 14, as it was found: delete items.sqlite, search, add, search again."""
    index = tmp_path / "index"
    shutil.copytree(pristine["index"], index)
    (index / "items.sqlite").unlink()
    assert main(["search", "--index", str(index), str(pristine["query"])]) == 1
    assert "items.sqlite is missing" in capsys.readouterr().err
    assert main(["index", "add", "--index", str(index), str(pristine["more"]), "--workers", "0"]) == 1
    assert not (index / "items.sqlite").exists(), "a refused add recreated the catalogue"
    # the way out: repair drops the vectors nothing describes and keeps their ids reserved
    assert main(["index", "check", "--index", str(index), "--repair", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["count"] == 0 and len(report["dropped"]) == 40
    assert all(d["why"] == "a vector with no catalogue row" for d in report["dropped"])
    assert main(["index", "add", "--index", str(index), str(pristine["digits"]), "--workers", "0", "--json"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["count"] == 40 and min(added["ids"]) > 40, "an id an old vector held was given out again"
    assert main(["search", "--index", str(index), str(pristine["query"]), "-k", "1", "--json"]) == 0
    hit = json.loads(capsys.readouterr().out)["neighbours"][0]
    assert hit["file"] == str(pristine["query"].resolve()) and hit["score"] > 0.999


@pytest.mark.parametrize("how", DAMAGES)
def test_repair_embeds_the_images_again_when_index_faiss_is_lost(pristine, tmp_path, capsys, how):
    index = tmp_path / "index"
    shutil.copytree(pristine["index"], index)
    damage(index / "index.faiss", how)
    victim = sorted(pristine["digits"].rglob("*.png"))[0]
    moved = tmp_path / victim.name
    shutil.copy(victim, moved)
    victim.unlink()  # one catalogued file is gone: it cannot be embedded again
    try:
        assert main(["index", "check", "--index", str(index), "--repair", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
    finally:
        shutil.copy(moved, victim)
    assert report["ok"] and report["count"] == 39
    assert [d["path"] for d in report["dropped"]] == [str(victim.resolve())]
    idx = Index.load(index)
    assert idx.count == 39 and idx.search(np.ones((1, idx.dim)), 5)[0]


@pytest.mark.parametrize("how", DAMAGES)
def test_repair_rewrites_a_lost_manifest(pristine, tmp_path, capsys, how):
    index = tmp_path / "index"
    shutil.copytree(pristine["index"], index)
    damage(index / "manifest.json", how)
    assert main(["index", "check", "--index", str(index), "--repair"]) == 1
    assert "pass --artifact" in capsys.readouterr().err
    assert main(["index", "check", "--index", str(index), "--repair", "--artifact", str(pristine["artifact"])]) == 0
    capsys.readouterr()
    assert main(["search", "--index", str(index), str(pristine["query"]), "-k", "1", "--artifact",
                 str(pristine["artifact"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["count"] == 40 and out["neighbours"][0]["file"] == str(pristine["query"].resolve())


def test_a_manifest_with_a_null_count_is_named_and_repaired(pristine, tmp_path, capsys):
    index = tmp_path / "index"
    shutil.copytree(pristine["index"], index)
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["count"] = None
    (index / "manifest.json").write_text(json.dumps(manifest))
    assert main(["index", "info", "--index", str(index)]) == 1
    assert "'count' must be a whole number >= 0, got None" in capsys.readouterr().err
    assert main(["index", "check", "--index", str(index), "--repair"]) == 0  # the sha256 survives in the file
    assert "rebuilt manifest.json" in capsys.readouterr().out
    assert Index.load(index).count == 40


def test_a_catalogue_that_disagrees_is_found_and_repaired(pristine, tmp_path, capsys):
    """A readable catalogue that lost rows (another index's, an old backup): counts and ids disagree."""
    import sqlite3

    index = tmp_path / "index"
    shutil.copytree(pristine["index"], index)
    with sqlite3.connect(index / "items.sqlite") as c:
        c.execute("DELETE FROM items WHERE id IN (3, 4)")
    assert main(["index", "info", "--index", str(index)]) == 1
    assert "lists 38 live items but" in capsys.readouterr().err
    assert main(["index", "check", "--index", str(index)]) == 1
    assert "2 vector(s) in" in capsys.readouterr().out
    assert main(["index", "check", "--index", str(index), "--repair", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 38 and sorted(d["id"] for d in report["dropped"]) == [3, 4]
    assert main(["index", "check", "--index", str(index)]) == 0
    assert "consistent" in capsys.readouterr().out


def test_search_k_is_capped_and_huge_ids_name_no_item(pristine, capsys):
    assert main(["search", "--index", str(pristine["index"]), str(pristine["query"]), "-k", "1000000000",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["k"] == 40 and len(out["neighbours"]) == 40
    assert Index.load(pristine["index"]).row(10**30) is None
    assert main(["search", "--index", str(pristine["index"]), "--id", str(10**19)]) == 1
    assert f"no item {10**19}" in capsys.readouterr().err
