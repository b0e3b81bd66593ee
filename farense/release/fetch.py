"""A release brought from the object store into `production/releases/<id>/`, so a machine can switch
to a release another machine promoted (a rollback, or following the store's `production/current`).

Built beside its final place like a local release: every file streamed in, hashed on the way and
checked against the release manifest (size and SHA-256), `release.json` written last, then renamed.
A file that does not match fails the fetch and nothing is left under the release's name.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from farense.errors import FarenseError
from farense.run import fsutil
from farense.run.remote_layout import join_key
from farense.run.remote_releases import RELEASE_MANIFEST, RemoteReleases


def fetch_release(remote: RemoteReleases, release_id: str, releases_dir: Path) -> Path:
    """Download release `release_id` into `releases_dir/<id>` (it must not exist there yet); its path."""
    found = remote.store.get(join_key(remote.prefix, "releases", release_id, RELEASE_MANIFEST))
    if found is None:
        raise FarenseError(f"no release {release_id!r} on the store under {join_key(remote.prefix, 'releases')}")
    manifest_bytes = found[0]
    release = remote.get_release(release_id)
    assert release is not None
    final = Path(releases_dir) / release_id
    with fsutil.staged_dir(final) as tmp:
        for name, entry in sorted(release.files.items()):
            target = tmp / _safe_name(name, release_id)
            target.parent.mkdir(parents=True, exist_ok=True)
            got = remote.store.download_file(join_key(remote.prefix, "releases", release_id, name), target)
            if (got.size, got.sha256) != (entry.get("size"), entry.get("sha256")):
                raise FarenseError(f"release {release_id} on the store does not verify: {name} has size {got.size} "
                                   f"and SHA-256 {got.sha256[:12]}, its manifest says {entry.get('size')} and "
                                   f"{str(entry.get('sha256'))[:12]}; not fetched")
            os.chmod(target, 0o444)  # releases are read-only, as promotion leaves them
        fsutil.commit_dir(tmp, final,
                          manifest=lambda d: fsutil.write_new_file(d / RELEASE_MANIFEST, manifest_bytes))
    return final


def _safe_name(name: str, release_id: str) -> PurePosixPath:
    """A file name from a manifest as a relative path inside the release; never `..` or absolute."""
    p = PurePosixPath(name)
    if p.is_absolute() or not p.parts or any(part in ("", ".", "..") for part in p.parts) or name == RELEASE_MANIFEST:
        raise FarenseError(f"release {release_id} on the store lists a file {name!r}: expected a relative name "
                           "inside the release")
    return p
