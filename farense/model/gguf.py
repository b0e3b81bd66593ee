"""GGUF import: a llama.cpp `.gguf` file becomes an MLX model directory in Hugging Face layout.

Why it exists: chat models ship as GGUF (one file: weights, hyperparameters, tokenizer, chat
template), while mlx-lm's loaders, `generate --adapter-path` and `fuse` read a Hugging Face layout
directory. The import writes that directory once, whole or not at all:

    <dest>/
        config.json               model_type llama; `quantization` per layer when kept quantized
        model.safetensors         MLX weights, Hugging Face names, metadata {"format": "mlx"}
        tokenizer.json            rebuilt with `tokenizers` from the GGUF vocabulary and merges
        tokenizer_config.json     bos/eos/pad tokens and the GGUF's chat template
        special_tokens_map.json
        .farense-import.json      the marker, written last: source SHA-256, each file's size and SHA-256
    <dest>.tmp-<hex>/             an import in progress or killed (never read; removed by the next one)
    .<dest name>.lock             the import lock (farense.run.locks) held while importing

Weights come from `mx.load`, MLX's own GGUF reader: Q4_0, Q4_1 and Q8_0 arrive as MLX quantized
weights (affine, group size 32), F32 and F16 as they are, and Q2_K, Q4_K and Q6_K dequantized to
float16 by MLX. Every other type is refused before a weight is read, naming the tensor: mx.load
fails on them without naming it, or (types newer than its reader) silently returns fewer tensors.
The header is read here (a few milliseconds, no weights), with gguf-py's type tables, so configs
can be checked and disk needs estimated without loading anything.
"""

from __future__ import annotations

import math
import mmap
import os
import shutil
import struct
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from farense import __version__
from farense.errors import ModelImportError
from farense.run.fsutil import (
    commit_dir,
    fsync_file,
    sha256_file,
    staged_dir,
    write_new_file,
)
from farense.run.layout import TMP_MARK
from farense.run.locks import RunLock

if TYPE_CHECKING:
    from farense.config import ExperimentConfig

IMPORT_VERSION = 1  # bump when anything written changes: older imports in a cache are then rebuilt
MARKER_NAME = ".farense-import.json"
MODELS_CACHE = Path(".farense") / "models"  # under the workspace: where configs naming a .gguf import to
WEIGHTS_FILE = "model.safetensors"
SUPPORTED_ARCHITECTURES = ("llama", "mistral")  # llama.cpp writes Mistral models as llama; same tensor names
DTYPES = ("float16", "bfloat16", "float32")
GROUP_SIZE = 32  # the block size of Q4_0, Q4_1 and Q8_0, which mx.load keeps as MLX's group size
KEPT_QUANTIZED = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # GGML type -> bits of the MLX quantized weight
READ_AS_IS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
MLX_DEQUANTIZES = ("Q2_K", "Q4_K", "Q6_K")  # mx.load returns these as float16
READABLE_TYPES = (*KEPT_QUANTIZED, *READ_AS_IS, *MLX_DEQUANTIZES)
_MAX_COUNT = 1 << 24  # more tensors or keys than this is a damaged header, not a model
_SHORT_ARRAY = 64  # metadata arrays longer than this are skipped by the header reader

_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


# --------------------------------------------------------------------------- the header


