"""The files of a checkpoint directory: atomic, fsynced writes, and the manifest that vouches for them.

`manifest.json` is written last and names every file of the checkpoint with its byte count and sha256.
`read_manifest` is the only reader: it accepts a manifest only when its format, its step (against the
directory's name) and its file list (against the files a checkpoint has) agree with what is on disk and every
file's bytes hash to what it says. Anything else is a corrupt checkpoint, one `CheckpointError` line naming it.
"""

import hashlib
import json
import os
import re
from pathlib import Path

FORMAT = 1
MANIFEST = "manifest.json"
FILES = ("model.safetensors", "optimizer.safetensors", "state.json")  # what every checkpoint holds
STEP_DIR = re.compile(r"^step_(\d{8,})$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted or malformed (the message names the file)."""


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def hash_file(path: Path) -> dict:
    """The manifest entry of one file: its byte count and sha256, read in 4 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def write_file(path: Path, data: bytes) -> dict:
    """Write, flush and fsync one file; returns its manifest entry."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dirs(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint directory, newest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def read_manifest(path: Path) -> dict:
    """The manifest of checkpoint `path`, once it is well formed, agrees with the directory, and every file it
    lists has its byte count and sha256. Raises `CheckpointError` (one line) otherwise; reads nothing else."""

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {MANIFEST} {problem}")

    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is missing") from None
    except (OSError, ValueError) as err:
        raise bad(f"is unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(manifest, dict):
        raise bad(f"is a JSON {type(manifest).__name__}, expected an object")
    if manifest.get("format") != FORMAT:
        raise bad(f"has format {_short(manifest.get('format'))}, expected {FORMAT}")
    step = manifest.get("step")
    if type(step) is not int or step < 0:
        raise bad(f"step must be an int >= 0, got {_short(step)}")
    named = STEP_DIR.match(path.name)
    if named and int(named.group(1)) != step:
        raise bad(f"says step {step}, but the directory is {path.name}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise bad(f"files must be an object {{name: {{bytes, sha256}}}}, got {type(files).__name__}")
    if sorted(files) != sorted(FILES):
        raise bad(f"lists {sorted(files)}, expected exactly {sorted(FILES)}")
    for name, entry in files.items():
        size, digest = (entry.get("bytes"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
        if type(size) is not int or size < 0 or not isinstance(digest, str) or not _SHA256.match(digest):
            raise bad(f"entry of {name} must be {{'bytes': int >= 0, 'sha256': 64 hex digits}}, got {_short(entry)}")
    for name, entry in files.items():  # the manifest is well formed: now the disk must agree with it
        size, digest = entry["bytes"], entry["sha256"]
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if (on_disk := file.stat().st_size) != size:
            raise CheckpointError(f"checkpoint {path}: {name} has {on_disk} bytes, {MANIFEST} says {size}")
        if hash_file(file)["sha256"] != digest:
            raise CheckpointError(f"checkpoint {path}: {name} fails its sha256 check (corrupted)")
    return manifest
