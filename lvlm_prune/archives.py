"""Integrity checks of `torch.save` archives (Lightning checkpoints) before they are loaded."""

from __future__ import annotations

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
