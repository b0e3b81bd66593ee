"""The `farense` command: a thin layer over the library, one module per area in farense/commands/.

Each command module has `register(subparsers)`, which adds its sub-commands with
`set_defaults(handler=fn)`; a handler takes the parsed arguments and returns an exit code.
Errors farense raises on purpose print one clear message and exit with their own code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from farense.errors import FarenseError, storage_error
from farense.model.blas import announce, ensure_fast_blas
from farense.signals import kept_from_new_threads

# Areas in the order `farense --help` lists them; a module that is missing is skipped so that a
# partial install still answers `--help`.
COMMAND_MODULES = (
    "farense.commands.run",
    "farense.commands.campaign",
    "farense.commands.train",
    "farense.commands.evaluate",
    "farense.commands.disk",
    "farense.commands.observe",
    "farense.commands.config",
    "farense.commands.demo",
    "farense.commands.model",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="farense",
        description="Resumable, disk-guarded LoRA/QLoRA fine-tuning for MLX, orchestrated by Prefect.",
    )
    parser.add_argument("--workspace", help="Directory that relative paths in configs resolve against (default: cwd).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before any command imports mlx, so that MLX's Linux CPU backend multiplies with OpenBLAS; its
    # threads start here and must never take a Ctrl-C meant for the main thread (farense.signals).
    try:
        with kept_from_new_threads():
            info = ensure_fast_blas()
    except KeyboardInterrupt:
        return _interrupted()
    announce(info)
    keep_torch_out()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workspace:
        os.environ["FARENSE_WORKSPACE"] = os.path.abspath(args.workspace)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except FarenseError as e:
        print(f"farense: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # storage the command could not use (read-only, not ours, full): one line, its code
        err = storage_error(e)
        print(f"farense: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return _interrupted()


def keep_torch_out() -> None:
    """farense computes with MLX alone, but transformers (mlx-lm's tokenizers) imports PyTorch at its own
    import whenever torch is installed: seconds of every start on a GPU machine's image, where both are
    (issue 23). A None entry in sys.modules makes torch look absent to transformers' checks, and an
    `import torch` raise ImportError. FARENSE_ALLOW_TORCH=1 leaves torch importable (code of your own
    that needs it in the same process)."""
    if os.environ.get("FARENSE_ALLOW_TORCH") != "1" and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]


def _interrupted() -> int:
    print("farense: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