class LongArray(NamedTuple):
    """A metadata array the header reader skipped (vocabularies, merges): only its length is kept."""

    count: int


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it; shape in row-major order, as mx.load returns it."""

    name: str
    shape: tuple[int, ...]
    type: str  # GGML type name: F32, Q4_1, ...
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def elements(self) -> int:
        """Number of values (not bytes)."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file says about itself before its weights: metadata and the tensor table."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    file_size: int

    @property
    def architecture(self) -> str:
        """general.architecture: llama, qwen2, ..."""
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, key: str, default: Any = None) -> Any:
        """A hyperparameter, stored under `<architecture>.<key>`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def block_count(self) -> int | None:
        """Transformer blocks (layers), None when the header does not say."""
        n = self.arch_value("block_count")
        return int(n) if isinstance(n, int) else None

    def type_counts(self) -> dict[str, int]:
        """How many tensors of each GGML type (Q4_1: 210, F32: 61, ...)."""
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.type] = out.get(t.type, 0) + 1
        return dict(sorted(out.items()))


class _Cursor:
    """Bounds-checked reads from the header bytes: running past the end means a truncated file."""

    def __init__(self, buf: Any, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        """One little-endian value of struct format `fmt`."""
        size = struct.calcsize(fmt)
        self.need(size)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def need(self, size: int) -> None:
        if size < 0 or self.pos + size > len(self.buf):
            raise ModelImportError(f"{self.path}: truncated GGUF header (the file ends at byte {len(self.buf)}; "
                                   "an incomplete download?)")

    def string(self, keep: bool = True) -> str | None:
        n = self.take("<Q")
        self.need(n)
        start, self.pos = self.pos, self.pos + n
        return bytes(self.buf[start:self.pos]).decode("utf-8", errors="replace") if keep else None

    def skip_strings(self, count: int) -> None:
        """Step over `count` strings (a vocabulary of 100k tokens in milliseconds)."""
        buf, pos, unpack = self.buf, self.pos, struct.unpack_from
        try:
            for _ in range(count):
                pos += 8 + unpack("<Q", buf, pos)[0]
        except struct.error:
            pos = len(buf) + 1
        self.need(pos - self.pos)
        self.pos = pos

    def value(self, vtype: int, keep: bool = True) -> Any:
        """One metadata value of GGUF value type `vtype`; long arrays come back as LongArray."""
        from gguf import GGUFValueType as V

        if vtype == V.STRING:
            return self.string(keep)
        if vtype == V.ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if count > _MAX_COUNT * 4:
                raise ModelImportError(f"{self.path}: damaged GGUF header (an array of {count} items)")
            keep_items = keep and count <= _SHORT_ARRAY
            if item == V.STRING and not keep_items:
                self.skip_strings(count)
                return LongArray(count)
            if item in _SCALAR_FORMATS and not keep_items:  # skip fixed-size items in one step
                size = struct.calcsize(_SCALAR_FORMATS[item]) * count
                self.need(size)
                self.pos += size
                return LongArray(count)
            items = [self.value(item, keep_items) for _ in range(count)]
            return items if keep_items else LongArray(count)
        if vtype not in _SCALAR_FORMATS:
            raise ModelImportError(f"{self.path}: damaged GGUF header (unknown value type {vtype})")
        v = self.take(_SCALAR_FORMATS[vtype])
        return float(f"{v:.7g}") if vtype == V.FLOAT32 else v


_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}  # gguf.GGUFValueType -> struct format, for every fixed-size type


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Metadata and tensor table of a GGUF file, validated against its size; reads no weights."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise ModelImportError(f"{path}: not a GGUF file (only {size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse_header(_Cursor(buf, path), size)
    except OSError as exc:
        raise ModelImportError(f"{path}: cannot read the GGUF file ({exc.strerror or exc})") from exc


def _parse_header(cur: _Cursor, size: int) -> GGUFHeader:
    from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC

    path = cur.path
    magic = cur.take("<I")
    if magic != GGUF_MAGIC:
        raise ModelImportError(f"{path}: not a GGUF file (it starts with {bytes(cur.buf[:4])!r}, expected b'GGUF')")
    version = cur.take("<I")
    if version not in (2, 3):
        raise ModelImportError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise ModelImportError(f"{path}: damaged GGUF header ({n_tensors} tensors, {n_kv} metadata keys)")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[str(key)] = cur.value(cur.take("<I"))
    infos = [_tensor_entry(cur) for _ in range(n_tensors)]
    align = int(metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)) or GGUF_DEFAULT_ALIGNMENT
    data_start = -(-cur.pos // align) * align
    tensors = tuple(_placed(path, info, data_start, size) for info in infos)
    return GGUFHeader(path, version, metadata, tensors, size)


def _tensor_entry(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = str(cur.string())
    n_dims = cur.take("<I")
    if n_dims > 8:
        raise ModelImportError(f"{cur.path}: damaged GGUF header (tensor {name} has {n_dims} dimensions)")
    dims = tuple(cur.take("<Q") for _ in range(n_dims))
    return name, tuple(reversed(dims)), cur.take("<I"), cur.take("<Q")  # GGML lists the fastest dim first


def _placed(path: Path, info: tuple[str, tuple[int, ...], int, int], data_start: int, size: int) -> TensorInfo:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    name, shape, type_id, rel = info
    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise ModelImportError(f"{path}: tensor {name} has unknown GGML type id {type_id} "
                               "(a GGUF newer than the installed gguf package, or a damaged file)") from None
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    nbytes = math.prod(shape) // block * block_bytes
    offset = data_start + rel
    if offset + nbytes > size:
        raise ModelImportError(f"{path}: truncated: tensor {name} needs bytes up to {offset + nbytes:,} but the "
                               f"file has {size:,} (an incomplete download?)")
    return TensorInfo(name, shape, qtype.name, offset, nbytes)


# --------------------------------------------------------------------------- what can be imported


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face (mlx-lm llama) parameter name of a GGUF tensor, None when it has none."""
    base, _, param = gguf_name.rpartition(".")
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{param}"
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{param}"
    return None


