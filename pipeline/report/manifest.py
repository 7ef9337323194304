"""The output folder's manifest, results-manifest.json: {"complete": bool, "files": {name: sha256}, "written":
ISO UTC}, written last by each run. It says which files a run of ours wrote, as they were; readers check a
result file against it before believing it."""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
from pathlib import Path

from errors import UserError
from pipeline.files import write_atomically

log = logging.getLogger(__name__)

RESULTS_MANIFEST = "results-manifest.json"


def is_result_file_name(name: str) -> bool:
    """A name within the folder (no separator, not '.' or '..'), not hidden (those are the writer's own) and
    not the manifest's."""
    return bool(name) and Path(name).name == name and not name.startswith(".") and name != RESULTS_MANIFEST


def listed_files(output_dir: Path) -> dict[str, str | None]:
    """{file name: its sha256} of the files the folder's manifest lists (a previous run's), None for the files an
    interrupted run may have left; none without a manifest. Only plain names: an edited manifest cannot reach
    outside."""
    manifest = output_dir / RESULTS_MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
        listed = {name: checksum if isinstance(checksum, str) else None for name, checksum in files.items()
                  if isinstance(name, str) and is_result_file_name(name)}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or not a manifest's layout
        log.warning("%s is not a results manifest; the files it may list are left in place", manifest)
        return {}
    return listed


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(output_dir: Path, complete: bool, files: dict[str, str | None]) -> None:
    written = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    manifest = {"complete": complete, "files": files, "written": written}
    write_atomically(output_dir / RESULTS_MANIFEST, lambda path: path.write_text(json.dumps(manifest, indent=1) + "\n"))


def check_against_manifest(path: Path) -> None:
    """A UserError unless the result file `path` is as the run that wrote it recorded it: the folder's manifest,
    when it has one, must say the run completed and list the file with its current checksum (a file without a
    manifest beside it is read as it is)."""
    manifest = path.parent / RESULTS_MANIFEST
    if not manifest.exists():
        return
    try:
        record = json.loads(manifest.read_text())
        complete, files = record["complete"], record["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{manifest} is not a results manifest ({error}); rerun the run that wrote {path}") from None
    if complete is not True:
        raise UserError(f"{path.parent} holds an interrupted run's results ({manifest} says incomplete); rerun it")
    if files.get(path.name) != file_sha256(path):
        raise UserError(f"{path} is not the file its run wrote (its checksum differs from {manifest}: changed, "
                        f"truncated or copied from elsewhere); rerun the run, or remove the manifest to read it as "
                        f"it is")
