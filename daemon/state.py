"""The daemon's local state file: where the generated admin key lives.

When ``CHATVAULT_ADMIN_KEY`` is unset, the first start generates an admin key and
writes it to ``<data_dir>/state.json`` with mode 0600, so that local CLI commands
(run as the same user) find it without being told, and nobody else can read it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from daemon.keys import new_key


@dataclass(frozen=True, slots=True)
class AdminKey:
    key: str
    source: str  # "environment" | "state_file" | "generated"


def read_state(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_new_state(path: Path, state: dict[str, object]) -> bool:
    """Create the file 0600 atomically; False when another process won the race."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(state, f)
        f.write("\n")
    return True


def ensure_admin_key(state_file: Path, env_name: str, environ: Mapping[str, str]) -> AdminKey:
    from_env = environ.get(env_name, "").strip()
    if from_env:
        return AdminKey(from_env, "environment")
    existing = read_state(state_file).get("admin_key")
    if isinstance(existing, str) and existing:
        return AdminKey(existing, "state_file")
    key = new_key()
    if _write_new_state(state_file, {"admin_key": key}):
        return AdminKey(key, "generated")
    existing = read_state(state_file).get("admin_key")
    if isinstance(existing, str) and existing:
        return AdminKey(existing, "state_file")
    raise OSError(f"{state_file}: exists but holds no admin key; remove it to regenerate")
