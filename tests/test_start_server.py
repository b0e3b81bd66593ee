"""deployments/start-server.sh: the UI in a browser must ask the API where the server really is.

Prefect's UI reads its API address from the server's /ui-settings; a server started on another port or
host without PREFECT_UI_API_URL shows an empty UI that calls 127.0.0.1:4200. The server test starts the
real script on 127.0.0.1 and a free port other than 4200, and stops it by PID.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prefect_harness import DEPLOYMENTS, free_port, quiet_env, start_server

SCRIPT = DEPLOYMENTS / "start-server.sh"


def _print_env(tmp_path: Path, **env: str) -> dict[str, str]:
    out = subprocess.run(["bash", str(SCRIPT), "--print-env"], env=quiet_env(tmp_path / "home", **env),
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def test_the_ui_api_url_follows_host_port_and_public_url(tmp_path: Path) -> None:
    local = _print_env(tmp_path, FARENSE_PREFECT_HOST="127.0.0.1", FARENSE_PREFECT_PORT="4311")
    assert local["PREFECT_UI_API_URL"] == "http://127.0.0.1:4311/api"
    assert (local["PREFECT_SERVER_API_HOST"], local["PREFECT_SERVER_API_PORT"]) == ("127.0.0.1", "4311")

    # Every interface: browsers on other machines must be told a name they can reach, not 0.0.0.0.
    anywhere = _print_env(tmp_path, FARENSE_PREFECT_HOST="0.0.0.0", FARENSE_PREFECT_PORT="4311")
    assert "0.0.0.0" not in anywhere["PREFECT_UI_API_URL"] and anywhere["PREFECT_UI_API_URL"].endswith(":4311/api")
    public = _print_env(tmp_path, FARENSE_PREFECT_HOST="0.0.0.0", FARENSE_PREFECT_PORT="4311",
                        FARENSE_PREFECT_PUBLIC_URL="https://prefect.example.org/")
    assert public["PREFECT_UI_API_URL"] == "https://prefect.example.org/api"
    assert public["PREFECT_UI_URL"] == "https://prefect.example.org"
    mine = _print_env(tmp_path, FARENSE_PREFECT_PORT="4311", PREFECT_UI_API_URL="http://proxy/prefect/api")
    assert mine["PREFECT_UI_API_URL"] == "http://proxy/prefect/api", "a URL the user set is kept"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_server_on_another_port_tells_the_ui_that_port(tmp_path: Path) -> None:
    port = free_port()
    while port == 4200:
        port = free_port()
    server = start_server(tmp_path / "prefect-home", tmp_path / "logs", port=port)
    try:
        with urllib.request.urlopen(f"{server.url}/ui-settings", timeout=10) as r:
            settings = json.loads(r.read())
        assert settings["api_url"] == f"http://127.0.0.1:{port}/api", settings
    finally:
        server.stop()
    assert not server.alive()
