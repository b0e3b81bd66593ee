"""Notifications through a Prefect notification block (Slack, Teams, a custom webhook, ...).

The user configures the block once (`python -m deployments.setup --webhook-url ...` or in the UI);
its reference, SLUG/NAME such as `custom-webhook/farense-notify`, comes from the flow parameter,
else the Prefect variable `farense_notify_block`, else FARENSE_NOTIFY_BLOCK. Delivery is retried
with jittered back-off; a notification that cannot be delivered is logged, never fatal.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from prefect import get_run_logger
from tenacity import retry, stop_after_attempt, wait_random_exponential

from .common import step

NOTIFY_VARIABLE = "farense_notify_block"


@dataclass(frozen=True)
class NotifyResult:
    sent: bool
    block: str | None
    detail: str = ""


def resolve_block(block_ref: str | None) -> str | None:
    """The block to notify through: the parameter, the Prefect variable, or the environment."""
    if block_ref:
        return block_ref
    try:
        from prefect.variables import Variable

        value = Variable.get(NOTIFY_VARIABLE, default=None)
    except Exception:  # no API reachable: fall back to the environment
        value = None
    return value or os.environ.get("FARENSE_NOTIFY_BLOCK") or None


@retry(wait=wait_random_exponential(multiplier=0.5, max=10), stop=stop_after_attempt(5), reraise=True)
def _deliver(block_ref: str, subject: str, body: str) -> None:
    from prefect.blocks.core import Block

    block = Block.load(block_ref)
    with block.raise_on_failure():
        block.notify(body=body, subject=subject)


def send_notification(block_ref: str | None, subject: str, body: str,
                      log: logging.Logger | logging.LoggerAdapter) -> NotifyResult:
    """Deliver one notification; plain function, also used by flow hooks outside any task."""
    ref = resolve_block(block_ref)
    if not ref:
        log.info(f"no notification block configured; not sent: {subject}")
        return NotifyResult(False, None, "no block configured")
    try:
        _deliver(ref, subject, body)
    except Exception as e:  # a notification must never fail the pipeline
        log.warning(f"could not notify through {ref}: {e!r}")
        return NotifyResult(False, ref, repr(e))
    log.info(f"notified through {ref}: {subject}")
    return NotifyResult(True, ref)


@step("notify")
def notify_task(subject: str, body: str, block_ref: str | None = None) -> NotifyResult:
    """Tell a person how the run ended."""
    return send_notification(block_ref, subject, body, get_run_logger())
