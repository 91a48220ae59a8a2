"""Private temporary folders of game environments, owned by a process and removed with it.

A desktop game's HOME, clock and log, or a browser driver's profiles and artifacts, live in a folder
under the system's temp dir that records its owner's pid. A SIGKILLed or Ray-killed actor cannot clean
up, so the next environment made on the node deletes the folders whose owner is gone, and no other.
A folder is emptied before its owner file goes: where a dying child (a browser still exiting) writes into
it meanwhile, the folder keeps its owner file and the next prune finishes it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

OWNER = "owner.pid"


def make_workdir(prefix: str) -> Path:
    """A new folder `<tmp>/<prefix>XXXX` owned by this process."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    (d / OWNER).write_text(str(os.getpid()))
    return d


def prune_stale_workdirs(prefix: str, min_age_s: float = 60.0, legacy_marker: str | None = None) -> int:
    """Delete the folders `<tmp>/<prefix>*` whose owner process is no longer alive (and, without an owner
    file, those holding `legacy_marker`: an older version's). Returns how many went."""
    gone = 0
    for d in Path(tempfile.gettempdir()).glob(prefix + "*"):
        pid = None
        try:
            if time.time() - d.stat().st_mtime < min_age_s:
                continue  # just made: its owner may not have written its pid yet
            pid = int((d / OWNER).read_text())
            os.kill(pid, 0)
            continue  # its process is alive
        except ProcessLookupError:
            pass
        except PermissionError:  # alive, another user's
            continue
        except (OSError, ValueError):  # no pid file or not ours to read
            if legacy_marker is None or not (d / legacy_marker).exists():
                continue
        gone += _remove(d, pid)
    return gone


def _remove(d: Path, pid: int | None, tries: int = 3) -> bool:
    """Delete `d` with its owner file last; True when it went. Where something still writes into it, the
    owner file stays (written back if it had gone), so a later prune tries again instead of skipping an
    ownerless folder forever."""
    for _ in range(tries):
        try:
            for child in d.iterdir():
                if child.name == OWNER:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
            if any(c.name != OWNER for c in d.iterdir()):
                continue  # written into meanwhile
            (d / OWNER).unlink(missing_ok=True)
            d.rmdir()
            return True
        except FileNotFoundError:
            return not d.exists()
        except OSError:
            continue
    if d.exists() and pid is not None and not (d / OWNER).exists():
        try:
            (d / OWNER).write_text(str(pid))
        except OSError:
            pass
    return not d.exists()
