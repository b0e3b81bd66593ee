"""The offline demo: a tiny Mistral-architecture model and the Farense supporters' Q&A data.

Why it exists: the whole pipeline (train, crash, resume, evaluate, decide, promote) must run on a
fresh machine without network or GPU, so the model is built here from a fixed seed (random weights,
a tokenizer trained on the shipped data) and the data ships inside the package.

    <directory>/
        model/                    config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
                                  special_tokens_map.json, .farense-demo.json (the marker, written last)
        data/                     train.jsonl, valid.jsonl, test.jsonl (copies of farense/demo_data),
                                  .farense-demo.json (says the folder is ours to replace)
        model.tmp-<hex>/          a build in progress or killed (never read, removed by the next build)
        .farense-demo.lock        the build lock (farense.run.locks) held while building

A build counts only when the marker verifies: same DEMO_VERSION and seed, every file it lists
present with its size and SHA-256, and data identical to the shipped data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from farense.console import print_table
from farense.errors import FarenseError
from farense.run.fsutil import (
    commit_dir,
    fsync_file,
    sha256_file,
    staged_dir,
    write_new_file,
)
from farense.run.layout import TMP_MARK
from farense.run.locks import RunLock

# Bump when anything that ends up in the built files changes (dimensions, tokenizer, template,
# initialisation): an older build then stops counting and is rebuilt.
DEMO_VERSION = 1
MARKER_NAME = ".farense-demo.json"
LOCK_NAME = ".farense-demo.lock"
SPLITS = ("train", "valid", "test")

UNK, BOS, EOS, INST, END_INST = "<unk>", "<s>", "</s>", "[INST]", "[/INST]"
SPECIAL_TOKENS = (UNK, BOS, EOS, INST, END_INST)  # ids 0..4, as in Mistral's tokenizer for the first three

# Mistral's instruction format: the system prompt opens the first user turn; a user turn ends with
# [/INST], which is already the cue for the answer, so add_generation_prompt adds nothing. Because
# [/INST] is a special token, the prompt's ids are a prefix of the whole conversation's ids, which
# mlx-lm's mask_prompt relies on.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = '' %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('Only system, user and assistant roles are supported') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{%- endif %}"
)
# The literal text the template adds around messages (besides special tokens): the tokenizer
# learns it like the data.
TEMPLATE_PIECES = (" ", "\n\n")


@dataclass(frozen=True)
class DemoModelSpec:
    """The demo model's size: a miniature Mistral (GQA, SwiGLU, RoPE, untied output head)."""

    # Sized for a 2-core CPU, where mlx runs about one core's worth: a LoRA step at batch 4 over the
    # ~65-token demo sequences takes ~0.085 s of CPU at hidden 64 and ~0.2 s at hidden 128, while a
    # frozen random base learns about as much through LoRA at either width. Dimensions are
    # multiples of 64 so QLoRA's default group size fits.
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # grouped-query attention, as in Mistral
    intermediate_size: int = 192  # 3 x hidden
    vocab_size: int = 1536  # the tokenizer is trained to exactly this many tokens
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    def hf_config(self) -> dict[str, Any]:
        """config.json as Hugging Face writes it for Mistral; mlx-lm maps model_type mistral to llama."""
        return {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            **asdict(self),
            "head_dim": self.hidden_size // self.num_attention_heads,
            "hidden_act": "silu",
            "sliding_window": None,
            "bos_token_id": SPECIAL_TOKENS.index(BOS),
            "eos_token_id": SPECIAL_TOKENS.index(EOS),
            "torch_dtype": "float32",
        }


DEMO_SPEC = DemoModelSpec()


