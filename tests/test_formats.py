"""The format registry (export/formats.py) is the one place a format is named: every name a row gives resolves, and
every consumer (the CLI, the serving settings, Embedder, parity, verify_artifact) takes its choices from it."""

from __future__ import annotations

import argparse
import inspect
from types import SimpleNamespace

import pytest

from export import formats
from export.formats import FORMATS, Format


def _export_parser() -> argparse.ArgumentParser:
    from export.command import add_export_arguments

    p = argparse.ArgumentParser()
    add_export_arguments(p)
    return p


@pytest.mark.parametrize("spec", FORMATS, ids=[s.name for s in FORMATS])
def test_every_registered_name_resolves(spec: Format):
    backend = formats.backend_class(spec.name)
    assert inspect.isclass(backend) and callable(backend.run)
    assert isinstance(inspect.getattr_static(backend, "unavailable"), staticmethod), spec.backend
    for hook in (spec.exporter, spec.preflight, spec.verifier):
        if hook is not None:
            assert callable(formats.resolve(hook)), hook
    for key, name in spec.files.items():
        assert formats.FILES[key] == name and name.startswith(("encoder.", "tensorrt.")), (key, name)
    assert spec.precisions, "a format runs in at least one precision"
    if spec.exporter:  # an exported format: a switch that asks for it, and a tolerance for every precision
        assert any(f.asks for f in spec.flags), f"mae export has no flag that asks for {spec.name}"
        assert set(spec.tolerances) == set(spec.precisions)
        for precision in spec.precisions:
            bound = formats.tolerance(spec.name, precision)
            assert 0.9 < bound["cosine"] <= 1.0 and set(bound) <= {"cosine", "top1_agreement"}
    else:
        assert not spec.files and not spec.flags and not spec.tolerances
    assert set(spec.needs) <= set(formats.BACKENDS) and spec.auto.keys() <= set(formats.AUTO_ORDER)


def test_file_names_and_flags_are_each_owned_by_one_format():
    names = [n for spec in FORMATS for n in spec.files.values()]
    assert len(names) == len(set(names)) == len(formats.FILES)
    flags = [f.name for spec in FORMATS for f in spec.flags] + [f.name for f in formats.EXPORT_FLAGS]
    assert len(flags) == len(set(flags))


@pytest.mark.parametrize("name", [s.name for s in FORMATS])
def test_each_backend_is_a_choice_of_every_command_that_takes_one(name):
    from cli.main import build_parser
    from serving.settings import Settings

    parser = build_parser()
    for argv in (["embed", "--artifact", "a", "x.png", "--out", "v.npy"], ["search", "--index", "i", "q.png"],
                 ["index", "build", "--artifact", "a", "--images", "d", "--out", "o"], ["serve", "--artifact", "a"]):
        assert parser.parse_args([*argv, "--backend", name]).backend == name, argv
    Settings(backend=name).validate()
    assert name in formats.BACKEND_HELP
    if formats.BACKENDS[name].auto:
        assert any(name in order for order in formats.AUTO_ORDER.values())


def test_the_export_flags_of_every_format_parse_and_ask_for_it():
    """``mae export``'s format flags come from the rows; each asking flag selects its format (and what it needs)."""
    from cli.main import build_parser

    base = ["export", "--checkpoint", "c.pt", "--out", "art"]
    ours = _export_parser()
    for spec in FORMATS:
        for flag in spec.flags:
            value = [] if flag.options.get("action") == "store_true" else [
                str(flag.options.get("choices", ["2"])[-1])]
            for parser, argv in ((build_parser(), base), (ours, base[1:])):
                args = parser.parse_args([*argv, flag.name, *value])
                if flag.asks:
                    got = [s.name for s in formats.requested(args)]
                    assert got == [*spec.needs, spec.name], (flag.name, got)
    assert formats.requested(ours.parse_args(base[1:])) == []


def test_requested_puts_a_format_after_what_it_needs():
    args = SimpleNamespace(tensorrt=True, inductor=True, onnx=False)
    assert [s.name for s in formats.requested(args)] == ["onnx", "tensorrt", "inductor"]


def test_embed_takes_every_precision_a_backend_runs():
    from export.command import add_embed_arguments

    p = argparse.ArgumentParser()
    add_embed_arguments(p)
    for precision in formats.PRECISION_CHOICES:
        args = p.parse_args(["--artifact", "a", "x.png", "--out", "v.npy", "--precision", precision])
        assert args.precision == precision
    with pytest.raises(SystemExit):
        p.parse_args(["--artifact", "a", "x.png", "--out", "v.npy", "--precision", "fp64"])


def test_the_auto_order_ends_with_eager_torch_and_has_no_stranger():
    for device, order in formats.AUTO_ORDER.items():
        assert order[-1] == "torch" and set(order) <= set(formats.BACKENDS), device
    assert formats.AUTO_ORDER["cpu"][0] == "onnx"  # measured: onnxruntime beats the CPU package through Embedder
    assert formats.AUTO_ORDER["cuda"][0] == "tensorrt"
