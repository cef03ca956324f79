# The specdrift image for the compose stack and Kubernetes: the gateway, the
# workload builder and Locust. No serving engine: the arms run vLLM's own
# images, so neither vLLM nor torch is installed here.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /app

# The project's base dependencies, at the versions pinned in the CPU lock. The
# lock's vLLM and torch pins are constraints only: nothing here asks for them.
COPY pyproject.toml README.md ./
COPY requirements/cpu.lock requirements/cpu.lock
COPY core core
COPY workload workload
COPY specdrift specdrift
COPY service service
COPY loadgen loadgen
COPY drafters drafters
COPY analysis analysis
COPY experiments experiments
RUN pip install --constraint requirements/cpu.lock . \
    && python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('vllm', 'torch')))"

# Records live on a volume mounted at /records; the directory exists, owned by
# the unprivileged user, so that a fresh named volume inherits the owner.
RUN useradd --system --create-home --uid 10001 specdrift \
    && mkdir -p /records /workload \
    && chown specdrift:specdrift /records /workload
USER specdrift

CMD ["specdrift", "--help"]