def import_problems(header: GGUFHeader) -> list[str]:
    """Why this file cannot be imported (architecture, tensor types, tensor names); empty when it can."""
    path = header.path
    if header.architecture not in SUPPORTED_ARCHITECTURES:
        return [f"{path}: architecture {header.architecture or '(none)'!r} is not supported; farense imports "
                f"llama-architecture GGUFs ({', '.join(SUPPORTED_ARCHITECTURES)}: Llama, Mistral, SmolLM, ...)"]
    problems = []
    for t in header.tensors:
        if t.type not in READABLE_TYPES:
            problems.append(f"{path}: tensor {t.name} has type {t.type}, which MLX cannot read (readable: "
                            f"{', '.join(READABLE_TYPES)}); re-quantize the model to Q4_0, Q4_1 or Q8_0 with "
                            "llama.cpp's llama-quantize")
            break  # one is enough to say what to do; a K-quant file has hundreds
    unknown = [t.name for t in header.tensors if hf_name(t.name) is None]
    if unknown:
        problems.append(f"{path}: tensor(s) {', '.join(unknown[:3])} have no counterpart in mlx-lm's llama model")
    if not any(t.name == "token_embd.weight" for t in header.tensors):
        problems.append(f"{path}: no token_embd.weight tensor (not a complete model)")
    return problems


def check_importable(header: GGUFHeader) -> None:
    """Raise ModelImportError with every reason the file cannot be imported."""
    problems = import_problems(header)
    if problems:
        raise ModelImportError(problems[0] if len(problems) == 1 else "; ".join(problems))


def gguf_problems(path: str | os.PathLike[str], num_layers: int) -> list[str]:
    """Config check for a `.gguf` model.path: readable, importable, and lora.num_layers fits (header only)."""
    try:
        header = read_header(path)
    except ModelImportError as exc:
        return [f"model.path: {exc}"]
    problems = [f"model.path: {p}" for p in import_problems(header)]
    layers = header.block_count
    if layers is not None and num_layers > layers:
        problems.append(f"lora.num_layers: requested to train {num_layers} layers but the model only has {layers} "
                        f"layers (expected 1..{layers}, or -1 for all)")
    return problems


# --------------------------------------------------------------------------- config.json


