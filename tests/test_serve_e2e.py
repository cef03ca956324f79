"""`specdrift serve` as a user runs it: healthy arms and gateway announced one
line each, correct answers through the gateway, and nothing left behind when
it is killed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

pytestmark = pytest.mark.slow

ANNOUNCED = re.compile(r"^(baseline|ngram|gateway): (http://127\.0\.0\.1:\d+)$")


def test_serve_then_kill_leaves_nothing(cpu_config, target_dir, tmp_path, repo_root):
    config_path = tmp_path / "serve.yaml"
    data = cpu_config.model_dump(mode="json")
    data["cache_dir"] = str(cpu_config.cache_path)
    data["workload"]["data_dir"] = str(cpu_config.data_path)
    config_path.write_text(yaml.safe_dump(data))
    log_dir = tmp_path / "logs"
    serve = subprocess.Popen(
        [sys.executable, "-m", "specdrift.cli", "serve", "--config", str(config_path), "--arms", "baseline,ngram",
         "--log-dir", str(log_dir), "--records", str(tmp_path / "records.sqlite"), "--run-id", "serve-test"],
        cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    urls: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 600
        while "gateway" not in urls and time.monotonic() < deadline:
            line = serve.stdout.readline()
            assert line, "serve exited before announcing the gateway"
            if match := ANNOUNCED.match(line.strip()):
                urls[match[1]] = match[2]
        assert set(urls) == {"baseline", "ngram", "gateway"}
        models = httpx.get(urls["gateway"] + "/v1/models", timeout=10).json()
        assert {m["id"] for m in models["data"]} == {"baseline", "ngram"}
        for arm in ("baseline", "ngram"):
            answer = httpx.post(urls["gateway"] + "/v1/chat/completions", timeout=120, headers={
                "X-Specdrift-Run": "serve-test"}, json={
                "model": arm, "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}).json()
            assert "Paris" in answer["choices"][0]["message"]["content"]
        metrics = httpx.get(urls["gateway"] + "/metrics", timeout=10).text
        assert 'run="serve-test"' in metrics
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=120)
    time.sleep(1)
    leftovers = subprocess.run(["pgrep", "-f", str(log_dir.parent)], capture_output=True, text=True).stdout.split()
    vllm_ports = [u.rsplit(":", 1)[1] for a, u in urls.items() if a != "gateway"]
    for port in vllm_ports:
        found = subprocess.run(["pgrep", "-f", f"--port {port}"], capture_output=True, text=True).stdout.split()
        assert not found, f"vLLM on port {port} survived: {found}"
    assert not [p for p in leftovers if int(p) != os.getpid()]
