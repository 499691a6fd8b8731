"""What code produced an artefact: the package version and, from a checkout, the git commit."""
from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FALLBACK_VERSION = "0.0.0+unknown"


def package_version() -> str:
    """The installed `crystalfm` distribution's version; FALLBACK_VERSION when it is not installed."""
    try:
        return metadata.version("crystalfm")
    except metadata.PackageNotFoundError:
        return FALLBACK_VERSION


def git_commit(root: str | Path = REPO_ROOT) -> str | None:
    """HEAD of the checkout at `root`, or None when it is not a checkout or git cannot answer.

    The one failure behaviour: never raises, returns None (callers write "unknown" where a
    string is required)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def git_dirty(root: str | Path = REPO_ROOT, *paths: str) -> bool | None:
    """Whether tracked files under `paths` (all when none) differ from HEAD; None when git cannot answer."""
    try:
        out = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", *paths],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None
