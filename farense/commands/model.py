"""`farense model import FILE.gguf DIR`: turn a llama.cpp GGUF file into an MLX model directory."""

from __future__ import annotations

import argparse
import sys
import time

from farense.config import format_size
from farense.console import print_table
from farense.model.gguf import import_gguf


def import_(args: argparse.Namespace) -> int:
    if args.dtype and not args.dequantize:
        print("farense: error: --dtype applies only with --dequantize", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    info = import_gguf(args.file, args.directory, dequantize=args.dequantize, dtype=args.dtype or "float16",
                       force=args.force)
    m = info.marker
    kinds = ", ".join(f"{k} {n}" for k, n in m["tensor_types"].items())
    stored = ", ".join(f"{k} {n}" for k, n in m["stored_as"].items())
    rows = [
        ("model", info.path.resolve()),
        ("architecture", f"{m['architecture']}, {m['layers']} layers, vocabulary {m['vocab_size']:,}"),
        ("parameters", f"{m['parameters']:,}"),
        ("tensors in the GGUF", kinds),
        ("stored as", stored + (f" (dequantized to {m['dtype']})" if m["dequantized"] else "")),
        ("files", ", ".join(f"{name} {format_size(rec['size'])}" for name, rec in m["files"].items())),
        ("seconds", f"{time.perf_counter() - t0:.1f}"),
    ]
    print_table("farense model import", ("item", "value"), rows)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="Base models: import a GGUF file into MLX's format.")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    i = msub.add_parser("import", help="Import a .gguf file (llama architecture) into an MLX model directory "
                                       "that mlx_lm.load, generate and fuse read as is.")
    i.add_argument("file", help="The .gguf file.")
    i.add_argument("directory", help="The model directory to create.")
    i.add_argument("--dequantize", action="store_true",
                   help="Store every weight unquantized (for training on the CPU); default: keep Q4_0/Q4_1/Q8_0 "
                        "as MLX quantized weights.")
    i.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="Dtype of the dequantized weights (default float16; needs --dequantize).")
    i.add_argument("--force", action="store_true", help="Replace the directory if it is an earlier import.")
    i.set_defaults(handler=import_)
