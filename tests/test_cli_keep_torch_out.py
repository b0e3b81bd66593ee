"""farense.cli.keep_torch_out: torch looks absent to transformers in a farense process (issue 23's
start-up: transformers imports torch whenever it is installed), unless FARENSE_ALLOW_TORCH=1."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from farense.cli import keep_torch_out

_ABSENT = object()


@pytest.fixture
def torch_entry():
    before = sys.modules.pop("torch", _ABSENT)
    yield
    sys.modules.pop("torch", None)
    if before is not _ABSENT:
        sys.modules["torch"] = before


def test_torch_looks_absent(torch_entry, monkeypatch):
    monkeypatch.delenv("FARENSE_ALLOW_TORCH", raising=False)
    keep_torch_out()
    assert importlib.util.find_spec("torch") is None  # what transformers' is_torch_available asks
    with pytest.raises(ImportError):
        import torch  # noqa: F401


def test_allow_torch_leaves_it_alone(torch_entry, monkeypatch):
    monkeypatch.setenv("FARENSE_ALLOW_TORCH", "1")
    keep_torch_out()
    assert "torch" not in sys.modules