def hf_config(header: GGUFHeader, *, dequantize: bool = False, dtype: str = "float16") -> dict[str, Any]:
    """config.json for mlx-lm's llama model, from the header's hyperparameters (no weights read)."""
    def need(key: str) -> int:
        value = header.arch_value(key)
        if not isinstance(value, int):
            raise ModelImportError(f"{header.path}: metadata key {header.architecture}.{key} is missing")
        return value

    tensors = {t.name: t for t in header.tensors}
    hidden, heads = need("embedding_length"), need("attention.head_count")
    m = header.metadata
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": int(header.arch_value("attention.head_count_kv", heads)),
        "head_dim": int(header.arch_value("attention.key_length", hidden // heads)),
        "vocab_size": tensors["token_embd.weight"].shape[0] if "token_embd.weight" in tensors else need("vocab_size"),
        "max_position_embeddings": int(header.arch_value("context_length", 4096)),
        "rms_norm_eps": float(header.arch_value("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(header.arch_value("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": m.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": dtype if dequantize else "float16",
    }
    if header.arch_value("rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"type": "linear", "factor": float(header.arch_value("rope.scaling.factor", 1.0))}
    quantization = None if dequantize else _quantization(header)
    if quantization:
        cfg["quantization"] = cfg["quantization_config"] = quantization
    return cfg


def _quantization(header: GGUFHeader) -> dict[str, Any] | None:
    """mlx-lm's `quantization`: the most common bit width, plus an entry per module that differs."""
    bits = {hf_name(t.name).rpartition(".")[0]: KEPT_QUANTIZED[t.type]  # type: ignore[union-attr]
            for t in header.tensors if t.type in KEPT_QUANTIZED}
    if not bits:
        return None
    values = list(bits.values())
    common = max(set(values), key=values.count)
    out: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": common}
    out.update({p: {"group_size": GROUP_SIZE, "bits": b} for p, b in sorted(bits.items()) if b != common})
    return out


def imported_bytes(header: GGUFHeader, *, dequantize: bool = False, dtype: str = "float16") -> int:
    """Bytes the imported directory will take: weights as MLX stores them, plus the tokenizer files."""
    total = 0
    for t in header.tensors:
        n = t.elements
        if dequantize:
            total += n * (4 if dtype == "float32" else 2)
        elif t.type in KEPT_QUANTIZED:
            total += n * KEPT_QUANTIZED[t.type] // 8 + n // GROUP_SIZE * 4  # float16 scales and biases
        else:
            total += n * (4 if t.type == "F32" else 2)
    return total + 2 * header.tensors[0].offset if header.tensors else total  # tokenizer JSON ~ 2x the metadata


# --------------------------------------------------------------------------- the tokenizer

# llama.cpp's `tokenizer.ggml.pre` names how text is split before BPE; these are the byte-level ones
# whose Hugging Face equivalent is known.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = ("default", "gpt-2", "gpt2", "smollm", "starcoder", "refact", "llama-bpe", "llama3")
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def _pre_tokenizer(pre: str, path: Path) -> Any:
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    if pre in ("default", "gpt-2", "gpt2"):
        return pt.ByteLevel(add_prefix_space=False)
    if pre in ("smollm", "starcoder", "refact"):  # digits one by one, then GPT-2's byte-level split
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)])
    if pre in ("llama-bpe", "llama3"):
        return pt.Sequence([pt.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ModelImportError(f"{path}: tokenizer pre-tokenizer {pre!r} is not supported "
                           f"(supported: {', '.join(_PRE_TOKENIZERS)})")


def _bpe_tokenizer(meta: dict[str, Any], path: Path) -> Any:
    """GPT-2 style byte-level BPE from the vocabulary and merges (tokenizer.ggml.model 'gpt2')."""
    from tokenizers import Tokenizer, decoders, models, processors

    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")), path)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _spm_tokenizer(meta: dict[str, Any]) -> Any:
    """SentencePiece-style BPE with byte fallback (tokenizer.ggml.model 'llama': Llama 2, Mistral)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = _as_list(meta.get("tokenizer.ggml.scores")) or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = _scalar(meta.get("tokenizer.ggml.unknown_token_id"))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(vocab, scores), byte_fallback=True,
                               fuse_unk=True, unk_token=tokens[unk] if isinstance(unk, int) else None))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def _spm_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece has scores, not merges: every split of a piece into two pieces is a merge, ranked by
    the merged piece's score (best first), as transformers' SentencePiece converter derives them."""
    ranked = []
    for piece, i in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def _as_list(value: Any) -> list[Any]:
    """mx.load's metadata holds numeric arrays as mx.array and scalars as 0-d arrays."""
    if value is None:
        return []
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def build_tokenizer(meta: dict[str, Any], path: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(tokenizers.Tokenizer, tokenizer_config.json, special_tokens_map.json) from GGUF metadata."""
    from tokenizers import AddedToken, processors

    kind = str(meta.get("tokenizer.ggml.model", ""))
    if kind == "gpt2":
        tok = _bpe_tokenizer(meta, path)
    elif kind == "llama":
        tok = _spm_tokenizer(meta)
    else:
        raise ModelImportError(f"{path}: tokenizer model {kind or '(none)'!r} is not supported (expected 'gpt2' "
                               "byte-level BPE or 'llama' SentencePiece)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = _as_list(meta.get("tokenizer.ggml.token_type")) or [1] * len(tokens)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == _USER_DEFINED])
    named = {role: tokens[i] for role in ("bos", "eos", "unknown", "padding")
             if isinstance(i := _scalar(meta.get(f"tokenizer.ggml.{role}_token_id")), int) and 0 <= i < len(tokens)}
    add_bos = bool(_scalar(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")))
    if add_bos and "bos" in named:
        bos = named["bos"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tokens.index(bos))])
    special = {f"{k}_token": named[r] for k, r in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"),
                                                   ("pad", "padding")) if r in named}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": add_bos,
              "add_eos_token": False, "clean_up_tokenization_spaces": False}
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = str(meta["tokenizer.chat_template"])
    return tok, config, special


# --------------------------------------------------------------------------- the weights


def unpermute_rows(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs) to Hugging Face's half-split layout.

    Rows move whole, so it applies alike to a weight and to its quantization scales and biases.
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_parts(raw: dict[str, Any], t: TensorInfo, path: Path) -> dict[str, Any]:
    """weight (and scales, biases when MLX kept it quantized) of one GGUF tensor as mx.load named them."""
    import mlx.core as mx
    import numpy as np

    if t.type == "BF16":  # mx.load would narrow it to float16 (overflow past 65504): read the bits as they are
        bits = np.fromfile(path, dtype=np.uint16, count=t.elements, offset=t.offset)
        return {"weight": mx.array(bits).view(mx.bfloat16).reshape(t.shape)}
    base = t.name.removesuffix(".weight")
    keys = {"weight": t.name, "scales": f"{base}.scales", "biases": f"{base}.biases"}
    if t.type not in KEPT_QUANTIZED:
        keys = {"weight": t.name}
    missing = [k for k in keys.values() if k not in raw]
    if missing:
        raise ModelImportError(f"{path}: mx.load returned no {missing[0]} (tensor type {t.type})")
    return {part: raw[key] for part, key in keys.items()}


def convert_weights(raw: dict[str, Any], header: GGUFHeader, cfg: dict[str, Any], *, dequantize: bool,
                    dtype: str) -> dict[str, Any]:
    """mx.load's GGUF tensors as mlx-lm's llama parameters: renamed, q/k un-permuted, dequantized on request."""
    import mlx.core as mx

    target = getattr(mx, dtype)
    heads = {"self_attn.q_proj": cfg["num_attention_heads"], "self_attn.k_proj": cfg["num_key_value_heads"]}
    out: dict[str, Any] = {}
    for t in header.tensors:
        module = str(hf_name(t.name)).rpartition(".")[0]
        parts = _tensor_parts(raw, t, header.path)
        n_head = next((n for key, n in heads.items() if module.endswith(key)), None)
        if n_head is not None:
            parts = {k: unpermute_rows(v, n_head) for k, v in parts.items()}
        if dequantize and t.type in KEPT_QUANTIZED:  # in float32 (float16 scales would round it), and faster
            parts = {"weight": mx.dequantize(parts["weight"], parts["scales"].astype(mx.float32),
                                             parts["biases"].astype(mx.float32), group_size=GROUP_SIZE,
                                             bits=KEPT_QUANTIZED[t.type])}
        if dequantize:
            parts = {k: v.astype(target) for k, v in parts.items()}
        out.update({f"{module}.{k}": v for k, v in parts.items()})
    return out


def stored_as(weights: dict[str, Any]) -> dict[str, int]:
    """How many weight tensors are stored as what: '4-bit', '8-bit' (MLX quantized), 'float32', ..."""
    out: dict[str, int] = {}
    for name, w in weights.items():
        if not name.endswith(".weight"):
            continue
        scales = weights.get(name.removesuffix(".weight") + ".scales")
        kind = (f"{w.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)}-bit" if scales is not None
                else str(w.dtype).removeprefix("mlx.core."))
        out[kind] = out.get(kind, 0) + 1
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- writing the directory


@dataclass(frozen=True)
class ImportInfo:
    """An imported model directory and its marker (source, sizes, tensor types, files, seconds)."""

    path: Path
    marker: dict[str, Any] = field(repr=False)
    reused: bool = False


def _write_json(path: Path, obj: Any) -> None:
    write_new_file(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")


def _write_model(out: Path, header: GGUFHeader, *, dequantize: bool, dtype: str) -> dict[str, Any]:
    """Every file but the marker into `out`; returns the marker's summary fields."""
    import mlx.core as mx

    try:
        raw, meta = mx.load(str(header.path), return_metadata=True)
    except (RuntimeError, ValueError) as exc:
        raise ModelImportError(f"{header.path}: MLX cannot read the weights ({exc})") from exc
    cfg = hf_config(header, dequantize=dequantize, dtype=dtype)
    weights = convert_weights(raw, header, cfg, dequantize=dequantize, dtype=dtype)
    tokenizer, tok_config, special = build_tokenizer(meta, header.path)
    tok_config["model_max_length"] = cfg["max_position_embeddings"]
    write_new_file(out / "tokenizer.json", tokenizer.to_str().encode("utf-8"))
    _write_json(out / "tokenizer_config.json", tok_config)
    _write_json(out / "special_tokens_map.json", special)
    _write_json(out / "config.json", cfg)
    mx.save_safetensors(str(out / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
    fsync_file(out / WEIGHTS_FILE)
    return {"architecture": header.architecture, "layers": cfg["num_hidden_layers"],
            "parameters": sum(t.elements for t in header.tensors), "tensor_types": header.type_counts(),
            "stored_as": stored_as(weights), "vocab_size": cfg["vocab_size"]}


def _versions() -> dict[str, str]:
    from importlib.metadata import (
        version,  # not `import mlx_lm`: it imports transformers (seconds)
    )

    return {"farense": __version__, "mlx": version("mlx"), "mlx_lm": version("mlx-lm"), "gguf": version("gguf")}


def _build(header: GGUFHeader, dest: Path, source_sha256: str, *, dequantize: bool, dtype: str) -> ImportInfo:
    """Import into `<dest>.tmp-<hex>`, marker last, rename into place; the caller holds the lock."""
    t0 = time.perf_counter()
    for leftover in dest.parent.glob(f"{dest.name}{TMP_MARK}*"):  # killed imports (we hold the lock)
        shutil.rmtree(leftover, ignore_errors=True)
    with staged_dir(dest) as tmp:  # after any failure (ENOSPC, an error in mlx): no temporary directory left
        summary = _write_model(tmp, header, dequantize=dequantize, dtype=dtype)
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        marker = {"import_version": IMPORT_VERSION,
                  "source": {"path": str(header.path.resolve()), "size": header.file_size, "sha256": source_sha256},
                  "dequantized": dequantize, "dtype": dtype if dequantize else None, **summary,
                  "seconds": round(time.perf_counter() - t0, 3), "versions": _versions(), "files": files}
        _write_json(tmp / MARKER_NAME, marker)  # last: it makes the import count
        commit_dir(tmp, dest, synced=True, replace=True)
    return ImportInfo(dest, marker)


def _import_lock(dest: Path) -> RunLock:
    """One import into `dest` at a time; a second waits (farense.run.locks: never stale)."""
    return RunLock(dest.parent / f".{dest.name}.lock", command=f"model import {dest.name}", timeout=None)


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ModelImportError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")


def import_gguf(src: str | os.PathLike[str], dest: str | os.PathLike[str], *, dequantize: bool = False,
                dtype: str = "float16", force: bool = False) -> ImportInfo:
    """Import a GGUF file into the model directory `dest`, whole or not at all; refuses to overwrite
    without `force`, and never replaces a directory that is not a farense import."""
    src, dest = Path(src), Path(dest)
    _check_dtype(dtype)
    header = read_header(src)
    check_importable(header)  # every refusal comes before a directory or a lock is made
    if dest.exists() and not force:
        raise ModelImportError(f"{dest} already exists (use --force to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _import_lock(dest):
        if dest.exists() and not (dest / MARKER_NAME).is_file():
            raise ModelImportError(f"{dest} exists but is not a farense import (no {MARKER_NAME}): "
                                   "remove it or choose another directory")
        return _build(header, dest, sha256_file(src), dequantize=dequantize, dtype=dtype)


# --------------------------------------------------------------------------- the cache


def read_marker(dest: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The import marker of `dest`, None when there is none or it is unreadable."""
    try:
        marker = orjson.loads((Path(dest) / MARKER_NAME).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def verify_import(dest: str | os.PathLike[str], *, source_sha256: str | None = None, deep: bool = False) -> bool:
    """True when `dest` is a complete import of this version (of that source): every listed file has its
    size, and with `deep` its SHA-256 too (which reads every byte)."""
    marker = read_marker(dest)
    try:
        if marker is None or marker.get("import_version") != IMPORT_VERSION:
            return False
        if source_sha256 is not None and marker["source"]["sha256"] != source_sha256:
            return False
        for name, rec in marker["files"].items():
            p = Path(dest) / name
            if p.stat().st_size != rec["size"] or (deep and sha256_file(p) != rec["sha256"]):
                return False
        return bool(marker["files"])
    except (OSError, KeyError, TypeError, AttributeError):
        return False


@lru_cache(maxsize=32)
def _sha256_of(path: str, size: int, mtime_ns: int, inode: int) -> str:
    return sha256_file(path)


def source_sha256(src: str | os.PathLike[str]) -> str:
    """SHA-256 of a GGUF file, computed once per process for an unchanged file (size, mtime, inode)."""
    try:
        st = os.stat(src)
    except OSError as exc:
        raise ModelImportError(f"{src}: cannot read the GGUF file ({exc.strerror or exc})") from exc
    return _sha256_of(os.path.realpath(src), st.st_size, st.st_mtime_ns, st.st_ino)


def cache_dir_for(src: str | os.PathLike[str], cache_root: str | os.PathLike[str], *, dequantize: bool = False,
                  dtype: str = "float16") -> Path:
    """Where `ensure_imported` puts this file: `<cache_root>/<stem>-<sha256[:16]>[-dequantized-<dtype>]`."""
    name = f"{Path(src).stem}-{source_sha256(src)[:16]}" + (f"-dequantized-{dtype}" if dequantize else "")
    return Path(cache_root) / name


def ensure_imported(src: str | os.PathLike[str], cache_root: str | os.PathLike[str], *, dequantize: bool = False,
                    dtype: str = "float16", deep_verify: bool = False) -> Path:
    """The imported directory of `src` in the cache, importing it first unless a verified one is there.

    Concurrent callers are serialised by a flock; the second finds the first's import and reuses it.
    """
    _check_dtype(dtype)
    sha = source_sha256(src)
    dest = cache_dir_for(src, cache_root, dequantize=dequantize, dtype=dtype)
    if verify_import(dest, source_sha256=sha, deep=deep_verify):
        return dest
    header = read_header(src)
    check_importable(header)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _import_lock(dest):
        if not verify_import(dest, source_sha256=sha, deep=deep_verify):  # another process may have done it
            _build(header, dest, sha, dequantize=dequantize, dtype=dtype)
    return dest


def is_gguf_path(path: str) -> bool:
    """A model path that names a GGUF file rather than a model directory or a hub repo."""
    return path.lower().endswith(".gguf")


def resolve_model_path(path: str, workspace: str | os.PathLike[str] = ".") -> str:
    """What mlx-lm should load for `path`: a `.gguf` is imported once into `<workspace>/.farense/models`."""
    if not is_gguf_path(path):
        return path
    return str(ensure_imported(path, Path(workspace) / MODELS_CACHE))


def resolve_model_dir(config: ExperimentConfig) -> str:
    """The model directory (or hub id) to load for a config whose model.path may name a `.gguf` file."""
    return resolve_model_path(config.model_path, config.workspace)
