"""Launching arms: command lines, environment, and plain failures (no vLLM needed)."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from core.arms import engine_flags, launch_arm, start_arms, vllm_command, vllm_env
from core.config import parse_config
from core.paths import drafter_dir
from core.processes import ProcessStack, StartupError, free_port, start_child, wait_healthy


def config_for(tmp_path, **arms_extra):
    data = {
        "name": "t", "cache_dir": str(tmp_path / "cache"),
        "target": {"name": "tiny", "source": "path", "path": str(tmp_path / "model")},
        "arms": [
            {"name": "baseline", "engine_args": {"enforce-eager": True, "max-num-seqs": 8}},
            {"name": "ngram", "speculative": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}},
            {"name": "generic", "optional": True,
             "speculative": {"method": "draft_model", "drafter": "generic", "num_speculative_tokens": 2}},
            {"name": "remote", "upstreams": ["http://10.0.0.1:8000/"]},
        ],
        "drafters": [{"name": "generic"}],
        "vllm_cpu": {"kvcache_space_gib": 2, "reserved_cpus": 0},
    }
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text("{}")
    return parse_config(data, tmp_path / "exp.yaml")


def flag_value(cmd, flag):
    return cmd[cmd.index(flag) + 1]


def test_command_line_baseline(tmp_path):
    config = config_for(tmp_path)
    cmd = vllm_command(config, config.arm("baseline"), 8123)
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert flag_value(cmd, "--host") == "127.0.0.1"
    assert flag_value(cmd, "--port") == "8123"
    assert flag_value(cmd, "--served-model-name") == "baseline"
    assert "--enforce-eager" in cmd and flag_value(cmd, "--max-num-seqs") == "8"
    assert "--speculative-config" not in cmd


def test_command_line_resolves_drafter_and_passes_extra_keys(tmp_path):
    config = config_for(tmp_path)
    cmd = vllm_command(config, config.arm("generic"), 8124)
    spec = json.loads(flag_value(cmd, "--speculative-config"))
    assert spec == {"method": "draft_model", "model": str(drafter_dir(config, "generic")), "num_speculative_tokens": 2}
    ngram = json.loads(flag_value(vllm_command(config, config.arm("ngram"), 1), "--speculative-config"))
    assert ngram["prompt_lookup_max"] == 4
    assert flag_value(vllm_command(config, config.arm("ngram"), 1), "--per-request-spec-decode-metrics") == "summary"


def test_engine_flags():
    assert engine_flags({"enforce-eager": True, "x": False, "n": 3, "j": {"a": 1}}) == ["--enforce-eager", "--n", "3", "--j", '{"a": 1}']


def test_environment_is_deliberate(tmp_path):
    env = vllm_env(config_for(tmp_path))
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env["HF_HUB_OFFLINE"] == "1"


def test_missing_optional_drafter_is_skipped_remote_passes_through(tmp_path, monkeypatch):
    config = config_for(tmp_path)
    launched = []
    monkeypatch.setattr("core.arms.launch_arm", lambda c, arm, port, *a, **k: launched.append(arm.name) or
                        type("R", (), {"url": f"http://127.0.0.1:{port}"})())
    upstreams = start_arms(config, ["generic", "remote", "baseline"], tmp_path, ProcessStack())
    assert launched == ["baseline"]
    assert upstreams["remote"] == ["http://10.0.0.1:8000"]
    assert "generic" not in upstreams


def test_missing_model_directory_is_plain(tmp_path):
    config = config_for(tmp_path)
    (tmp_path / "model" / "config.json").unlink()
    with pytest.raises(StartupError, match="target model directory .* is missing"):
        launch_arm(config, config.arm("baseline"), free_port(), tmp_path, ProcessStack())


def test_port_in_use_is_plain(tmp_path):
    config = config_for(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StartupError, match=f"port {port} on 127.0.0.1 is already in use"):
            launch_arm(config, config.arm("baseline"), port, tmp_path, ProcessStack())


def test_engine_dying_at_startup_shows_log_tail(tmp_path):
    child = start_child("arm x", [sys.executable, "-c", "import sys; print('engine exploded'); sys.exit(3)"],
                        tmp_path / "x.log")
    with pytest.raises(StartupError) as err:
        wait_healthy(child, f"http://127.0.0.1:{free_port()}/health", timeout_s=30)
    assert "exited with code 3" in str(err.value) and "engine exploded" in str(err.value)


def test_stack_stops_whole_process_group(tmp_path):
    # The child spawns a grandchild; stopping the child must end both.
    script = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); print(p.pid, flush=True); time.sleep(600)"
    stack = ProcessStack()
    child = stack.add(start_child("sleeper", [sys.executable, "-c", script], tmp_path / "s.log"))
    import time
    for _ in range(100):
        lines = [l for l in (tmp_path / "s.log").read_text().splitlines() if l.strip().isdigit()]
        if lines:
            break
        time.sleep(0.05)
    grandchild = int(lines[0])
    stack.stop_all()
    assert child.proc.poll() is not None
    import os
    for _ in range(100):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("grandchild survived")


def test_a_command_killed_outside_any_stack_still_stops_the_child_it_started(tmp_path):
    # As `specdrift run` generating drafter responses (a child under try/finally, no ProcessStack):
    # before sigterm_unwinds, SIGTERM ended the command at once and its vLLM run kept the CPUs.
    script = ("import sys, time; from pathlib import Path; from core.processes import sigterm_unwinds, start_child\n"
              "with sigterm_unwinds():\n"
              "    child = start_child('sleeper', [sys.executable, '-c', 'import time; time.sleep(600)'], "
              f"Path({str(tmp_path / 'child.log')!r}))\n"
              "    print(child.pid, flush=True)\n"
              "    try:\n        time.sleep(600)\n    finally:\n        child.stop()\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
    child_pid = int(parent.stdout.readline())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) != 0  # the interrupt unwinds to an error exit, after the finally
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)


def test_any_free_port_lies_below_the_ephemeral_range_with_room_for_arms_above_it():
    from core.processes import ephemeral_ports_from, port_in_use

    ports = [free_port() for _ in range(20)]
    assert all(10000 <= p < ephemeral_ports_from() - 200 for p in ports), ports
    assert not any(port_in_use("127.0.0.1", p) for p in ports)
