"""farense.model.demo: the offline demo model and the shipped sample data.

One real build per session (under a second); tests that damage a build work on a copy of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from farense.errors import FarenseError
from farense.model import demo
from farense.model.demo import (
    DEMO_VERSION,
    MARKER_NAME,
    SPLITS,
    DemoPaths,
    build_demo,
    existing_demo,
)

ACCENTED = "Onde fica o Estádio de São Luís? Açores, coração, ênfase, à noite, pão."


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> DemoPaths:
    """One complete demo build, shared by the session; tests must not modify it."""
    return build_demo(tmp_path_factory.mktemp("demo") / "demo")


@pytest.fixture(scope="session")
def loaded(built: DemoPaths):
    import mlx_lm

    return mlx_lm.load(str(built.model))


@pytest.fixture
def copy_of(built: DemoPaths, tmp_path: Path) -> DemoPaths:
    """A private copy of the session build, for tests that damage it."""
    root = tmp_path / "demo"
    shutil.copytree(built.root, root)
    return DemoPaths.under(root)


def _all_examples() -> dict[str, list[dict]]:
    return {s: demo.shipped_examples(s) for s in SPLITS}


# --------------------------------------------------------------------------------------- the build


def test_build_is_complete_and_idempotent(built: DemoPaths):
    before = built.marker.stat().st_mtime_ns
    again = build_demo(built.root)
    assert again == built
    assert built.marker.stat().st_mtime_ns == before  # not rebuilt
    assert existing_demo(built.root) == built
    info = built.info()
    assert info["demo_version"] == DEMO_VERSION and info["seed"] == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        assert f"model/{name}" in info["files"]
    for split in SPLITS:
        assert (built.data / f"{split}.jsonl").read_bytes() == demo.shipped_split(split)


def test_config_is_a_small_mistral(built: DemoPaths):
    cfg = json.loads((built.model / "config.json").read_text())
    assert cfg["model_type"] == "mistral"
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # grouped-query attention
    assert cfg["hidden_size"] % 64 == 0 and cfg["intermediate_size"] % 64 == 0  # QLoRA group size fits
    assert cfg["vocab_size"] == built.info()["tokenizer_vocab_size"]


def test_force_rebuilds_the_same_bytes(copy_of: DemoPaths):
    weights = (copy_of.model / "model.safetensors").read_bytes()
    tokenizer = (copy_of.model / "tokenizer.json").read_bytes()
    before = copy_of.marker.stat().st_mtime_ns
    build_demo(copy_of.root, force=True)
    assert copy_of.marker.stat().st_mtime_ns != before
    assert (copy_of.model / "model.safetensors").read_bytes() == weights  # seeded: deterministic
    assert (copy_of.model / "tokenizer.json").read_bytes() == tokenizer


def test_another_seed_is_another_build(copy_of: DemoPaths):
    weights = (copy_of.model / "model.safetensors").read_bytes()
    assert existing_demo(copy_of.root, seed=1) is None
    build_demo(copy_of.root, seed=1)
    assert copy_of.info()["seed"] == 1
    assert (copy_of.model / "model.safetensors").read_bytes() != weights


# ------------------------------------------------------------------------------------ kill safety


def test_leftover_temporary_build_is_ignored_and_removed(built: DemoPaths, tmp_path: Path):
    root = tmp_path / "demo"
    root.mkdir()
    # A killed build left whole-looking temporaries beside the targets, marker included.
    shutil.copytree(built.model, root / "model.tmp-0123abcd")
    shutil.copytree(built.data, root / "data.tmp-0123abcd")
    assert existing_demo(root) is None
    paths = build_demo(root)
    assert existing_demo(root) == paths
    assert sorted(p.name for p in root.iterdir()) == [".farense-demo.lock", "data", "model"]


def test_kill_between_data_and_model_swap(copy_of: DemoPaths):
    # swap_in_dir moved the old model aside and the process died before renaming the new one in.
    os.rename(copy_of.model, copy_of.root / "model.tmp-deadbeef")
    assert existing_demo(copy_of.root) is None
    build_demo(copy_of.root)
    assert existing_demo(copy_of.root) == copy_of
    assert not list(copy_of.root.glob("*.tmp-*"))


@pytest.mark.parametrize("damage", ["truncate-weights", "drop-tokenizer", "edit-data", "old-version"])
def test_damaged_build_does_not_count_and_is_rebuilt(copy_of: DemoPaths, damage: str):
    if damage == "truncate-weights":
        with open(copy_of.model / "model.safetensors", "r+b") as f:
            f.truncate(1000)
    elif damage == "drop-tokenizer":
        (copy_of.model / "tokenizer.json").unlink()
    elif damage == "edit-data":
        with open(copy_of.data / "train.jsonl", "ab") as f:
            f.write(b"\n")
    else:
        info = copy_of.info()
        info["demo_version"] = DEMO_VERSION - 1
        copy_of.marker.write_text(json.dumps(info))
    assert existing_demo(copy_of.root) is None
    build_demo(copy_of.root)
    assert existing_demo(copy_of.root) == copy_of


def test_refuses_to_replace_a_model_that_is_not_ours(tmp_path: Path):
    foreign = tmp_path / "demo" / "model"
    foreign.mkdir(parents=True)
    (foreign / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(FarenseError, match=r"not part of a farense demo build"):
        build_demo(tmp_path / "demo", force=True)
    assert (foreign / "config.json").read_text() == '{"model_type": "llama"}'


# ------------------------------------------------------------------------ model and tokenizer


def test_mlx_lm_loads_it_and_forward_gives_logits(loaded, built: DemoPaths):
    import mlx.core as mx

    model, tokenizer = loaded
    vocab = json.loads((built.model / "config.json").read_text())["vocab_size"]
    ids = tokenizer.encode(ACCENTED)
    batch = mx.array([ids, ids[::-1]])
    logits = model(batch)
    assert logits.shape == (2, len(ids), vocab)
    assert bool(mx.all(mx.isfinite(logits)).item())


def test_encode_decode_round_trips_accents(loaded):
    _, tokenizer = loaded
    ids = tokenizer.encode(ACCENTED)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == ACCENTED
    assert tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in ids  # byte-level: no unknowns


def test_chat_template_gives_ids_that_decode_to_the_conversation(loaded):
    _, tokenizer = loaded
    messages = _all_examples()["test"][0]["messages"]
    ids = tokenizer.apply_chat_template(messages, return_dict=False)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    text = tokenizer.decode(ids)
    for m in messages:
        assert m["content"] in text
    assert "[INST]" in text and "[/INST]" in text
    # mlx-lm's mask_prompt needs the prompt's ids to be a prefix of the whole conversation's.
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=False)
    assert ids[: len(prompt)] == prompt and len(prompt) < len(ids)


def test_chat_template_with_an_accented_question(loaded):
    _, tokenizer = loaded
    messages = [{"role": "user", "content": ACCENTED}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ACCENTED in tokenizer.decode(ids)
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template(messages * 2, return_dict=False)


# ------------------------------------------------------------------------------ the shipped data


def test_shipped_data_is_chat_jsonl_with_enough_pairs():
    examples = _all_examples()
    assert sum(len(v) for v in examples.values()) >= 150
    assert len(examples["train"]) >= 136 and len(examples["valid"]) >= 17 and len(examples["test"]) >= 17
    systems = set()
    for split in SPLITS:
        raw = demo.shipped_split(split).decode("utf-8")
        assert raw.endswith("\n") and "\\u00" not in raw  # UTF-8 as written, not ASCII escapes
        for n, line in enumerate(raw.splitlines(), start=1):
            msgs = json.loads(line)["messages"]
            where = f"{split}.jsonl:{n}"
            assert [m["role"] for m in msgs] == ["system", "user", "assistant"], where
            assert all(isinstance(m["content"], str) and m["content"].strip() for m in msgs), where
            assert 8 <= len(msgs[2]["content"].split()) <= 30, where  # short, factual answers
            systems.add(msgs[0]["content"])
    assert len(systems) == 1  # one fixed system prompt


def test_shipped_data_passes_farense_validation(tmp_path: Path):
    from farense.config import DataConfig
    from farense.train.data import read_split

    problems: list[str] = []
    for split in SPLITS:
        path = tmp_path / f"{split}.jsonl"
        path.write_bytes(demo.shipped_split(split))
        examples, fmt = read_split(path, DataConfig(), problems)
        assert fmt == "chat" and examples
    assert problems == []


def test_splits_are_disjoint_by_question_and_paraphrases_are_answerable():
    examples = _all_examples()
    questions = {s: [ex["messages"][1]["content"] for ex in examples[s]] for s in SPLITS}
    for s in SPLITS:
        assert len(set(questions[s])) == len(questions[s]), f"duplicate question in {s}"
    assert not set(questions["train"]) & set(questions["valid"])
    assert not set(questions["train"]) & set(questions["test"])
    assert not set(questions["valid"]) & set(questions["test"])
    train_answers = {ex["messages"][2]["content"] for ex in examples["train"]}
    for s in ("valid", "test"):
        answered = sum(ex["messages"][2]["content"] in train_answers for ex in examples[s])
        assert answered >= len(examples[s]) // 2, f"{s}: too few paraphrases of train questions"


def test_facts_stay_consistent():
    text = " ".join(m["content"] for v in _all_examples().values() for ex in v for m in ex["messages"])
    assert "7000 espectadores" in text and "1910" in text and "1923" in text
    for wrong in ("8000 espectadores", "fundado em 1911", "inaugurado em 1924"):
        assert wrong not in text


# ------------------------------------------------------------------------------------ the command


def test_demo_init_command_reports_what_and_where(copy_of: DemoPaths, capsys: pytest.CaptureFixture[str]):
    assert demo.demo_init_command(str(copy_of.root)) == 0
    out = capsys.readouterr().out
    assert "complete build reused" in out and str(copy_of.model.resolve()) in out
    assert demo.demo_init_command(str(copy_of.root), force=True) == 0
    assert "built" in capsys.readouterr().out


def test_demo_module_does_not_import_prefect_or_mlx_at_import_time():
    code = "import sys, farense.model.demo; print(sorted(m for m in ('prefect', 'mlx', 'mlx_lm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
