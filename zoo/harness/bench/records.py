"""Bench records: identities (method name, config hash, budget, key), ``results.jsonl`` I/O, environment.

A record is one JSON line per method x seed (or base / checkpoint); :func:`record_key` says when a rerun
may skip it. :func:`count_parameters` and :func:`data_block` describe what a record measured.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from zoo.errors import ZooError
from zoo.registry import REPO_ROOT


class BenchError(ZooError, ValueError):
    """A bench argument is unusable (missing config, bad checkpoint folder, ...)."""



def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)



def method_name(config: str | Path) -> str:
    """The registry entry whose config is this file, else the file stem."""
    from zoo import registry

    path = Path(config).resolve()
    for method in registry.methods():
        if method.config_path.resolve() == path:
            return method.name
    return path.stem



def digest(*parts: Any) -> str:
    """Short stable hash of text / JSON-able parts."""
    h = hashlib.sha256()
    for part in parts:
        h.update((part if isinstance(part, str) else json.dumps(part, sort_keys=True, default=str)).encode())
        h.update(b"\0")
    return h.hexdigest()[:12]



def config_hash(config: Path, args: argparse.Namespace, overrides: list[str]) -> str:
    extra = Path(args.data_config).read_text() if args.data_config else ""
    return digest(config.read_text(), extra, args.model or "", overrides)



def budget(args: argparse.Namespace, steps: int | str | None) -> dict[str, Any]:
    return {"max_steps": steps, "limit": args.limit, "max_new_tokens": args.max_new_tokens}



def record_key(record: dict[str, Any]) -> tuple[str, str, str, str]:
    """What makes a record unique: method, config hash, seed and budget."""
    return (record["method"], record["config_hash"], str(record.get("seed")),
            json.dumps(record.get("budget"), sort_keys=True))



def load_results(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records of ``results.jsonl``. A last line without its newline is a write that was cut off: it is
    skipped with a warning and, with ``repair``, moved to ``results.jsonl.partial`` so the next record starts
    on a line of its own."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        log(f"{path}: the last line ({len(data) - cut} bytes) was cut off by an interrupted write; skipped"
            + (f", moved to {path.name}.partial" if repair else ""))
        if repair:
            with path.with_name(path.name + ".partial").open("ab") as handle:
                handle.write(data[cut:] + b"\n")
            with path.open("r+b") as handle:
                handle.truncate(cut)
        data = data[:cut]
    records = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log(f"{path}:{number}: unreadable line skipped (an interrupted write?)")
    return records



def append_result(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one complete line: a single ``write`` of the whole line, flushed to disk, after a
    newline if the file ends in a cut-off line (never glued onto it)."""
    line = (json.dumps(record, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with path.open("rb") as handle:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    line = b"\n" + line
        written = 0
        while written < len(line):
            written += os.write(fd, line[written:])
        os.fsync(fd)
    finally:
        os.close(fd)



CODE_PACKAGES = ("zoo", "zoo.modules", "zoo.datamodules", "zoo.kernels")  # pyproject's package-dir keys


def foreign_code(root: Path = REPO_ROOT) -> dict[str, str]:
    """The zoo packages this process imports from outside ``root``, with their folders.

    ``zoo.modules``, ``zoo.datamodules`` and ``zoo.kernels`` are mapped by the editable install, so
    ``python -m zoo`` run in a second checkout with the first one's environment imports ``zoo`` from the
    second and the methods from the first."""
    import importlib

    foreign = {}
    for name in CODE_PACKAGES:
        folder = Path(importlib.import_module(name).__file__).resolve().parent
        if not folder.is_relative_to(root.resolve()):
            foreign[name] = str(folder)
    return foreign


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, Any]:
    """Package versions and the git commit (``+dirty`` when tracked files changed), read once per process:
    a bench imports its code when it starts, so a commit made while it runs must not relabel its records.
    ``+mixed`` when part of the code comes from another checkout (:func:`foreign_code`): the commit then
    does not describe what ran."""
    from importlib import metadata

    versions = {"python": sys.version.split()[0]}
    packages = ("finetune-zoo", "torch", "lightning", "transformers", "peft", "datasets", "reasoning-gym")
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit and dirty:
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    foreign = foreign_code()
    if foreign:
        where = ", ".join(f"{name} from {folder}" for name, folder in foreign.items())
        log(f"this process imports {where}, not from {REPO_ROOT}: the environment's editable install points "
            f"at another checkout, so records are marked '+mixed'; run from that checkout, or "
            f"`pip install -e .` here")
        commit = f"{commit or 'unknown'}+mixed"
    return {"versions": versions, "git_commit": commit}



def backbone_of(module) -> str:
    return str(getattr(module.hparams, "model", None) or module.hparams.get("model", "?"))



def data_block(cli) -> dict[str, Any]:
    """The parsed data block, without jsonargparse's bookkeeping (``__path__``: which file it came from),
    so the same data reached through different config files has one identity."""
    data = cli.config["data"]
    block = data.as_dict() if hasattr(data, "as_dict") else dict(data)
    return {key: value for key, value in block.items() if not (isinstance(key, str) and key.startswith("__"))}



def count_parameters(module) -> tuple[int, int]:
    """(trainable, total) parameters. Trainable: what the run trained (a reloaded export's own record), else
    the module's ``trainable_count()`` (the adapter's paper convention where it has one)."""
    manifest = getattr(module, "export_manifest", None) or {}
    trainable = manifest.get("trainable_params")
    if trainable is None:
        trainable = module.trainable_count() if hasattr(module, "trainable_count") else sum(
            p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters())


def format_metrics(record: dict[str, Any]) -> str:
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record["metrics"].items()]
    return ", ".join(parts)
