"""farense.train.data: the mlx-lm formats, and problems reported with file:line before training starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from farense.config import load_config
from farense.errors import ConfigError, DataError
from farense.train.data import count_too_long, data_fingerprint, validate_data

CHAT = {"messages": [{"role": "user", "content": "Olá?"}, {"role": "assistant", "content": "Olá!"}]}
COMPLETION = {"prompt": "2+2=", "completion": "4"}
TEXT = {"text": "Um texto qualquer."}


@pytest.fixture
def config_for(write_config):
    """The config of a data directory, with optional overrides."""

    def make(data_dir: Path, **sections):
        sections["data"] = {"dir": str(data_dir), **sections.get("data", {})}
        return load_config(write_config(sections))

    return make


def make_splits(root: Path, write_jsonl, train, valid=None, test=None) -> Path:
    d = root / "d"
    d.mkdir(exist_ok=True)
    write_jsonl(d / "train.jsonl", train)
    if valid is not None:
        write_jsonl(d / "valid.jsonl", valid)
    if test is not None:
        write_jsonl(d / "test.jsonl", test)
    return d


def data_error(config) -> DataError:
    with pytest.raises(DataError) as e:
        validate_data(config)
    return e.value


# --------------------------------------------------------------------------- accepted formats


@pytest.mark.parametrize("example,fmt", [(CHAT, "chat"), (COMPLETION, "completions"), (TEXT, "text")])
def test_each_mlx_lm_format_is_accepted(tmp_path, write_jsonl, config_for, example, fmt):
    d = make_splits(tmp_path, write_jsonl, [example] * 5, [example] * 4, [example] * 3)
    report, loaded = validate_data(config_for(d))
    assert report.ok
    assert {s: (r.examples, r.format) for s, r in report.splits.items()} == {
        "train": (5, fmt), "valid": (4, fmt), "test": (3, fmt)
    }
    assert loaded["train"][0] == example and len(loaded["valid"]) == 4
    assert report.splits["train"].path == d / "train.jsonl"


def test_the_shared_data_fixture_is_valid(config_for, data_dir):
    report, _ = validate_data(config_for(data_dir))
    assert report.splits["train"].examples == 8 and report.splits["train"].format == "chat"


def test_chat_with_tools_role_and_extra_keys_is_accepted(tmp_path, write_jsonl, config_for):
    ex = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                       {"role": "tool", "content": "t"}, {"role": "assistant", "content": "a"}], "id": 3}
    d = make_splits(tmp_path, write_jsonl, [ex] * 4, [ex] * 4)
    report, _ = validate_data(config_for(d))
    assert report.splits["train"].format == "chat" and "test" not in report.splits


def test_custom_feature_names(tmp_path, write_jsonl, config_for):
    ex = {"conversation": CHAT["messages"]}
    d = make_splits(tmp_path, write_jsonl, [ex] * 4, [ex] * 4)
    report, _ = validate_data(config_for(d, data={"chat_feature": "conversation"}))
    assert report.splits["train"].format == "chat"
    e = data_error(config_for(d))
    assert "expected 'messages', 'prompt'+'completion' or 'text', got conversation" in str(e)


def test_blank_lines_are_skipped_and_do_not_shift_line_numbers(tmp_path, write_jsonl, config_for):
    d = make_splits(tmp_path, write_jsonl, [CHAT, "", CHAT, "   ", "{oops", CHAT, CHAT, CHAT], [CHAT] * 4)
    assert only_problem(config_for(d)).startswith(f"{d / 'train.jsonl'}:5: malformed JSON (")


# --------------------------------------------------------------------------- file:line problems


def only_problem(config) -> str:
    e = data_error(config)
    assert len(e.problems) == 1, e.problems
    assert str(e) == f"Data is not valid: {e.problems[0]}"
    return e.problems[0]


def test_malformed_json_names_file_and_line(tmp_path, write_jsonl, config_for):
    d = make_splits(tmp_path, write_jsonl, [CHAT] * 4, [CHAT, CHAT, '{"messages": [', CHAT, CHAT])
    p = only_problem(config_for(d))
    assert p.startswith(f"{d / 'valid.jsonl'}:3: malformed JSON")


def test_invalid_utf8_is_malformed_json(tmp_path, write_jsonl, config_for):
    d = make_splits(tmp_path, write_jsonl, [CHAT] * 4, [CHAT] * 4)
    with open(d / "train.jsonl", "ab") as f:
        f.write(b'{"text": "\xff\xfe"}\n')
    assert only_problem(config_for(d)).startswith(f"{d / 'train.jsonl'}:5: malformed JSON")


@pytest.mark.parametrize(
    "row,expected",
    [
        ({"question": "q", "answer": "a"}, "missing fields: expected 'messages', 'prompt'+'completion' or 'text', got question, answer"),
        ({"prompt": "only a prompt"}, "missing fields: expected 'messages', 'prompt'+'completion' or 'text', got prompt"),
        ([1, 2], "missing fields: expected 'messages', 'prompt'+'completion' or 'text', got list"),
        ({"messages": []}, "'messages' must be a non-empty list of {role, content} objects"),
        ({"messages": "hi"}, "'messages' must be a non-empty list of {role, content} objects"),
        ({"messages": [{"role": "user"}]}, "'messages[0]' must have 'role' and 'content'"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "'messages[0].role' must be one of system, user, assistant, tool, got 'bot'"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 4}]}, "'messages[1].content' must be a string"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
         "the last message must be the assistant's answer, got role 'user'"),
        ({"prompt": "", "completion": "x"}, "'prompt' must be a non-empty string"),
        ({"prompt": "p", "completion": 3}, "'completion' must be a non-empty string"),
        ({"text": "  "}, "'text' must be a non-empty string"),
    ],
    ids=lambda x: str(x)[:40],
)
def test_bad_example_names_file_line_and_what_is_expected(tmp_path, write_jsonl, config_for, row, expected):
    fmt_ok = {"messages": CHAT, "prompt": COMPLETION, "text": TEXT}
    good = next((v for k, v in fmt_ok.items() if isinstance(row, dict) and k in row), CHAT)
    d = make_splits(tmp_path, write_jsonl, [good, good, good, row, good], [good] * 4)
    assert only_problem(config_for(d)) == f"{d / 'train.jsonl'}:4: {expected}"


def test_mixed_formats_in_one_file(tmp_path, write_jsonl, config_for):
    d = make_splits(tmp_path, write_jsonl, [CHAT, CHAT, TEXT, CHAT, CHAT], [CHAT] * 4)
    assert only_problem(config_for(d)) == f"{d / 'train.jsonl'}:3: format 'text' differs from the file's first example ('chat')"


def test_splits_in_different_formats(tmp_path, write_jsonl, config_for):
    d = make_splits(tmp_path, write_jsonl, [CHAT] * 4, [COMPLETION] * 4)
    assert only_problem(config_for(d)) == f"{d}: splits use different formats (chat, completions)"


def test_every_problem_is_reported_at_once(tmp_path, write_jsonl, config_for):
    d = make_splits(tmp_path, write_jsonl, [CHAT, "{", CHAT, {"x": 1}, CHAT, CHAT], ["nope"] + [CHAT] * 4)
    e = data_error(config_for(d))
    assert [p.split(": ", 1)[0] for p in e.problems] == [f"{d / 'train.jsonl'}:2", f"{d / 'train.jsonl'}:4", f"{d / 'valid.jsonl'}:1"]
    assert str(e).startswith("Data is not valid, found the following errors:\n  - ")


def test_a_long_list_of_problems_is_shortened(tmp_path, write_jsonl, config_for):
    d = make_splits(tmp_path, write_jsonl, [CHAT] * 4 + ["{"] * 25, [CHAT] * 4)
    e = data_error(config_for(d))
    assert len(e.problems) == 25 and str(e).endswith("\n  ... and 5 more")
    assert f"{d / 'train.jsonl'}:24:" in str(e) and f"{d / 'train.jsonl'}:25:" not in str(e)


# --------------------------------------------------------------------------- splits


def test_empty_train_split(tmp_path, write_jsonl, config_for):
    d = make_splits(tmp_path, write_jsonl, [], [CHAT] * 4)
    assert only_problem(config_for(d)) == f"{d / 'train.jsonl'}: the train split is empty (expected at least one valid example)"


def test_a_split_of_blank_lines_is_empty(tmp_path, write_jsonl, config_for):
    d = make_splits(tmp_path, write_jsonl, [CHAT] * 4, ["", "  "])
    assert "the valid split is empty" in only_problem(config_for(d))


def test_missing_valid_split(tmp_path, write_jsonl, config_for):
    d = make_splits(tmp_path, write_jsonl, [CHAT] * 4)
    assert only_problem(config_for(d)) == f"{d / 'valid.jsonl'}: file not found (the valid split is required)"


def test_test_split_is_optional_unless_required(tmp_path, write_jsonl, config_for):
    d = make_splits(tmp_path, write_jsonl, [CHAT] * 4, [CHAT] * 4)
    report, loaded = validate_data(config_for(d))
    assert set(report.splits) == {"train", "valid"} and "test" not in loaded
    with pytest.raises(DataError, match=r"test.jsonl: file not found \(the test split is required\)"):
        validate_data(config_for(d), require_test=True)


def test_empty_test_split_is_only_an_error_when_required(tmp_path, write_jsonl, config_for):
    d = make_splits(tmp_path, write_jsonl, [CHAT] * 4, [CHAT] * 4, [])
    report, _ = validate_data(config_for(d))
    assert report.splits["test"].examples == 0
    with pytest.raises(DataError, match="the test split is empty"):
        validate_data(config_for(d), require_test=True)


def test_missing_data_directory_is_a_config_error(tmp_path, config_for):
    cfg = config_for(tmp_path / "nowhere")
    with pytest.raises(ConfigError) as e:
        validate_data(cfg)
    assert cfg.source in str(e.value) and f"data.dir: directory not found: {tmp_path / 'nowhere'}" in str(e.value)


def test_train_split_smaller_than_a_batch(tmp_path, write_jsonl, config_for):
    d = make_splits(tmp_path, write_jsonl, [CHAT] * 3, [CHAT] * 4)  # v1: batch_size 4
    assert only_problem(config_for(d)) == (
        f"{d / 'train.jsonl'}: 3 examples cannot fill one batch of training.batch_size=4; "
        "expected at least 4 examples (or a smaller batch_size)"
    )
    report, _ = validate_data(config_for(d, training={"batch_size": 3}))
    assert report.ok


def test_valid_split_smaller_than_a_batch(tmp_path, write_jsonl, config_for):
    d = make_splits(tmp_path, write_jsonl, [CHAT] * 8, [CHAT] * 2)
    assert "2 examples cannot fill one validation batch of training.batch_size=4" in only_problem(config_for(d))


# --------------------------------------------------------------------------- length, fingerprint


class FakeDataset:
    """What count_too_long needs from a tokenized dataset: len() and [i][0] (the token ids)."""

    def __init__(self, lengths):
        self.items = [(list(range(n)), 0) for n in lengths]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize(
    "lengths,max_len,expected",
    [([], 8, (0, 0)), ([3, 8, 9, 20], 8, (2, 20)), ([8, 8], 8, (0, 8)), ([100], 8, (1, 100))],
)
def test_count_too_long(lengths, max_len, expected):
    assert count_too_long(FakeDataset(lengths), max_len) == expected


def test_data_fingerprint_follows_train_and_valid_bytes(tmp_path, write_jsonl, config_for, chat_example):
    d = make_splits(tmp_path, write_jsonl, [CHAT] * 4, [CHAT] * 4, [CHAT] * 4)
    cfg = config_for(d)
    fp = data_fingerprint(cfg)
    assert len(fp) == 16 and data_fingerprint(cfg) == fp
    write_jsonl(d / "test.jsonl", [TEXT])
    assert data_fingerprint(cfg) == fp  # the test split does not change training
    write_jsonl(d / "train.jsonl", [chat_example(1)] * 4)
    assert data_fingerprint(cfg) != fp


def test_farense_run_with_bad_data_fails_before_prefect_starts(write_config, data_dir, tmp_path):
    """Issue 13.11: like a bad config, bad data fails `farense run` in a second, Prefect never imported."""
    import subprocess
    import sys

    (data_dir / "train.jsonl").write_text('{"messages": "not a list"}\n')
    script = ("import sys; from farense.cli import main; rc = main(['run', sys.argv[1]]); "
              "print('RESULT', rc, 'prefect' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script, str(write_config())], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert "RESULT 2 False" in proc.stdout, proc.stdout + proc.stderr
    assert f"{data_dir / 'train.jsonl'}:1" in proc.stderr and "Traceback" not in proc.stderr
