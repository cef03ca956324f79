"""Virtual environments for the benchmark clients that run against the
gateway (AIPerf, GuideLLM), each made from its own lock file,
requirements/<name>.lock, because their dependencies conflict with the CPU
lock (transformers, torch, pandas versions).

A venv lives in <cache>/client-venvs/<name>-<sha of the lock>, so it is
reused until the lock changes. It is built in a temporary folder and renamed
into place only once `pip install --no-deps -r LOCK` succeeded, so a failed or
interrupted install never leaves a half-made venv where it would be used.
pip's wheel cache is PIP_CACHE_DIR (the Makefile sets <cache>/pip).

A renamed venv's console scripts keep the temporary path in their `#!`
line, so run them through the venv's interpreter: `client_command` does."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCKS = REPO / "requirements"
INSTALLED_STAMP = ".specdrift-client-installed"


class ClientVenvError(RuntimeError):
    """A client's venv could not be made; the message has pip's last lines."""


def venv_path(name: str, cache: Path, locks: Path = LOCKS) -> Path:
    digest = hashlib.sha256((locks / f"{name}.lock").read_bytes()).hexdigest()[:16]
    return cache / "client-venvs" / f"{name}-{digest}"


def client_venv(name: str, cache: Path, progress: Callable[[str], None] = print, locks: Path = LOCKS) -> Path:
    """The ready venv for client `name`, from `locks`/<name>.lock (made now if that lock has no venv yet)."""
    lock = locks / f"{name}.lock"
    final = venv_path(name, cache, locks)
    if (final / INSTALLED_STAMP).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time per client (two test sessions may start together).
    with open(final.parent / f".{name}.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if (final / INSTALLED_STAMP).exists():
            return final
        started = time.monotonic()
        progress(f"client venv {name}: installing {lock.name} into {final} (once per lock)")
        building = Path(tempfile.mkdtemp(prefix=f".{name}-building-", dir=final.parent))
        try:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(building)], check=True,
                           capture_output=True, text=True)
            env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
            env.setdefault("PIP_CACHE_DIR", str(cache / "pip"))
            pip = subprocess.run([str(building / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps",
                                  "-r", str(lock)], env=env, capture_output=True, text=True)
            if pip.returncode != 0:
                raise ClientVenvError(f"client venv {name}: pip install failed ({pip.returncode}):\n"
                                      + "\n".join((pip.stdout + pip.stderr).splitlines()[-20:]))
            (building / INSTALLED_STAMP).write_text(lock.read_text())
            if final.exists():  # a leftover without the stamp (older layout, or removed by hand halfway)
                shutil.rmtree(final)
            building.rename(final)
        finally:
            shutil.rmtree(building, ignore_errors=True)
        progress(f"client venv {name}: ready after {time.monotonic() - started:.0f}s")
    return final


def client_command(venv: Path, script: str) -> list[str]:
    """The argv prefix that runs the venv's console script `script` (see the module docstring)."""
    return [str(venv / "bin" / "python"), str(venv / "bin" / script)]
