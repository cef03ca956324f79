"""Child processes that specdrift starts: vLLM arms, the gateway, Prometheus,
Locust. Each runs in its own process group, logs to its own file, and is
stopped by PID (the whole group), also on Ctrl-C or an error."""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """A child that did not come up; the message says why, with its log tail."""


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.rstrip().splitlines()[-lines:])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def ephemeral_ports_from() -> int:
    """The lowest port the kernel hands to client sockets (Linux; 32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1", start: int | None = None, taken: set[int] | None = None) -> int:
    """The first free port from `start` upwards, or, if start is None, a random free port below the
    kernel's ephemeral range with 200 free-to-use ports above it: a client socket's local port comes
    from that range and could take a chosen port (or the next ones, for arms started from it) between
    this check and the server's bind, as it did once for a test's second arm."""
    taken = taken or set()
    if start is None:
        below = ephemeral_ports_from() - 200
        for _ in range(100):
            port = random.randrange(10000, max(below, 10001))
            if port not in taken and not port_in_use(host, port):
                return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return sock.getsockname()[1]
    for port in range(start, min(start + 200, 65536)):
        if port not in taken and not port_in_use(host, port):
            return port
    raise StartupError(f"no free port on {host} in {start}..{start + 199}")


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the whole group, then SIGKILL what is left after `grace_s`."""
        if self.proc.poll() is not None:
            _kill_group(self.proc.pid, signal.SIGKILL)  # stray grandchildren
            return
        _kill_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) ignored SIGTERM for %.0fs; killing", self.name, self.pid, grace_s)
        _kill_group(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("%s (pid %d) did not die after SIGKILL", self.name, self.pid)


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def start_child(name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
                cwd: Path | None = None, header: str = "") -> Child:
    """Start `cmd` in a new session (its own process group), output to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "a", buffering=1)
    if header:
        log_file.write(header.rstrip() + "\n")
    log_file.write(f"# command: {' '.join(cmd)}\n")
    log_file.flush()
    proc = subprocess.Popen(
        cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=env, cwd=cwd, start_new_session=True,
    )
    log_file.close()  # the child holds its own descriptor
    log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(cmd))
    return Child(name=name, proc=proc, log_path=log_path)


def wait_healthy(child: Child, url: str, timeout_s: float, interval_s: float = 0.5) -> float:
    """Poll `url` until it answers 200; fail fast if the child dies. Returns seconds waited."""
    started = time.monotonic()
    deadline = started + timeout_s
    with httpx.Client(timeout=httpx.Timeout(2.0)) as client:
        while True:
            if not child.alive():
                raise StartupError(
                    f"{child.name} exited with code {child.proc.returncode} during start-up; "
                    f"last lines of {child.log_path}:\n{log_tail(child.log_path)}"
                )
            try:
                if client.get(url).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise StartupError(
                    f"{child.name} not healthy at {url} after {timeout_s:.0f}s; "
                    f"last lines of {child.log_path}:\n{log_tail(child.log_path)}"
                )
            time.sleep(interval_s)


@dataclass
class ProcessStack:
    """Children started together and stopped together, newest first.

    Use as a context manager; SIGTERM and SIGINT to this process stop every
    child before it exits."""

    children: list[Child] = field(default_factory=list)

    def add(self, child: Child) -> Child:
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        while self.children:
            self.children.pop().stop()

    def __enter__(self) -> "ProcessStack":
        self._unwinds = sigterm_unwinds()
        self._unwinds.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()
        self._unwinds.__exit__(None, None, None)


def _raise_keyboard_interrupt(signum, frame):  # SIGTERM unwinds like Ctrl-C
    raise KeyboardInterrupt


@contextmanager
def sigterm_unwinds():
    """Inside, SIGTERM unwinds like Ctrl-C, so every `finally` that stops a child runs (a child started
    outside a ProcessStack, like the drafters' vLLM run, would otherwise outlive a killed command)."""
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