@dataclass(frozen=True)
class DemoPaths:
    """Where a demo build lives: `model` loads with mlx_lm.load, `data` is an mlx-lm data dir."""

    root: Path
    model: Path
    data: Path

    @classmethod
    def under(cls, directory: str | os.PathLike[str]) -> DemoPaths:
        root = Path(directory)
        return cls(root=root, model=root / "model", data=root / "data")

    @property
    def marker(self) -> Path:
        return self.model / MARKER_NAME

    def info(self) -> dict[str, Any]:
        """The marker's contents (version, seed, dimensions, parameter count, file hashes)."""
        return json.loads(self.marker.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# The shipped data


def shipped_split(split: str) -> bytes:
    """The bytes of one shipped split (farense/demo_data/<split>.jsonl), as packaged."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return (resources.files("farense") / "demo_data" / f"{split}.jsonl").read_bytes()


def shipped_examples(split: str) -> list[dict[str, Any]]:
    """The shipped examples of one split, parsed (one chat `messages` object per line)."""
    return [json.loads(line) for line in shipped_split(split).decode("utf-8").splitlines() if line.strip()]


def _tokenizer_corpus() -> list[str]:
    texts = [m["content"] for split in SPLITS for ex in shipped_examples(split) for m in ex["messages"]]
    return texts + list(TEMPLATE_PIECES)


# ---------------------------------------------------------------------------------------------
# Verifying a build


def _file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _verify(paths: DemoPaths, seed: int) -> bool:
    """True when `paths` holds a complete build for this version, seed and shipped data."""
    try:
        info = paths.info()
        if info.get("demo_version") != DEMO_VERSION or info.get("seed") != seed:
            return False
        files: dict[str, dict[str, Any]] = info["files"]
        for split in SPLITS:  # the data must be today's shipped data, byte for byte
            want = hashlib.sha256(shipped_split(split)).hexdigest()
            if files.get(f"data/{split}.jsonl", {}).get("sha256") != want:
                return False
        for rel, rec in files.items():
            p = paths.root / rel
            if p.stat().st_size != rec["size"] or sha256_file(p) != rec["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def existing_demo(directory: str | os.PathLike[str], *, seed: int = 0) -> DemoPaths | None:
    """The complete build under `directory` for `seed`, or None: a half or stale build never counts."""
    paths = DemoPaths.under(directory)
    return paths if _verify(paths, seed) else None


# ---------------------------------------------------------------------------------------------
# Building


def build_demo(directory: str | os.PathLike[str], *, seed: int = 0, force: bool = False) -> DemoPaths:
    """Build the demo model and data under `directory`, or return the complete build already there.

    Each part is built in a `<name>.tmp-<hex>` directory beside its place and renamed in, so a killed
    build leaves nothing that looks complete; leftovers of killed builds are removed under the lock.
    """
    paths = DemoPaths.under(directory)
    if not force and _verify(paths, seed):
        return paths
    paths.root.mkdir(parents=True, exist_ok=True)
    # flock is released by the kernel when the holder dies, even by SIGKILL: it never goes stale.
    with RunLock(paths.root / LOCK_NAME, command="demo init", timeout=None):
        if not force and _verify(paths, seed):  # another process finished it while we waited
            return paths
        _refuse_foreign(paths)
        _remove_leftovers(paths.root)
        # After a failure (ENOSPC, an error in mlx): no temporaries left behind.
        with staged_dir(paths.data) as data_tmp, staged_dir(paths.model) as model_tmp:
            write_shipped_data(data_tmp, {"demo_version": DEMO_VERSION, "seed": seed})

            summary = _write_model(model_tmp, seed)
            files = {f"model/{p.name}": _file_record(p) for p in sorted(model_tmp.iterdir())}
            files.update({f"data/{p.name}": _file_record(p) for p in sorted(data_tmp.iterdir())})
            _write_json(model_tmp / MARKER_NAME, {"demo_version": DEMO_VERSION, "seed": seed, **summary,
                                                  "files": files})  # last: it makes the build count

            # Data first, model last: until the new model (and its marker) is in place, the build
            # does not verify, whatever moment a kill comes at.
            commit_dir(data_tmp, paths.data, synced=True, replace=True)
            commit_dir(model_tmp, paths.model, synced=True, replace=True)
    return paths


def write_shipped_data(directory: Path, marker: dict[str, Any]) -> None:
    """The shipped splits and a marker (saying the folder is ours to replace) into a directory built aside."""
    directory.mkdir(exist_ok=True)
    for split in SPLITS:
        write_new_file(directory / f"{split}.jsonl", shipped_split(split))
    _write_json(directory / MARKER_NAME, marker)


def shipped_data_intact(directory: Path) -> bool:
    """True when `directory` holds today's shipped splits byte for byte."""
    try:
        return all((directory / f"{s}.jsonl").read_bytes() == shipped_split(s) for s in SPLITS)
    except OSError:
        return False


def _refuse_foreign(paths: DemoPaths) -> None:
    # model/ and data/ only ever appear here whole and with their marker, so one without it is
    # someone else's: refuse to delete it rather than guess.
    for part in (paths.model, paths.data):
        if part.exists() and not (part / MARKER_NAME).exists():
            raise FarenseError(
                f"{part} exists but is not part of a farense demo build (no {MARKER_NAME}): "
                "remove it or choose another directory for `farense demo init`"
            )


def _remove_leftovers(root: Path) -> None:
    """Delete temporary directories of killed builds (we hold the lock, so none is live)."""
    for name in ("model", "data"):
        for p in root.glob(f"{name}{TMP_MARK}*"):
            shutil.rmtree(p, ignore_errors=True)


def _write_model(out: Path, seed: int) -> dict[str, Any]:
    """Tokenizer, config and random weights into `out`; returns the marker's summary fields."""
    spec = DEMO_SPEC
    tokenizer = _train_tokenizer(spec.vocab_size)
    write_new_file(out / "tokenizer.json", tokenizer.to_str().encode("utf-8"))
    special_map = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "additional_special_tokens": [INST, END_INST]}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "special_tokens_map.json", special_map)
    _write_json(out / "config.json", spec.hf_config())
    parameters = _write_weights(out / "model.safetensors", spec, seed)
    return {"model": spec.hf_config(), "parameters": parameters, "tokenizer_vocab_size": tokenizer.get_vocab_size()}


