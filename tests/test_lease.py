"""farense.run.lease against a real S3 server: one trainer per run across machines."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from s3_server import store_for

from farense.errors import RunLocked
from farense.run.lease import LeaseHolder, LeaseRecord, RunLease
from farense.run.objectstore import ObjectStore

pytest_plugins = ["conftest_s3"]


class Clock:
    """A wall clock a test moves by hand (the lease's `now` seam): no test sleeps through a TTL."""

    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def holder(host: str, pid: int = 100) -> LeaseHolder:
    return LeaseHolder(host=host, pid=pid, run="exp1", started=1_700_000_000.0)


def lease(store: ObjectStore, host: str, clock: Clock, pid: int = 100, **kw) -> RunLease:
    return RunLease(store, store.key("LEASE.json"), holder(host, pid), ttl_s=30, now=clock, **kw)


def test_second_taker_refused_with_code_73_naming_the_holder(s3_store: ObjectStore) -> None:
    clock = Clock()
    first = lease(s3_store, "mac-a", clock, pid=4242)
    record = first.acquire()
    assert first.held and record.expires_at == clock.t + 30
    clock.t += 10
    with pytest.raises(RunLocked) as err:
        lease(s3_store, "mac-b", clock).acquire()
    assert err.value.exit_code == 73 and err.value.retryable
    msg = str(err.value)
    assert "host mac-a pid 4242" in msg and "in 20 s" in msg and "expires at 2027-01-15T08:00:30+00:00" in msg
    assert err.value.holder.host == "mac-a"  # type: ignore[attr-defined]


def test_expired_lease_is_taken_over_and_the_old_holder_learns_it_lost(s3_store: ObjectStore) -> None:
    clock = Clock()
    reasons: list[str] = []
    old = lease(s3_store, "mac-a", clock, on_lost=reasons.append)
    old.acquire()
    clock.t += 31  # mac-a died (or was cut off) and did not renew
    new = lease(s3_store, "mac-b", clock)
    new.acquire()
    found = new.read()
    assert found is not None and found[0].holder.host == "mac-b"  # type: ignore[union-attr]
    assert old.renew() is False and old.lost and not old.held
    assert reasons and "another process took over" in reasons[0]
    assert new.renew() is True


def test_renewal_extends_and_release_frees_at_once(s3_store: ObjectStore) -> None:
    clock = Clock()
    a = lease(s3_store, "mac-a", clock)
    a.acquire()
    for _ in range(3):
        clock.t += 20
        assert a.renew()
    assert a.expires_at == clock.t + 30
    with pytest.raises(RunLocked):
        lease(s3_store, "mac-b", clock).acquire()
    a.release()
    assert a.read()[0].released  # type: ignore[index,union-attr]
    lease(s3_store, "mac-b", clock).acquire()  # no wait for expiry after a release


def test_two_racing_takeovers_have_one_winner(s3_server, s3_store: ObjectStore) -> None:
    clock = Clock()
    lease(s3_store, "dead", clock).acquire()
    clock.t += 100
    n = 8
    start = threading.Barrier(n)
    takers = [RunLease(store_for(s3_server, s3_store.location.prefix), s3_store.key("LEASE.json"),
                       holder(f"mac-{i}"), ttl_s=30, now=clock) for i in range(n)]

    def take(i: int) -> str:
        start.wait()
        try:
            takers[i].acquire()
            return "won"
        except RunLocked as err:
            return str(err)

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(take, range(n)))
    winners = [i for i, r in enumerate(results) if r == "won"]
    assert len(winners) == 1, results
    assert all(f"host mac-{winners[0]} " in r for r in results if r != "won")


def test_unrenewable_lease_is_lost_once_it_expires(private_s3) -> None:
    clock = Clock()
    store = store_for(private_s3, "run", client_retries=0)
    reasons: list[str] = []
    a = RunLease(store, store.key("LEASE.json"), holder("mac-a"), ttl_s=30, now=clock, on_lost=reasons.append)
    a.acquire()
    private_s3.stop()
    clock.t += 20
    assert a.renew() is False and not a.lost  # still within the TTL: keep trying
    clock.t += 11
    assert a.renew() is False and a.lost
    assert len(reasons) == 1 and "before it expired" in reasons[0]


def test_background_renewal_thread(s3_store: ObjectStore) -> None:
    a = RunLease(s3_store, s3_store.key("LEASE.json"), holder("mac-a"), ttl_s=1.0)
    with a:
        first = a.expires_at
        time.sleep(1.1)  # longer than the TTL: only renewals keep it
        assert a.held and a.expires_at > first  # type: ignore[operator]
        with pytest.raises(RunLocked):
            RunLease(s3_store, s3_store.key("LEASE.json"), holder("mac-b"), ttl_s=1.0).acquire()
    assert a.read()[0].released  # type: ignore[index,union-attr]


def test_unreadable_lease_is_taken_over(s3_store: ObjectStore) -> None:
    s3_store.put(s3_store.key("LEASE.json"), b"not json")
    assert LeaseRecord.from_bytes(b"not json") is None
    lease(s3_store, "mac-a", Clock()).acquire()
