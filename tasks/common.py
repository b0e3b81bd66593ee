"""What the tasks share: one way to load a config, the back-off for transient I/O, artifact keys.

Transient failures (a file being replaced, a flaky network) are retried here with tenacity, with
bounded, jittered exponential back-off. A full disk or an I/O error is not transient: retrying a
write after ENOSPC or EIO can only make things worse, so those propagate at once.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from tenacity import (
    retry,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from farense.run.fsutil import DISK_FULL_ERRNOS

F = TypeVar("F", bound=Callable[..., Any])

# ENOSPC, EDQUOT and EIO are never retried (see farense/run/fsutil.py for why), nor a missing file.
_NOT_TRANSIENT = DISK_FULL_ERRNOS | {errno.ENOENT}


def _is_transient(exc: BaseException) -> bool:
    try:
        import httpx

        if isinstance(exc, (httpx.TransportError, httpx.HTTPStatusError)):
            status = getattr(getattr(exc, "response", None), "status_code", 500)
            return isinstance(exc, httpx.TransportError) or status >= 500 or status == 429
    except ImportError:  # pragma: no cover - httpx ships with prefect
        pass
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    return isinstance(exc, OSError) and exc.errno not in _NOT_TRANSIENT


def transient(attempts: int = 5, max_wait: float = 8.0, deadline: float = 60.0) -> Callable[[F], F]:
    """Retry a file system or network call on transient errors: jittered back-off, bounded twice."""
    return retry(
        retry=retry_if_exception(_is_transient),
        wait=wait_random_exponential(multiplier=0.5, max=max_wait),
        stop=stop_after_attempt(attempts) | stop_after_delay(deadline),
        reraise=True,
    )


def best_effort(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Observability calls (artifacts, events, tags): retried on transient errors, never fatal.

    A progress bar that could not be updated must not stop a training that is going well.
    """
    import logging

    try:
        return transient(attempts=3, max_wait=2.0, deadline=10.0)(fn)(*args, **kwargs)
    except Exception as e:
        logging.getLogger("farense.tasks").warning(f"{what} failed, continuing: {e!r}")
        return None


TASK_TAG = "farense"  # on every task run, whichever flow or context starts it


def step(name: str, *, tags: Sequence[str] = (), **options: Any) -> Any:
    """A pipeline step as a Prefect task: named, tagged `farense`, never cached, not retried unless asked."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    options.setdefault("retries", 0)
    options.setdefault("cache_policy", NO_CACHE)
    return task(name=name, tags=[TASK_TAG, *tags], **options)


def tag_flow_run(*wanted: str) -> None:
    """Add tags to the current flow run (a `farense run` has no deployment to give them), best effort."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    current = set(flow_run.tags or [])
    if set(wanted) <= current:
        return

    def update() -> None:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, tags=sorted(current | set(wanted)))

    best_effort("tagging the flow run", update)


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    key = "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts if p)
    return key or "farense"


@transient()
def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file written atomically by farense, or None when it does not exist (yet)."""
    import orjson

    try:
        return orjson.loads(Path(path).read_bytes())
    except FileNotFoundError:
        return None