def _write_json(path: Path, obj: Any) -> None:
    write_new_file(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _train_tokenizer(vocab_size: int) -> Any:
    """Byte-level BPE trained on the shipped text: every byte is covered, so accents round-trip."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:  # the corpus could not fill the vocabulary
        raise FarenseError(
            f"demo tokenizer has {tok.get_vocab_size()} tokens, expected {vocab_size}: "
            "lower DemoModelSpec.vocab_size or add data to farense/demo_data"
        )
    # Like Mistral's tokenizer: encode() prepends <s>; the chat template writes its own.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def _write_weights(path: Path, spec: DemoModelSpec, seed: int) -> int:
    """Random weights from numpy's PCG64 (the same on every platform); returns the parameter count.

    Scaled like a freshly initialised transformer: std 1/sqrt(fan_in) for projections and the head
    (so the frozen head can still express a confident prediction, logits up to about +-8), residual
    outputs scaled down by sqrt(2 * layers), norms at one. The first loss is about ln(vocab) = 7.3.
    """
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs.from_dict(spec.hf_config()))
    rng = np.random.default_rng(seed)
    weights: dict[str, mx.array] = {}
    for name, p in sorted(tree_flatten(model.parameters())):
        shape = tuple(p.shape)
        if name.endswith("norm.weight"):
            w = np.ones(shape, dtype=np.float32)
        else:
            std = 1.0 / np.sqrt(shape[-1])
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                std /= np.sqrt(2 * spec.num_hidden_layers)
            w = (rng.standard_normal(shape) * std).astype(np.float32)
        weights[name] = mx.array(w)
    model.load_weights(list(weights.items()))  # strict: fails here if a name or shape is wrong
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})
    fsync_file(path)
    return sum(int(w.size) for w in weights.values())


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# The command


def demo_init_command(directory: str, force: bool = False) -> int:
    """`farense demo init`: build (or reuse) the demo under `directory` and say what is where."""
    reused = not force and existing_demo(directory) is not None
    paths = build_demo(directory, force=force)
    info = paths.info()
    m = info["model"]
    rows = [
        ("status", "complete build reused" if reused else "built"),
        ("model", paths.model.resolve()),
        ("data", paths.data.resolve()),
        ("architecture", f"{m['model_type']}: hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
                         f"{m['num_attention_heads']} heads / {m['num_key_value_heads']} kv heads, "
                         f"intermediate {m['intermediate_size']}"),
        ("parameters", f"{info['parameters']:,}"),
        ("vocabulary", info["tokenizer_vocab_size"]),
        ("examples", ", ".join(f"{s} {len(shipped_examples(s))}" for s in SPLITS)),
        ("seed / version", f"{info['seed']} / {info['demo_version']}"),
    ]
    print_table("farense demo", ("item", "value"), rows)
    return 0
