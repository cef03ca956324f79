"""tests/client_venvs.py without the registries: a failed install leaves
nothing behind, and a made venv is reused until its lock changes."""

from __future__ import annotations

import pytest

from client_venvs import INSTALLED_STAMP, ClientVenvError, client_venv, venv_path


def test_a_failed_install_leaves_no_venv(tmp_path):
    locks = tmp_path / "locks"
    locks.mkdir()
    # A local wheel that is not there: pip fails at once, without asking an index.
    (locks / "broken.lock").write_text(f"{tmp_path}/missing-1.0-py3-none-any.whl\n")
    with pytest.raises(ClientVenvError, match="pip install failed"):
        client_venv("broken", tmp_path / "cache", progress=lambda message: None, locks=locks)
    left = [p.name for p in (tmp_path / "cache" / "client-venvs").iterdir() if not p.name.endswith(".lock")]
    assert left == []


def test_an_empty_lock_makes_a_venv_that_is_reused_until_the_lock_changes(tmp_path):
    locks = tmp_path / "locks"
    locks.mkdir()
    (locks / "empty.lock").write_text("# nothing to install\n")
    said = []
    first = client_venv("empty", tmp_path / "cache", progress=said.append, locks=locks)
    assert (first / INSTALLED_STAMP).exists() and (first / "bin" / "python").exists()
    assert first == venv_path("empty", tmp_path / "cache", locks) and len(said) == 2
    assert client_venv("empty", tmp_path / "cache", progress=said.append, locks=locks) == first
    assert len(said) == 2  # reused: nothing installed
    (locks / "empty.lock").write_text("# nothing to install, again\n")
    second = client_venv("empty", tmp_path / "cache", progress=said.append, locks=locks)
    assert second != first and (second / INSTALLED_STAMP).exists()
