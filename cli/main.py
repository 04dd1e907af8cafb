"""The ``mae`` command. Each subcommand imports its folder lazily, so ``mae --help`` stays instant.

A handler takes the parsed arguments and returns a dict: with ``--json`` it is printed as one JSON object on
stdout; otherwise its ``"text"`` entry (or a key: value listing) is printed for people.
Errors a user can fix (``mae.errors.UserError``: a bad flag or config key, a corrupt file, an index of another
model; and the operating system's refusals, which name the path: a missing file, a full disk) print one line on
stderr and exit 1; ``MAE_DEBUG=1`` shows their traceback. Anything else is a bug: its traceback is printed.
Warnings (a backend skipped, files skipped) are one line each too.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

EXIT_USER_ERROR = 1
# The commands, in the order ``mae --help`` lists them: each module's ``register(subparsers)`` adds its
# subcommands and their flags, naming each handler as "module:function" (imported only when it runs). A new
# command is a function in its stage's command module, or a new module and one line here.
COMMANDS = (
    "training.command",  # pretrain, finetune, evaluate
    "export.command",  # export, embed
    "retrieval.command",  # index build|add|remove|info|duplicates|check, search
    "serving.command",  # serve
    "cli.data",  # data pack|export
    "cli.demo",  # demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mae", description="Masked Autoencoders: pretrain, finetune, export, index, serve.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:  # stdlib-only modules: mae --help stays instant
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mae.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    if args.command in ("index", "search"):  # before torch loads OpenMP: see retrieval/__init__.py
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    handler = _resolve(args.handler)
    show = warnings.showwarning
    if not os.environ.get("MAE_DEBUG"):
        warnings.showwarning = _one_line_warning(args.command)
    try:
        result = handler(args)
    except KeyboardInterrupt:
        print("mae: interrupted", file=sys.stderr)
        return 130
    except (UserError, OSError) as e:  # what the user can fix; anything else is a bug and keeps its traceback
        if os.environ.get("MAE_DEBUG"):
            raise
        msg = one_line(e)
        print(f"mae {args.command}: error: {msg}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"error": msg, "type": type(e).__name__}))
        return EXIT_USER_ERROR
    finally:
        warnings.showwarning = show
    if isinstance(result, int):  # a handler with nothing to print (e.g. a non-zero torchrun rank)
        return result
    if result is not None:
        _print_result(result, getattr(args, "json", False))
    return 0


def one_line(message: object) -> str:
    """A message as one line: libraries (onnxruntime, torch's unpickler) put advice on further lines."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _one_line_warning(command: str) -> Callable[..., None]:
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        print(f"mae {command}: warning: {one_line(message)}", file=file or sys.stderr)

    return show


def _resolve(spec: str) -> Callable[[argparse.Namespace], Any]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps({k: v for k, v in result.items() if k != "text"}, default=str))
        return
    if "text" in result:
        print(result["text"])
        return
    width = max((len(k) for k in result), default=0)
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    sys.exit(main())
