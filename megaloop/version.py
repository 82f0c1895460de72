"""What code is running: megaloop's version and the git commit of its own source tree (never
the working directory's repository, which may be any project, or none)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from megaloop import __version__

PACKAGE = Path(__file__).resolve().parent


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                              timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def source_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout megaloop runs from; (None, None) for an installed copy
    (its files in site-packages belong to no checkout of megaloop)."""
    top = _git(PACKAGE, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != PACKAGE.parent:
        return None, None
    commit = _git(PACKAGE.parent, "rev-parse", "HEAD")
    dirty = _git(PACKAGE.parent, "status", "--porcelain", "--untracked-files=no")
    return commit, None if dirty is None else bool(dirty)


def describe() -> str:
    """`megaloop 0.1.0 (git 1a2b3c4d5e6f, with local changes)`, as `megaloop --version` says."""
    commit, dirty = source_commit()
    if commit is None:
        return f"megaloop {__version__} (installed; no source checkout)"
    return f"megaloop {__version__} (git {commit[:12]}{', with local changes' if dirty else ''})"
