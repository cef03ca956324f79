"""The experiment config: valid files load, broken ones fail with one line naming file and field."""

from pathlib import Path

import pytest
import yaml

from analysis.hypotheses import read_preregistration
from core.config import ConfigError, load_config
from specdrift.cli import main

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def minimal(**overrides) -> dict:
    data = {"name": "t", "target": {"name": "tiny"}, "arms": [{"name": "baseline"}]}
    data.update(overrides)
    return data


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "experiments").glob("*.yaml") if not p.name.endswith(".prereg.yaml")) + [REPO / "deploy" / "experiment.compose.yaml"])
def test_shipped_configs_load(path):
    from drafters.recipe import recipe_for

    config = load_config(path)
    assert config.baseline_arm in [a.name for a in config.arms]
    for drafter in config.drafters:
        recipe_for(drafter)  # the recipe mapping is validated by the drafters package


def test_relative_paths_resolve_against_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("SPECDRIFT_DATA_DIR", raising=False)  # set for a clone with no ../shared beside it
    config = load_config(write(tmp_path, minimal(cache_dir="cache", workload={"data_dir": "../data"})))
    assert config.cache_path == (tmp_path / "cache").resolve()
    assert config.data_path == (tmp_path.parent / "data").resolve()


def test_data_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDRIFT_DATA_DIR", str(tmp_path / "elsewhere"))
    assert load_config(write(tmp_path, minimal())).data_path == tmp_path / "elsewhere"


@pytest.mark.parametrize("data, field, words", [
    (minimal(arms=[{"name": "baseline", "speculative": {"method": "ngram", "num_speculative_tokens": 0}}]),
     "arms.0.speculative.num_speculative_tokens", "greater than or equal to 1"),
    (minimal(arms=[{"name": "Bad Name"}]), "arms.0.name", "pattern"),
    (minimal(arms=[{"name": "baseline", "upstreams": ["ftp://x"]}]), "arms.0.upstreams", "not an http(s) URL"),
    (minimal(arms=[{"name": "baseline", "colour": "red"}]), "arms.0.colour", "Extra inputs"),
    (minimal(ports={"gateway": 70000}), "ports.gateway", "less than or equal"),
    (minimal(baseline_arm="nope"), "(top level)", "baseline_arm 'nope' is not one of the arms"),
    (minimal(arms=[{"name": "baseline"}, {"name": "d", "speculative": {"method": "draft_model", "drafter": "g",
                                                                        "num_speculative_tokens": 3}}]),
     "(top level)", "drafter 'g', which is not in 'drafters'"),
    (minimal(arms=[{"name": "baseline"}, {"name": "d", "speculative": {"method": "draft_model",
                                                                        "num_speculative_tokens": 3}}]),
     "arms.1.speculative", "needs 'drafter'"),
    (minimal(regimes=[{"kind": "poisson"}]), "regimes.0", "needs 'rate'"),
    ({"name": "t", "arms": []}, "target", "Field required"),
])
def test_errors_name_file_and_field(tmp_path, data, field, words):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {field}:"), message
    assert words in message


def test_yaml_syntax_error_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"exp.yaml: line 3: not valid YAML"):
        load_config(write(tmp_path, "name: t\narms: [\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")


def test_cli_prints_one_line_error(tmp_path, capsys):
    path = write(tmp_path, minimal(ports={"gateway": "http"}))
    assert main(["prepare", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "ports.gateway" in err and str(path) in err


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")))
def test_every_shipped_design_names_a_readable_preregistration(path):
    """A config's design.preregistration exists beside it and parses as one (analysis/hypotheses.py)."""
    if path.name.endswith(".prereg.yaml"):
        return
    config = load_config(path)
    if config.design.preregistration:
        plan = read_preregistration(config.resolve_path(config.design.preregistration).read_bytes())
        assert {h["id"] for h in plan["hypotheses"]} >= {"H1", "H2"}
