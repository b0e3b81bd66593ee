"""Where a run's files live on the object store, the remote twin of farense.layout:

    <run prefix>/LEASE.json                               one trainer per run (farense.run.lease)
    <run prefix>/run_state.json, metrics.jsonl, ...       mirrored run files, same names as on disk
    <run prefix>/adapters/adapters.safetensors ...        best adapters
    <run prefix>/checkpoints/step-00000400/<file>         a checkpoint's files, uploaded first
    <run prefix>/checkpoints/step-00000400/MANIFEST.json  uploaded LAST (If-None-Match): the commit marker
    <run prefix>/checkpoints/step-00000400/QUARANTINED.json   failed verification on restore: never loaded again

A remote checkpoint exists only with its manifest and without a quarantine marker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from farense.run.layout import MANIFEST_NAME, checkpoint_name, parse_checkpoint_name
from farense.run.objectstore import ObjectInfo, ObjectStore

CHECKPOINTS_DIR = "checkpoints"
QUARANTINE_MARKER = "QUARANTINED.json"


def join_key(*parts: str) -> str:
    """Key parts joined by '/', empty parts (an empty run prefix) left out."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def checkpoint_key(run_prefix: str, step: int, name: str = "") -> str:
    """The key of a checkpoint's directory, or of one of its files."""
    return join_key(run_prefix, CHECKPOINTS_DIR, checkpoint_name(step), name)


@dataclass(frozen=True)
class RemoteCheckpoint:
    """The objects found under one remote checkpoint directory, by file name."""

    step: int
    prefix: str
    objects: dict[str, ObjectInfo] = field(hash=False)

    @property
    def committed(self) -> bool:
        """Its manifest is there: every file was uploaded before it."""
        return MANIFEST_NAME in self.objects

    @property
    def quarantined(self) -> bool:
        return QUARANTINE_MARKER in self.objects

    @property
    def usable(self) -> bool:
        """A candidate for restore: committed and not quarantined (still to verify after download)."""
        return self.committed and not self.quarantined

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects.values())

    def key(self, name: str) -> str:
        return join_key(self.prefix, name)


def list_remote_checkpoints(store: ObjectStore, run_prefix: str) -> list[RemoteCheckpoint]:
    """Every remote checkpoint directory, oldest first, committed or not (one LIST of the prefix)."""
    root = join_key(run_prefix, CHECKPOINTS_DIR)
    found: dict[int, dict[str, ObjectInfo]] = {}
    for info in store.list(root):
        dirname, _, name = info.key[len(root) + 1:].partition("/")
        step = parse_checkpoint_name(dirname)
        if step is not None and name and "/" not in name:
            found.setdefault(step, {})[name] = info
    return [RemoteCheckpoint(step, join_key(root, checkpoint_name(step)), objs) for step, objs in sorted(found.items())]
