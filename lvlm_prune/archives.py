"""Files on disk: integrity checks of `torch.save` archives (Lightning checkpoints) before they are loaded, and the
permissions of exported weights."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path


def torch_archive_problem(path: str | Path) -> str | None:
    """What is wrong with the `torch.save` file at `path` (not an archive, or a member whose CRC does not match), or
    None. A flipped byte inside a tensor's data loads without an error in `torch.load`: the CRC check is what
    notices it, at the cost of reading the file once."""
    if not zipfile.is_zipfile(path):
        return "not a torch.save archive: truncated or another kind of file"
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"an unreadable archive ({error})"
    return None if damaged is None else f"corrupt: the archive member {damaged!r} fails its checksum"


def with_default_permissions(path: str | Path) -> Path:
    """Gives `path` the permissions a newly created file gets under the process's umask. safetensors writes its
    files readable by their owner only (0600), unlike the JSON and config files beside them, so on a shared
    filesystem colleagues could read an export's settings but not its weights."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return Path(path)
