"""Register farense with a Prefect server, idempotently: run it again after any change.

    python -m deployments.setup [--webhook-url URL | --notify-block SLUG/NAME] [--timezone TZ]
    python -m deployments.setup --prefect-file deployments/shared-queue.yaml --shared-queue shared-training --machines 2

What it makes sure of, in order:
1. the process work pool `farense` with the queues `training` (concurrency limit 1: one training
   at a time on the machine), `maintenance` and `campaigns` (a halving campaign's coordinating run); with --shared-queue NAME --machines N also the queue
   NAME with concurrency limit N, which every machine's worker polls (deployments/multi-machine.md);
2. the deployments of deployments/prefect.yaml, or of --prefect-file (`prefect deploy --all`), unless --no-deploy;
   with --timezone (or FARENSE_TIMEZONE) their cron schedules move to that time zone;
3. the notification block (a custom webhook saved as `custom-webhook/farense-notify`, or a block
   the user already made, e.g. `slack-webhook/team`), remembered in the Prefect variable
   `farense_notify_block` that the flows read;
4. three automations (found by name, updated in place):
   - resume: a crashed `farense-training` run starts its deployment again with the same
     parameters and `resume_attempt + 1`; the flow refuses to start past `max_resume_attempts`
     (3 by default), so a run that always crashes stops after 3 resumes and is marked Failed;
   - zombies: a run with no heartbeat for 90 s (--heartbeat-grace; the worker or the machine
     died) is marked Crashed, which in turn triggers the resume;
   - notify: Crashed and Failed runs of both flows are sent to the notification block.
Nothing here trains or loads a model; the training flow is imported only to read its parameters.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"

WORK_POOL = "farense"
QUEUES = {"training": 1, "maintenance": None, "campaigns": None}  # name -> concurrency limit; a campaign's
# coordinating run waits on `campaigns`, its trials on `training`
TRAINING_FLOW = "farense-training"
MAINTENANCE_FLOW = "farense-maintenance"
TRAINING_DEPLOYMENT = f"{TRAINING_FLOW}/nightly"
MAINTENANCE_DEPLOYMENT = f"{MAINTENANCE_FLOW}/weekly-cleanup"

NOTIFY_VARIABLE = "farense_notify_block"
WEBHOOK_BLOCK_NAME = "farense-notify"
WEBHOOK_BLOCK_REF = f"custom-webhook/{WEBHOOK_BLOCK_NAME}"

AUTOMATION_RESUME = "farense: resume crashed training"
AUTOMATION_ZOMBIE = "farense: runs without heartbeat are crashed"
AUTOMATION_NOTIFY = "farense: notify crashed or failed runs"
HEARTBEAT_GRACE = timedelta(seconds=90)  # > 2 heartbeats of 30 s; FARENSE_HEARTBEAT_GRACE_SECONDS overrides
MIN_HEARTBEAT_GRACE = 40  # heartbeats come every 30 s at the most often: less would crash healthy runs

TERMINAL_EVENTS = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}


def _json_template(expression: str) -> dict[str, Any]:
    """A RunDeployment parameter rendered from a Jinja expression, keeping its JSON type."""
    return {"__prefect_kind": "json", "value": {"__prefect_kind": "jinja", "template": "{{ (%s) | tojson }}" % expression}}


def resume_parameters() -> dict[str, Any]:
    """The parameters a resumed run gets: the crashed run's own, and resume_attempt + 1.

    A parameter the crashed run did not set falls back to the flow's default, as it did there.
    """
    from flows.pipeline import training_flow

    out: dict[str, Any] = {}
    for name, p in inspect.signature(training_flow.fn).parameters.items():
        given = f"flow_run.parameters.{name}"
        default = "none" if p.default is None else json.dumps(p.default)
        if name == "resume_attempt":
            out[name] = _json_template(f"({given} | default(0)) + 1")
        else:
            out[name] = _json_template(f"{given} | default({default})")
    return out


def _flows_filter(*flows: str) -> dict[str, Any]:
    return {"prefect.resource.role": "flow", "prefect.resource.name": list(flows)}


def automations(notify_block_id: Any | None, heartbeat_grace: timedelta = HEARTBEAT_GRACE) -> list[Any]:
    """The automations farense relies on (see the module docstring)."""
    from prefect.automations import Automation, ChangeFlowRunState, EventTrigger, RunDeployment, SendNotification
    from prefect.client.schemas.objects import StateType
    from prefect.events.schemas.automations import Posture

    runs = {"prefect.resource.id": "prefect.flow-run.*"}
    out = [
        Automation(
            name=AUTOMATION_RESUME,
            description="Start the training deployment again when one of its runs crashed; the flow "
            "resumes from the last checkpoint and refuses past max_resume_attempts.",
            trigger=EventTrigger(
                expect={"prefect.flow-run.Crashed"},
                match=runs,
                match_related=_flows_filter(TRAINING_FLOW),
                posture=Posture.Reactive,
                threshold=1,
                within=timedelta(0),
            ),
            actions=[RunDeployment(source="inferred", parameters=resume_parameters())],
        ),
        Automation(
            name=AUTOMATION_ZOMBIE,
            description="A run whose heartbeats stopped (its worker or machine died) is marked Crashed.",
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", *TERMINAL_EVENTS},
                match=runs,
                match_related=_flows_filter(TRAINING_FLOW, MAINTENANCE_FLOW),
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive,
                threshold=1,
                within=heartbeat_grace,
            ),
            actions=[
                ChangeFlowRunState(
                    state=StateType.CRASHED,
                    message=f"No heartbeat for {heartbeat_grace.seconds} s: the worker or the machine running it died.",
                )
            ],
        ),
    ]
    if notify_block_id is not None:
        out.append(
            Automation(
                name=AUTOMATION_NOTIFY,
                description="Tell a person when a farense run crashed or failed.",
                trigger=EventTrigger(
                    expect={"prefect.flow-run.Crashed", "prefect.flow-run.Failed"},
                    match=runs,
                    match_related=_flows_filter(TRAINING_FLOW, MAINTENANCE_FLOW),
                    posture=Posture.Reactive,
                    threshold=1,
                    within=timedelta(0),
                ),
                actions=[
                    SendNotification(
                        block_document_id=notify_block_id,
                        subject="farense: {{ flow_run.name }} {{ flow_run.state.name }}",
                        body=(
                            "farense run {{ flow_run.name }} ({{ flow.name }}) is {{ flow_run.state.name }}.\n"
                            "state: {{ flow_run.state.type.value }}\n"
                            "config: {{ flow_run.parameters.config }}\n"
                            "resume attempt: {{ flow_run.parameters.resume_attempt | default(0) }}\n"
                            "message: {{ flow_run.state.message }}\n"
                            "{{ (flow_run | ui_url) or '' }}"
                        ),
                    )
                ],
            )
        )
    return out


async def ensure_work_pool(client: Any, pool: str, extra_queues: dict[str, int | None] | None = None) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        await client.read_work_pool(pool)
    except ObjectNotFound:
        try:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            print(f"created work pool {pool} (process)")
        except ObjectAlreadyExists:  # another setup won the race
            pass
    for queue, limit in {**QUEUES, **(extra_queues or {})}.items():
        try:
            q = await client.read_work_queue_by_name(queue, work_pool_name=pool)
            if q.concurrency_limit != limit:
                await client.update_work_queue(q.id, concurrency_limit=limit)
        except ObjectNotFound:
            await client.create_work_queue(queue, work_pool_name=pool, concurrency_limit=limit)
            print(f"created work queue {pool}/{queue} (concurrency limit {limit})")


def deploy(prefect_file: Path = PREFECT_YAML) -> None:
    """`prefect deploy --all` from the project root (entrypoints are relative to it)."""
    argv = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)]
    subprocess.run(argv, cwd=ROOT, check=True)


async def set_timezone(client: Any, timezone: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.exceptions import ObjectNotFound

    for name in (TRAINING_DEPLOYMENT, MAINTENANCE_DEPLOYMENT):
        try:
            deployment = await client.read_deployment_by_name(name)
        except ObjectNotFound:  # another prefect file (multi-machine.yaml, shared-queue.yaml) names them otherwise
            print(f"{name}: not deployed; its schedule's time zone is left as it is")
            continue
        for s in await client.read_deployment_schedules(deployment.id):
            if isinstance(s.schedule, CronSchedule) and s.schedule.timezone != timezone:
                cron = CronSchedule(cron=s.schedule.cron, timezone=timezone, day_or=s.schedule.day_or)
                await client.update_deployment_schedule(deployment.id, s.id, schedule=cron)
                print(f"{name}: schedule {cron.cron} now in {timezone}")


async def ensure_notify_block(client: Any, webhook_url: str | None, block_ref: str | None) -> Any | None:
    """Save the webhook block if a URL is given; return the chosen block's document id, if any."""
    from prefect.exceptions import ObjectNotFound
    from prefect.variables import Variable

    if webhook_url:
        from prefect.blocks.notifications import CustomWebhookNotificationBlock

        block = CustomWebhookNotificationBlock(
            name="farense", url=webhook_url, json_data={"subject": "{{subject}}", "body": "{{body}}"}
        )
        await block.save(WEBHOOK_BLOCK_NAME, overwrite=True, client=client)
        block_ref = WEBHOOK_BLOCK_REF
        print(f"saved notification block {block_ref} -> {webhook_url}")
    if block_ref:
        await Variable.aset(NOTIFY_VARIABLE, block_ref, overwrite=True)
    else:
        v = await client.read_variable_by_name(NOTIFY_VARIABLE)
        block_ref = v.value if v else None
    if not block_ref:
        print("no notification block: pass --webhook-url URL or --notify-block SLUG/NAME to be told of runs")
        return None
    slug, _, name = str(block_ref).partition("/")
    try:
        doc = await client.read_block_document_by_name(name=name, block_type_slug=slug)
    except ObjectNotFound:
        print(f"warning: notification block {block_ref!r} not found (create it in the UI or pass --webhook-url); "
              "runs will not be notified", file=sys.stderr)
        return None
    return doc.id


