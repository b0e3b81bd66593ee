"""The notification at a campaign's end names the winner and how many trials stopped at which rung."""

from __future__ import annotations

from pathlib import Path

from farense.release.campaign_file import load_campaign
from farense.release.halving import STOP, WINNER
from farense.release.trials import CampaignOutcome, campaign_message

REPO = Path(__file__).resolve().parent.parent


def test_the_campaign_notification_names_the_winner_and_the_stops_per_rung(tmp_path: Path) -> None:
    spec = load_campaign(REPO / "configs" / "campaigns" / "lr-rank.toml", overlays=["tiny"], workspace=tmp_path)
    names = [t.name for t in spec.trials]
    events = ([{"kind": STOP, "trial": n, "rung": 0, "value": 2.0} for n in names[:4]]
              + [{"kind": STOP, "trial": n, "rung": 1, "value": 1.5} for n in names[4:6]]
              + [{"kind": STOP, "trial": names[6], "rung": 2, "value": 1.2},
                 {"kind": WINNER, "trial": names[7], "value": 1.03125}])
    subject, body = campaign_message(CampaignOutcome(spec, events))
    winner = spec.trials[7]
    assert subject == f"farense: campaign {spec.name}: {winner.name} wins"
    lines = body.splitlines()
    assert lines[0].startswith(f"winner: {winner.name} (") and lines[0].endswith("best val loss 1.0312")
    assert "rank=" in lines[0] and "learning_rate=" in lines[0]
    assert lines[1:] == ["stopped at rung 0 (step 5): 4 of 8", "stopped at rung 1 (step 10): 2 of 8",
                         "stopped at rung 2 (step 20): 1 of 8"]


def test_a_campaign_without_a_winner_says_so(tmp_path: Path) -> None:
    spec = load_campaign(REPO / "configs" / "campaigns" / "lr-rank.toml", overlays=["tiny"], workspace=tmp_path)
    subject, body = campaign_message(CampaignOutcome(spec, []))
    assert subject.endswith(": no winner") and body == "no winner\nno trial stopped early"
