"""The compose stack (deploy/docker-compose*.yml), checked offline: there is
no Docker engine here or in CI.

Each stack the README documents (GPU, CPU, with replicas) is interpolated from
deploy/.env.example as Compose would, merged as Compose merges override files,
and validated by the `compose-spec` package (a strict, typed parser of the
Compose specification). That package neither interpolates, merges, nor checks
references between services, so those parts are done and checked here. The
arms' and the gateway's command lines are then parsed by vLLM's and
specdrift's own argument parsers."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from compose_spec import PyCompose

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "docker-compose.yml"
CPU = DEPLOY / "docker-compose.cpu.yml"
REPLICAS = DEPLOY / "docker-compose.replicas.yml"
STACKS = {
    "gpu": [BASE],
    "gpu+ngram": [BASE],
    "cpu": [BASE, CPU],
    "gpu+replicas": [BASE, REPLICAS],
}
ARMS = ("baseline", "generic", "finetuned", "ngram")
PUBLISHING = {"gateway", "grafana", "locust-master"}
GATEWAYS = {"gpu+replicas": {"gateway", "gateway-r2"}}  # else only `gateway`
# Left empty in .env.example on purpose: the user must choose them.
SECRETS = {"GF_ADMIN_PASSWORD": "a-test-password", "GATEWAY_TOKEN": "a-test-token",
           "POSTGRES_PASSWORD": "a-test-db-password"}


# --- a small model of Compose: .env, interpolation, override tags, merging ---------

def read_env_file(path: Path, expand: bool = True) -> dict[str, str]:
    """KEY=VALUE lines; values may use ${VAR} of the shell or of earlier lines."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            env[key.strip()] = interpolate_text(value.strip(), {**os.environ, **env}) if expand else value.strip()
    return env


class InterpolationError(ValueError):
    pass


VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


