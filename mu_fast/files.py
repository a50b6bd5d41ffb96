"""File modes for atomic writes: temporary files become as readable as any other new file.

``tempfile.mkstemp`` / ``mkdtemp`` create 0600 files and 0700 folders (and safetensors writes 0600 files), so a
result written through a temporary name and renamed into place would be private to its owner. ``as_new_file``
gives it the mode ``open()`` / ``mkdir()`` would have: 0666 / 0777 less the process umask.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only read here)
    os.umask(mask)
    return mask


def as_new_file(path: str | os.PathLike, recursive: bool = False) -> None:
    """chmod ``path`` to 0666 (file) / 0777 (folder) less the umask; ``recursive``: everything under a folder too."""
    umask = current_umask()
    path = Path(path)
    targets = [path, *path.rglob("*")] if recursive and path.is_dir() else [path]
    for target in targets:
        if target.is_symlink():
            continue
        os.chmod(target, (0o777 if target.is_dir() else 0o666) & ~umask)
