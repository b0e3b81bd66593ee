"""The halving campaign as a Prefect flow (prefect_test_harness): a 2-trial tiny campaign, each trial's
training a subflow, the rung decisions from the same decision log as `farense campaign run`, the
winner through the pipeline (its F1 in the table), the table and the curves PNG as artifacts; run again, it trains nothing more."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from training_fixtures import REPO


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    home = tmp_path_factory.mktemp("prefect-home")
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK")}
    os.environ.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    from prefect.testing.utilities import prefect_test_harness

    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _campaign(where: Path, demo: Path) -> Path:
    path = where / "two.toml"
    path.write_text(f'''base = "{REPO}/configs/v2.toml"
overlays = ["tiny"]
[set]
"model.path" = "{demo / 'model'}"
"data.dir" = "{demo / 'data'}"
"training.warmup_steps" = 1
"training.max_seq_length" = 128
"training.batch_size" = 2
"training.grad_accumulation" = 1
"validation.every_steps" = 2
"validation.batches" = 2
"checkpoint.every_steps" = 2
"early_stopping.patience" = 0
[search]
"training.learning_rate" = [1e-5, 1e-3]
[halving]
budget = 4
min_resource = 2
eta = 2
''')
    return path


def _artifacts(flow_run_id: Any) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found}


def test_the_halving_flow_runs_the_campaign_with_trial_subflows_and_artifacts(
        prefect_api: None, tmp_path: Path, demo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from farense.release.campaign_file import load_campaign
    from farense.release.trials import RunProgress, campaign_status
    from flows.campaign_halving import campaign_halving_flow

    monkeypatch.setenv("FARENSE_TRAINING_LOCK", str(tmp_path / "training.lock"))  # this test's machine lock
    path = _campaign(tmp_path, demo_dir)
    state = campaign_halving_flow(campaign=str(path), workspace=str(tmp_path), promote=False, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    spec = load_campaign(path, workspace=tmp_path)
    assert spec.rungs == (2, 4) and result.stopped_per_rung == {0: 1} and result.winner is not None
    statuses = {r["trial"]: r["status"] for r in campaign_status(spec)}
    assert sorted(statuses.values()) == ["stopped at rung 0", "winner"] and statuses[result.winner] == "winner"
    assert Path(result.curves_png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = {t.name: RunProgress.read(t.config).checkpoint_step for t in spec.trials}
    assert steps[result.winner] == 4 and min(steps.values()) == 2

    arts = _artifacts(state.state_details.flow_run_id)
    table = arts[f"halving-{spec.name}"]
    assert table.type == "table" and result.winner in str(table.data)
    assert result.winner_f1 is not None and f"{result.winner_f1}" in str(table.data)  # the winner's F1
    # Both trials met in the last comparison (rung 0): the loser, a finalist, has its F1 in the table too.
    rows = {r["trial"]: r for r in table.data} if isinstance(table.data, list) else None
    if rows is None:
        import json

        rows = {r["trial"]: r for r in json.loads(table.data)}
    assert all(isinstance(r["F1"], float) for r in rows.values()), rows
    assert "validation curves" in str(arts[f"halving-curves-{spec.name}"].data)

    # Resumable the same way as the command: a second run reads the log and trains nothing.
    again = campaign_halving_flow(campaign=str(path), workspace=str(tmp_path), final_pipeline=False,
                                  return_state=True)
    assert again.is_completed() and again.result().winner == result.winner
    assert {t.name: RunProgress.read(t.config).checkpoint_step for t in spec.trials} == steps