def interpolate_text(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`,
    `${VAR?error}`, `${VAR:+alt}`, `$VAR` and `$$`."""

    def replace(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return env.get(match["named"], "")
        parts = BRACED.fullmatch(match["braced"])
        if parts is None:
            raise InterpolationError(f"bad substitution {match[0]!r}")
        name, op, arg = parts["name"], parts["op"], parts["arg"]
        value = env.get(name)
        unset_or_empty = not value
        if op is None:
            return value or ""
        if op == ":-":
            return arg if unset_or_empty else value
        if op == "-":
            return arg if value is None else value
        if op == ":?" and unset_or_empty or op == "?" and value is None:
            raise InterpolationError(f"{name}: {arg}")
        if op in (":?", "?"):
            return value
        if op == ":+":
            return "" if unset_or_empty else arg
        return "" if value is None else arg  # "+"

    return VARIABLE.sub(replace, text)


class Reset:
    """`!reset`: drop the key from what is being overridden."""


class Override:
    """`!override VALUE`: replace instead of merge."""

    def __init__(self, value):
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())
ComposeLoader.add_constructor(
    "!override", lambda loader, node: Override(
        loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode)
        else loader.construct_sequence(node, deep=True) if isinstance(node, yaml.SequenceNode)
        else loader.construct_scalar(node)))


def interpolate(value, env):
    if isinstance(value, str):
        return interpolate_text(value, env)
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, Override):
        return Override(interpolate(value.value, env))
    return value


def plain(value):
    """Without override tags (for keys that had nothing to override)."""
    if isinstance(value, Override):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if not isinstance(v, Reset)}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def merge(base, override):
    """Compose's merge for the attributes these files override: mappings merge
    key by key; any other value (command, image, ...) replaces."""
    if isinstance(override, Override):
        return plain(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                merged.pop(key, None)
            else:
                merged[key] = merge(base[key], value) if key in base else plain(value)
        return merged
    return plain(override)


def load_file(path: Path, env: dict[str, str]) -> dict:
    data = interpolate(yaml.load(path.read_text(), Loader=ComposeLoader), env)
    return {k: v for k, v in data.items() if not k.startswith("x-")}


def resolve_extends(service: dict, folder: Path, env: dict[str, str]) -> dict:
    extends = service.get("extends")
    if not extends:
        return service
    source = load_file(folder / extends["file"], env)["services"][extends["service"]]
    # Compose never copies depends_on through `extends`.
    source = {k: v for k, v in resolve_extends(source, folder, env).items() if k != "depends_on"}
    local = {k: v for k, v in service.items() if k != "extends"}
    return merge(source, local)


def compose_model(files: list[Path], env: dict[str, str]) -> dict:
    """The merged, interpolated project, as `docker compose config` sees it."""
    project: dict = {}
    for path in files:
        data = load_file(path, env)
        data["services"] = {name: resolve_extends(svc, path.parent, env) for name, svc in data["services"].items()}
        project = merge(project, data)
    return plain(project)


def active_services(project: dict, profiles: set[str]) -> dict:
    return {name: svc for name, svc in project["services"].items()
            if not svc.get("profiles") or profiles & set(svc["profiles"])}


# --- fixtures -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return {**read_env_file(DEPLOY / ".env.example"), **SECRETS}


def stack(name: str, env: dict[str, str]) -> tuple[dict, dict]:
    project = compose_model(STACKS[name], env)
    profiles = {"ngram"} if name == "gpu+ngram" else set()
    return project, active_services(project, profiles)


def arm_services(services: dict) -> dict:
    return {name: svc for name, svc in services.items() if arm_of(name) in ARMS}


def arm_of(service_name: str) -> str:
    return re.sub(r"-r[0-9]+$", "", service_name)


def flag(command: list[str], name: str) -> str | None:
    for arg in command:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


# --- the Compose specification --------------------------------------------------------

@pytest.mark.parametrize("name", STACKS)
def test_stack_is_valid_compose(name, example_env):
    project, _ = stack(name, example_env)
    parsed = PyCompose.from_json(json.dumps(project))
    parsed.validate()
    assert set(parsed.service_names()) == set(project["services"])


def test_the_validator_rejects_what_compose_rejects():
    with pytest.raises(ValueError, match="bogus"):
        PyCompose.from_yaml("services:\n  a:\n    image: x\n    bogus: 1\n")
    with pytest.raises(ValueError, match="condition"):
        PyCompose.from_yaml("services:\n  a:\n    image: x\n    depends_on:\n      b: {condition: healthy}\n"
                            "  b:\n    image: y\n")


@pytest.mark.parametrize("name", STACKS)
def test_references_between_services_resolve(name, example_env):
    project, services = stack(name, example_env)
    declared_volumes = set(project.get("volumes") or {})
    for service_name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            if dependency not in services:
                assert condition.get("required") is False, f"{service_name} needs {dependency}, not in stack {name}"
                assert dependency in project["services"], f"{service_name} depends on unknown {dependency}"
                continue
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"
        if service.get("image", "").startswith("specdrift:"):
            assert service["build"] == {"context": "..", "dockerfile": "Dockerfile"}, f"{service_name} would pull"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") or source.startswith("../") and "/shared/" not in source:
                assert (DEPLOY / source).exists(), f"{service_name}: {source} is not in the repository"
            elif not source.startswith(("/", "~", "..")):
                assert source in declared_volumes, f"{service_name}: volume {source} not declared"


def test_every_variable_is_documented_in_env_example():
    documented = set(read_env_file(DEPLOY / ".env.example", expand=False))
    used = set()
    for path in (BASE, CPU, REPLICAS):
        for match in VARIABLE.finditer(path.read_text()):
            if match["braced"]:
                used.add(BRACED.fullmatch(match["braced"])["name"])
            elif match["named"]:
                used.add(match["named"])
    assert used - documented == set(), "variables missing from deploy/.env.example"
    assert documented - used == set(), "variables in deploy/.env.example that no compose file reads"


def assert_required_without_default(example_env: dict, variable: str,
                                     files: tuple[Path, ...] = (BASE,)) -> None:
    """The example leaves `variable` empty, and the stack refuses to start without it."""
    assert read_env_file(DEPLOY / ".env.example")[variable] == ""
    env = {k: v for k, v in example_env.items() if k != variable}
    with pytest.raises(InterpolationError, match=variable):
        compose_model(list(files), env)


def test_grafana_password_has_no_default(example_env):
    assert_required_without_default(example_env, "GF_ADMIN_PASSWORD")
    _, services = stack("gpu", example_env)
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GF_ADMIN_PASSWORD"]


def test_gateway_token_has_no_default_and_guards_gateway_metrics_and_locust(example_env):
    from core.config import load_config

    assert_required_without_default(example_env, "GATEWAY_TOKEN")
    project, services = stack("gpu", example_env)
    token_env = load_config(DEPLOY / "experiment.compose.yaml").gateway.auth_token_env
    for name in ("gateway", "locust-master", "locust-worker"):
        assert services[name]["environment"][token_env] == SECRETS["GATEWAY_TOKEN"]
    master = services["locust-master"]["command"]
    assert flag(master, "auth-token-env") == token_env
    assert "/deploy/locust_auth.py" in flag(master, "locustfile").split(",")
    assert project["secrets"]["gateway_token"] == {"environment": "GATEWAY_TOKEN"}
    assert services["prometheus"]["secrets"] == ["gateway_token"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    gateway_job = next(job for job in scrape if job["job_name"] == "specdrift-gateway")
    assert gateway_job["authorization"]["credentials_file"] == "/run/secrets/gateway_token"


@pytest.mark.parametrize("name", STACKS)
def test_only_gateway_grafana_and_locust_publish_ports_on_loopback(name, example_env):
    _, services = stack(name, example_env)
    publishing = {n for n, s in services.items() if s.get("ports")}
    assert publishing == PUBLISHING | GATEWAYS.get(name, set())
    for service_name in publishing:
        for port in services[service_name]["ports"]:
            assert port.startswith("127.0.0.1:"), f"{service_name} publishes {port} beyond loopback by default"


# --- the arms ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", STACKS)
def test_arms_serve_their_name_with_their_speculation(name, example_env):
    _, services = stack(name, example_env)
    arms = arm_services(services)
    expected = {"baseline", "generic", "finetuned"} | ({"ngram"} if name == "gpu+ngram" else set())
    assert {arm_of(n) for n in arms} == expected
    for service_name, service in arms.items():
        command = service["command"]
        arm = arm_of(service_name)
        assert service["entrypoint"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
        assert flag(command, "served-model-name") == arm
        assert flag(command, "port") == "8000" and flag(command, "host") == "0.0.0.0"
        assert "python3" in service["healthcheck"]["test"]
        spec = flag(command, "speculative-config")
        if arm == "baseline":
            assert spec is None and flag(command, "per-request-spec-decode-metrics") is None
            continue
        spec = json.loads(spec)
        assert spec["num_speculative_tokens"] == int(example_env["NUM_SPECULATIVE_TOKENS"])
        assert flag(command, "per-request-spec-decode-metrics") == "summary"
        if arm == "ngram":
            assert spec["method"] == "ngram"
        else:
            assert spec == {"method": "draft_model", "model": example_env[f"{arm.upper()}_DRAFTER"],
                            "num_speculative_tokens": int(example_env["NUM_SPECULATIVE_TOKENS"])}


@pytest.mark.parametrize("name", STACKS)
def test_gpu_stacks_reserve_a_gpu_per_arm_and_cpu_stacks_none(name, example_env):
    _, services = stack(name, example_env)
    for service_name, service in arm_services(services).items():
        if name.startswith("cpu"):
            assert "deploy" not in service or not service["deploy"], service_name
            assert service["image"].startswith("public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:")
            assert service["environment"]["VLLM_CPU_KVCACHE_SPACE"] == example_env["VLLM_CPU_KVCACHE_SPACE"]
            continue
        assert service["image"] == example_env["VLLM_IMAGE"]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        variable = service_name.upper().replace("-", "_") + "_GPU"
        assert device["device_ids"] == [example_env[variable]]
        memory = flag(service["command"], "gpu-memory-utilization")
        assert memory == example_env[f"{arm_of(service_name).upper()}_GPU_MEMORY"]


def test_gpu_memory_shares_on_one_gpu_fit(example_env):
    shares = [float(example_env[f"{arm.upper()}_GPU_MEMORY"]) for arm in ARMS]
    assert sum(shares) < 1.0, "the .env.example defaults put every arm on GPU 0; their shares must fit"


def test_every_arm_in_every_stack_is_scraped_by_prometheus(example_env):
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (arms_job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "vllm-arms"]
    names = {n for sd in arms_job["dns_sd_configs"] for n in sd["names"]}
    (relabel,) = arms_job["relabel_configs"]
    for name in STACKS:
        project, _ = stack(name, example_env)
        for service_name in arm_services(project["services"]):
            assert service_name in names
            assert re.sub(f"^(?:{relabel['regex']})$", relabel["replacement"].replace("$1", r"\1"),
                          service_name) == arm_of(service_name)


def test_replicas_stack_sends_every_arm_to_all_its_replicas(example_env):
    from specdrift.commands import parse_upstreams

    _, services = stack("gpu+replicas", example_env)
    command = services["gateway"]["command"]
    upstreams = parse_upstreams([a.split("=", 1)[1] for a in command if a.startswith("--upstream=")])
    replicas = {}
    for service_name in arm_services(services):
        replicas.setdefault(arm_of(service_name), []).append(f"http://{service_name}:8000")
    for arm, urls in replicas.items():
        assert sorted(upstreams[arm]) == sorted(urls)


def test_replica_gateways_share_one_postgres_store_without_a_default_password(example_env):
    assert_required_without_default(example_env, "POSTGRES_PASSWORD", (BASE, REPLICAS))
    project, services = stack("gpu+replicas", example_env)
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert postgres["environment"]["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    (data_volume,) = postgres["volumes"]
    assert data_volume.split(":") == [data_volume.split(":")[0], "/var/lib/postgresql/data"]
    assert data_volume.split(":")[0] in project["volumes"]
    gateways = {name: services[name] for name in GATEWAYS["gpu+replicas"]}
    stores, replicas = set(), set()
    for name, gateway in gateways.items():
        url = urlsplit(flag(gateway["command"], "records"))
        assert url.scheme == "postgresql" and url.password is None, f"{name}: the password belongs in PGPASSWORD"
        assert (url.hostname, url.port, url.username) == ("postgres", 5432, postgres["environment"]["POSTGRES_USER"])
        assert url.path == "/" + postgres["environment"]["POSTGRES_DB"]
        assert gateway["environment"]["PGPASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
        assert gateway["depends_on"]["postgres"] == {"condition": "service_healthy"}
        stores.add(url.geturl())
        replicas.add(gateway["environment"]["SPECDRIFT_REPLICA"])
        assert gateway["command"] == gateways["gateway"]["command"], "both replicas serve the same arms"
    assert len(stores) == 1 and len(replicas) == len(gateways)
    # Published on different host ports, both loopback by default.
    host_ports = [port.rsplit(":", 2)[1] for g in gateways.values() for port in g["ports"]]
    assert len(set(host_ports)) == len(host_ports)


def test_replica_gateway_commands_build_settings_that_record_to_postgres(example_env):
    from core.config import load_config
    from service.settings import settings_from_config
    from specdrift.cli import build_parser
    from specdrift.commands import gateway_command, parse_upstreams, with_records
    from workload.builder import tag_vocabulary

    _, services = stack("gpu+replicas", example_env)
    for name in GATEWAYS["gpu+replicas"]:
        args = build_parser().parse_args(specdrift_args(services[name]))
        assert args.handler is gateway_command
        config = load_config(Path(args.config.replace("/deploy/", f"{DEPLOY}/")))
        config, sqlite_path = with_records(config, args.records)
        settings = settings_from_config(config, parse_upstreams(args.upstream), vocabulary=tag_vocabulary(config),
                                        run_ids=args.run_ids, records_path=sqlite_path)
        assert sqlite_path is None and settings.records_url == flag(services[name]["command"], "records")


def test_every_gateway_in_every_stack_is_scraped_by_prometheus(example_env):
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (gateway_job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "specdrift-gateway"]
    names = {n for sd in gateway_job["dns_sd_configs"] for n in sd["names"]}
    for name in STACKS:
        _, services = stack(name, example_env)
        assert GATEWAYS.get(name, {"gateway"}) <= names
        assert {n for n in services if n.startswith("gateway")} == GATEWAYS.get(name, {"gateway"})


# --- the arms' command lines, as vLLM parses them -----------------------------------------

def test_arm_command_lines_build_a_vllm_engine_config(example_env, target_dir):
    """vLLM's own parser and config checks accept every arm's command line
    (the target stands in for both drafters: same tokenizer, real files)."""
    env = {**example_env, "TARGET_MODEL": str(target_dir), "GENERIC_DRAFTER": str(target_dir),
           "FINETUNED_DRAFTER": str(target_dir), "MAX_MODEL_LEN": "2048"}
    project = compose_model([BASE], env)
    commands = {name: svc["command"] for name, svc in arm_services(project["services"]).items()}
    script = (
        "import json, sys\n"
        "from vllm.engine.arg_utils import AsyncEngineArgs\n"
        "from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "for name, argv in json.loads(sys.argv[1]).items():\n"
        "    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)\n"
        "    validate_parsed_serve_args(args)\n"
        "    config = AsyncEngineArgs.from_cli_args(args).create_engine_config()\n"
        "    spec = config.speculative_config\n"
        "    print(name, config.model_config.served_model_name, spec.method if spec else None,\n"
        "          spec.num_speculative_tokens if spec else None, flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], capture_output=True, text=True,
                            timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                              "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    seen = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.split()
            and line.split()[0] in commands}
    k = example_env["NUM_SPECULATIVE_TOKENS"]
    assert seen == {"baseline": ["baseline", "None", "None"], "generic": ["generic", "draft_model", k],
                    "finetuned": ["finetuned", "draft_model", k], "ngram": ["ngram", "ngram", k]}


# --- the gateway, the workload builder and Locust ------------------------------------------

def test_experiment_config_is_the_stack_seen_from_the_gateway(example_env):
    from core.config import load_config

    config = load_config(DEPLOY / "experiment.compose.yaml")
    _, services = stack("gpu+ngram", example_env)
    assert {a.name for a in config.arms} == set(arm_services(services))
    for arm in config.arms:
        assert not arm.local and arm.upstreams == [f"http://{arm.name}:8000"]
    assert config.baseline_arm == "baseline"
    assert config.gateway.host == "0.0.0.0" and config.ports.gateway == 8100
    assert str(config.target.max_model_len) == example_env["MAX_MODEL_LEN"]


def specdrift_args(service: dict) -> list[str]:
    command = service["command"]
    assert command[0] == "specdrift"
    return command[1:]


def test_gateway_command_builds_gateway_settings(example_env, tmp_path, monkeypatch):
    from service.settings import settings_from_config
    from specdrift.commands import gateway_command, parse_upstreams
    from workload.builder import tag_vocabulary
    from specdrift.cli import build_parser
    from core.config import load_config

    _, services = stack("gpu", example_env)
    args = build_parser().parse_args(specdrift_args(services["gateway"]))
    assert args.handler is gateway_command
    assert args.run_ids == [example_env["RUN_ID"]]
    config_path = Path(args.config.replace("/deploy/", f"{DEPLOY}/"))
    config = load_config(config_path)
    upstreams = parse_upstreams(args.upstream) if args.upstream else {a.name: a.upstreams for a in config.arms}
    settings = settings_from_config(config, upstreams, vocabulary=tag_vocabulary(config), run_ids=args.run_ids)
    assert settings.host == "0.0.0.0" and settings.port == 8100
    assert str(settings.records_path).startswith("/records/")
    assert "/records" in [v.split(":")[1] for v in services["gateway"]["volumes"]]
    healthcheck = " ".join(services["gateway"]["healthcheck"]["test"])
    assert f"localhost:{settings.port}/health" in healthcheck


def test_workload_and_locust_commands_parse(example_env):
    from specdrift.cli import build_parser
    from specdrift.commands import workload_build_command

    _, services = stack("gpu", example_env)
    args = build_parser().parse_args(specdrift_args(services["workload"]))
    assert args.handler is workload_build_command
    master = services["locust-master"]["command"]
    workload_out = args.out
    assert flag(master, "workload") == workload_out
    assert flag(master, "arms").split(",") == example_env["ARMS"].split(",")
    assert flag(master, "run-id") == example_env["RUN_ID"]
    worker = services["locust-worker"]["command"]
    assert "--worker" in worker and flag(worker, "master-host") == "locust-master"
    assert "container_name" not in services["locust-worker"], "workers must be scalable"
    # Locust itself, with the real locustfile's options, accepts both command lines.
    for argv in (master, worker):
        argv = [a.replace("/app/", f"{REPO}/").replace("/deploy/", f"{DEPLOY}/") for a in argv[1:]]
        script = ("import sys\n"
                  "from locust.argument_parser import get_locustfiles_locally, get_parser, parse_locustfile_option\n"
                  "from locust.util.load_locustfile import load_locustfile\n"
                  "args = sys.argv[1:]\n"
                  "for path in get_locustfiles_locally(parse_locustfile_option(args)):\n"
                  "    load_locustfile(path)\n"
                  "get_parser().parse_args(args)\n")
        result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120,
                                cwd=REPO)
        assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stderr[-2000:]}"


def test_locustfile_path_in_the_image_is_the_repository_one(example_env):
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and "COPY loadgen loadgen" in dockerfile
    _, services = stack("gpu", example_env)
    for name in ("locust-master", "locust-worker"):
        path = flag(services[name]["command"], "locustfile").split(",")[0]
        assert (REPO / path.removeprefix("/app/")).is_file()
