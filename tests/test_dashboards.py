"""Grafana dashboards (dashboards/*.json) and their provisioning
(deploy/grafana): valid, self-consistent, wired to the one provisioned
datasource, and querying the recording rules. tests/test_prometheus_e2e.py
runs every query against a real Prometheus; it uses the helpers here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DASHBOARD_FILES = sorted((REPO / "dashboards").glob("*.json"))
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
RULE_FILES = sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.yml"))
VARIABLE_USE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
LABEL_VALUES = re.compile(r"label_values\((?P<selector>.+),\s*(?P<label>\w+)\)")


# --- helpers (shared with the end-to-end test) ------------------------------------------

def load_dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in DASHBOARD_FILES}


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, including those inside collapsed rows."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found += panel.get("panels", [])
    return found


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title and refId, PromQL) for every query of every panel."""
    return [(f"{panel['title']} [{target['refId']}]", target["expr"])
            for panel in all_panels(dashboard) for target in panel.get("targets", [])]


def variables(dashboard: dict) -> list[dict]:
    return dashboard.get("templating", {}).get("list", [])


def variable_source(variable: dict) -> tuple[str, str]:
    """(series selector, label) of a `label_values(selector, label)` variable."""
    query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
    match = LABEL_VALUES.fullmatch(query.strip())
    assert match, f"variable {variable['name']}: not a label_values() query: {query}"
    return match["selector"].strip(), match["label"]


def grafana_regex_escape(value: str) -> str:
    """As Grafana escapes a value for a Prometheus regex matcher: the regex
    metacharacters get a backslash, itself escaped inside the PromQL string."""
    return re.sub(r"([\\^$*+?.()|\[\]{}])", r"\\\\\1", value)


def substitute(text: str, values: dict[str, list[str]]) -> str:
    """Variables as Grafana writes them into a Prometheus query: one value
    regex-escaped, several as (a|b)."""

    def replace(match: re.Match) -> str:
        name = next(g for g in match.groups() if g)
        chosen = [grafana_regex_escape(v) for v in values[name]]
        return chosen[0] if len(chosen) == 1 else "(" + "|".join(chosen) + ")"

    return VARIABLE_USE.sub(replace, text)


def recorded_names() -> set[str]:
    return {rule["record"] for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"] if "record" in rule}


def provisioned_datasource() -> dict:
    (datasource,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    return datasource


# --- tests --------------------------------------------------------------------------------

DASHBOARDS = load_dashboards()


def test_three_dashboards_with_unique_uids_and_titles():
    assert set(DASHBOARDS) == {"specdrift-overview.json", "specdrift-speculative-decoding.json",
                               "specdrift-task-drilldown.json"}
    for key in ("uid", "title"):
        values = [d[key] for d in DASHBOARDS.values()]
        assert len(set(values)) == len(values)
    for name, dashboard in DASHBOARDS.items():
        assert dashboard["uid"] == name.removesuffix(".json")
        assert isinstance(dashboard["schemaVersion"], int) and dashboard["panels"]


@pytest.mark.parametrize("name", DASHBOARD_FILES, ids=lambda p: p.name)
def test_panel_ids_are_unique_and_panels_do_not_overlap(name):
    panels = all_panels(DASHBOARDS[name.name])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


@pytest.mark.parametrize("name", DASHBOARD_FILES, ids=lambda p: p.name)
def test_every_datasource_reference_is_the_provisioned_one(name):
    datasource = provisioned_datasource()
    expected = {"type": datasource["type"], "uid": datasource["uid"]}
    dashboard = DASHBOARDS[name.name]
    references = [v["datasource"] for v in variables(dashboard)]
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        references.append(panel["datasource"])
        assert panel["targets"], f"{panel['title']} has no query"
        references += [t["datasource"] for t in panel["targets"]]
    assert references and all(ref == expected for ref in references)


@pytest.mark.parametrize("name", DASHBOARD_FILES, ids=lambda p: p.name)
def test_variables_are_defined_used_and_chained(name):
    dashboard = DASHBOARDS[name.name]
    defined = [v["name"] for v in variables(dashboard)]
    used = set()
    for _, expr in panel_queries(dashboard):
        used |= {next(g for g in m.groups() if g) for m in VARIABLE_USE.finditer(expr)}
    assert used == set(defined)
    for position, variable in enumerate(variables(dashboard)):
        selector, label = variable_source(variable)
        assert label == variable["name"]
        # A variable may only narrow by the variables before it.
        assert {next(g for g in m.groups() if g) for m in VARIABLE_USE.finditer(selector)} <= set(defined[:position])


def test_drilldown_has_run_arm_task_and_stratum_variables():
    dashboard = DASHBOARDS["specdrift-task-drilldown.json"]
    assert [v["name"] for v in variables(dashboard)] == ["run", "arm", "task", "stratum"]


@pytest.mark.parametrize("name", DASHBOARD_FILES, ids=lambda p: p.name)
def test_panels_query_the_recording_rules(name):
    recorded = recorded_names()
    for where, expr in panel_queries(DASHBOARDS[name.name]):
        metrics = set(re.findall(r"(?<![\w:])([a-zA-Z_][\w]*(?::[\w]+)+)(?=\s*[{\[)]|\s*$)", expr))
        plain = set(re.findall(r"(?<![\w:$])(specdrift_\w+|vllm:\w+|up)(?=\s*[{\[])", expr))
        assert metrics and metrics <= recorded, f"{where}: {expr}"
        assert not plain, f"{where} reads raw series {plain}"


def test_speculative_dashboard_covers_the_questions():
    exprs = " ".join(e for _, e in panel_queries(DASHBOARDS["specdrift-speculative-decoding.json"]))
    for needed in ("acceptance_rate:ratio", "mean_acceptance_length", "acceptance_rate_per_position",
                   "tpot_speedup", "draft_tokens:rate1m", "accepted_tokens:rate1m",
                   "run_arm_task_stratum:specdrift_tpot_speedup", "arm:vllm_spec_decode"):
        assert needed in exprs, needed


def test_provisioning_matches_the_compose_mounts():
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "specdrift.yml").read_text())["providers"]
    assert mounts["../dashboards"] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/specdrift-overview.json"
    assert provisioned_datasource()["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"] and "9090" in compose["services"]["prometheus"]["expose"]