async def ensure_automations(client: Any, notify_block_id: Any | None, heartbeat_grace: timedelta) -> None:
    from prefect.automations import AutomationCore

    for automation in automations(notify_block_id, heartbeat_grace):
        desired = AutomationCore(**automation.model_dump(exclude={"id"}))
        existing = await client.read_automations_by_name(automation.name)
        if existing:  # updated in place: no moment without it, even if a worker restarts mid-crash
            # PUT by hand: PrefectClient.update_automation sends owner_resource, which the 3.8 API refuses.
            body = desired.model_dump(mode="json", exclude_unset=True, exclude={"owner_resource"})
            await client.request("PUT", "/automations/{id}", path_params={"id": existing[0].id}, json=body)
            for extra in existing[1:]:
                await client.delete_automation(extra.id)
        else:
            await client.create_automation(desired)
        print(f"automation: {automation.name}")


async def setup(args: argparse.Namespace) -> None:
    from prefect.client.orchestration import get_client

    shared = {args.shared_queue: args.machines} if args.shared_queue else {}
    async with get_client() as client:
        await ensure_work_pool(client, args.pool, shared)
    if not args.no_deploy:
        deploy(Path(args.prefect_file))
    async with get_client() as client:
        if args.timezone:
            await set_timezone(client, args.timezone)
        block_id = await ensure_notify_block(client, args.webhook_url, args.notify_block)
        await ensure_automations(client, block_id, timedelta(seconds=args.heartbeat_grace))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    parser = argparse.ArgumentParser(prog="python -m deployments.setup", description=__doc__.split("\n")[0])
    parser.add_argument("--pool", default=os.environ.get("FARENSE_WORK_POOL", WORK_POOL), help="Work pool name.")
    parser.add_argument("--no-deploy", action="store_true", help="Skip `prefect deploy --all` (pool, block, automations only).")
    parser.add_argument("--prefect-file", default=str(PREFECT_YAML),
                        help="The deployments to apply (default deployments/prefect.yaml; or multi-machine.yaml, shared-queue.yaml).")
    parser.add_argument("--shared-queue", default=os.environ.get("FARENSE_SHARED_QUEUE"),
                        help="Also make this training queue, polled by every machine's worker (shared-queue.yaml: shared-training).")
    parser.add_argument("--machines", type=int, default=int(os.environ.get("FARENSE_MACHINES", "2")),
                        help="The shared queue's concurrency limit: how many machines train at once (default 2).")
    parser.add_argument("--timezone", default=os.environ.get("FARENSE_TIMEZONE"),
                        help="IANA time zone for the schedules (default: as in prefect.yaml, Europe/Lisbon).")
    parser.add_argument("--webhook-url", default=os.environ.get("FARENSE_NOTIFY_WEBHOOK_URL"),
                        help=f"Save a custom webhook notification block ({WEBHOOK_BLOCK_REF}) posting to this URL.")
    parser.add_argument("--notify-block", default=os.environ.get("FARENSE_NOTIFY_BLOCK"),
                        help="Use an existing notification block, as SLUG/NAME (e.g. slack-webhook/team).")
    parser.add_argument("--heartbeat-grace", type=int,
                        default=int(os.environ.get("FARENSE_HEARTBEAT_GRACE_SECONDS", HEARTBEAT_GRACE.seconds)),
                        help="Seconds without a heartbeat before a run is marked Crashed (default 90).")
    args = parser.parse_args(argv)
    if args.heartbeat_grace < MIN_HEARTBEAT_GRACE:
        parser.error(f"--heartbeat-grace: expected at least {MIN_HEARTBEAT_GRACE} s (heartbeats come every 30 s), "
                     f"got {args.heartbeat_grace}")
    if args.shared_queue and args.machines < 1:
        parser.error(f"--machines: expected the number of machines (>= 1), got {args.machines}")
    if args.pool != WORK_POOL and not args.no_deploy:
        parser.error(f"prefect.yaml names the work pool {WORK_POOL!r}; edit it to deploy into another pool")
    asyncio.run(setup(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
