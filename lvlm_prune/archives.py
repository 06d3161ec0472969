"""Files on disk: integrity checks of `torch.save` archives (Lightning checkpoints) before they are loaded, the
permissions of exported weights, files and exports that are complete or absent, and digests of exported weights."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors.torch import save_file


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


def deepspeed_model_states(directory: str | Path) -> list[Path]:
    """The model-states files of a DeepSpeed checkpoint directory's 'latest' tag, rank 0's first: ZeRO-2 writes one
    mp_rank_00_model_states.pt, ZeRO-3 one zero_pp_rank_<r>_mp_rank_00_model_states.pt per rank, and Lightning's
    client state (hyperparameters, loops, base_model ...) is in each. [] without a readable 'latest' file."""
    latest = Path(directory) / "latest"
    if not latest.is_file():
        return []
    return sorted((Path(directory) / latest.read_text().strip()).glob("*mp_rank_00_model_states.pt"))


def with_default_permissions(path: str | Path) -> Path:
    """Gives `path` the permissions a newly created file gets under the process's umask. safetensors writes its
    files readable by their owner only (0600), unlike the JSON and config files beside them, so on a shared
    filesystem colleagues could read an export's settings but not its weights."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return Path(path)


@contextlib.contextmanager
def staged_export(target: str | Path, last: tuple[str, ...] = ("config.json",)) -> Iterator[Path]:
    """A directory to write an export into; on success its files move into `target`, the files named in `last` after
    all others, so that `target/<last>` present means the latest export into `target` finished.

    `save_pretrained` writes `config.json` before the weights: an export interrupted in between used to leave a
    directory that looked finished to whatever tests for `config.json` (`make demo`'s reuse, `from_pretrained`) and
    failed to load. The `last` files already in `target` are removed before any file moves in, so an interrupted
    move leaves no `config.json` either. Other files in `target` stay. On an error the staging directory is deleted
    and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
        target.mkdir(exist_ok=True)
        for name in last:
            (target / name).unlink(missing_ok=True)
        files = sorted(path for path in staging.rglob("*") if path.is_file())
        for path in sorted(files, key=lambda path: path.relative_to(staging).as_posix() in last):
            destination = target / path.relative_to(staging)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_atomically(path: str | Path, data: str | bytes) -> None:
    """Writes `data` to `path` so that a reader (or a crash) sees the old file or the new one, never a half-written
    one: a staged file beside it, flushed to disk, then renamed over it. On an error the old file stays."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp")
    try:
        with open(staging, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def save_plugin_export(tensors: dict[str, Any], path: str | Path, record: dict[str, Any]) -> Path:
    """Writes plug-in weights to `path` (safetensors, `record["plugin"]` in its metadata) and `record` to
    `<path>.json`, so that the pair is either this export's or the weights come without a record: the old record
    goes first, then each file moves in whole from a staged copy. A record beside weights it does not describe
    would make the loader's base check compare against the wrong base; weights without one load unchecked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record_path = Path(str(path) + ".json")
    staged_weights, staged_record = Path(str(path) + ".tmp"), Path(str(record_path) + ".tmp")
    try:
        save_file(tensors, str(staged_weights), metadata={"plugin": str(record.get("plugin") or "unknown")})
        staged_record.write_text(json.dumps(record, indent=2, default=str))
        record_path.unlink(missing_ok=True)
        os.replace(with_default_permissions(staged_weights), path)
        os.replace(staged_record, record_path)
    finally:
        staged_weights.unlink(missing_ok=True)
        staged_record.unlink(missing_ok=True)
    return path


def weights_digest(directory: str | Path) -> str:
    """sha256 of a saved model's safetensors files (in name order): what the outputs made from a base record, so a
    retrained base is noticed and a copied or bit-identical one is not."""
    digest = hashlib.sha256()
    for weights in sorted(Path(directory).glob("*.safetensors")):
        with weights.open("rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
