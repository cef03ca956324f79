"""The runner's bookkeeping, without servers: run directories, resume checks, regimes, progress."""

import json
import sqlite3

import pytest

from core.config import ConfigError, LoadRegime, parse_config
from core.contracts import count_records
from specdrift.runner import RunError, RunState, expected_requests, open_run_dir, progress_line, regime_arms


def config(tmp_path, **extra):
    data = {"name": "t", "target": {"name": "tiny"},
            "arms": [{"name": "baseline"}, {"name": "ngram", "speculative": {"method": "ngram", "num_speculative_tokens": 3}}],
            **extra}
    return parse_config(data, tmp_path / "exp.yaml")


def test_sequential_sends_the_baseline_twice_load_does_not(tmp_path):
    c = config(tmp_path)
    assert regime_arms(c, LoadRegime(kind="sequential"), ["baseline", "ngram"]) == ["baseline", "ngram", "baseline"]
    assert regime_arms(c, LoadRegime(kind="concurrency", users=4), ["baseline", "ngram"]) == ["baseline", "ngram"]
    assert regime_arms(c, LoadRegime(kind="sequential"), ["ngram"]) == ["ngram"]  # baseline died
    # the repeat half-way round from the baseline, so that the rotation never runs the two back to back
    assert regime_arms(c, LoadRegime(kind="sequential"), ["baseline", "ngram", "generic", "finetuned"]) == \
        ["baseline", "ngram", "generic", "baseline", "finetuned"]


def test_expected_requests_is_bounded():
    assert expected_requests(LoadRegime(kind="sequential", max_requests=100), 12, 3) == 36
    assert expected_requests(LoadRegime(kind="sequential", max_requests=30), 12, 3) == 30
    assert expected_requests(LoadRegime(kind="poisson", rate=1, max_requests=50), 12, 2) == 50


def test_progress_line_has_counts_and_eta():
    assert progress_line("sequential", 10, 1, 40, 20.0) == \
        "regime sequential: 10/40 requests, 1 errors, 20s elapsed, ETA 1m00s"
    assert progress_line("sequential", 0, 0, 40, 1.0).endswith("ETA -")
    # Under load the time bound usually ends a regime before its request bound.
    assert progress_line("concurrency-4", 10, 0, 400, 20.0, max_seconds=160).endswith("ETA 2m20s")
    assert progress_line("concurrency-4", 0, 0, 400, 5.0, max_seconds=160).endswith("ETA 2m35s")
    assert progress_line("concurrency-4", 10, 0, 40, 20.0, max_seconds=600).endswith("ETA 1m00s")


def test_new_run_dir_then_resume_checks(tmp_path):
    c = config(tmp_path)
    run, state = open_run_dir(c, tmp_path / "r1", resume=False)
    assert state.run_id == "r1" and run.state.exists() and run.config.exists()
    with pytest.raises(RunError, match="already holds a run"):
        open_run_dir(c, tmp_path / "r1", resume=False)
    run2, state2 = open_run_dir(c, tmp_path / "r1", resume=True)
    assert state2.run_id == "r1"
    changed = config(tmp_path, temperature=0.5)
    with pytest.raises(RunError, match="config differs"):
        open_run_dir(changed, tmp_path / "r1", resume=True)
    with pytest.raises(RunError, match="not a specdrift run directory"):
        open_run_dir(c, tmp_path / "nothing", resume=True)


def test_state_round_trip(tmp_path):
    state = RunState(run_id="x", regimes={"sequential": {"status": "done"}}, dead_arms={"ngram": "exited"})
    state.save(tmp_path / "state.json")
    again = RunState.load(tmp_path / "state.json")
    assert (again.run_id, again.regimes, again.dead_arms) == ("x", state.regimes, state.dead_arms)
    assert json.loads((tmp_path / "state.json").read_text())["run_id"] == "x"


def test_count_records_per_regime(tmp_path):
    db = tmp_path / "records.sqlite"
    assert count_records(db, "r", "sequential") == (0, 0)
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE requests (run_id TEXT, regime TEXT, status TEXT)")
        conn.executemany("INSERT INTO requests VALUES (?, ?, ?)", [
            ("r", "sequential", "ok"), ("r", "sequential", "upstream_unavailable"), ("r", "poisson-1", "ok"),
            ("other", "sequential", "ok"), ("r", "sweep.concurrency-2", "ok"), ("r", "sweep.poisson-1", "ok")])
    assert count_records(db, "r", "sequential") == (2, 1)
    assert count_records(db, "r", "sweep") == (2, 0)


def test_only_local_draft_model_arms_have_a_draft_model_to_time(tmp_path):
    from specdrift.cost import draft_model_path
    from core.paths import drafter_dir

    c = parse_config({"name": "t", "target": {"name": "tiny"}, "cost": {"prompts": 0},
                      "drafters": [{"name": "generic", "init": "target", "tasks": "all"}], "arms": [
        {"name": "baseline"},
        {"name": "ngram", "speculative": {"method": "ngram", "num_speculative_tokens": 3}},
        {"name": "mine", "speculative": {"method": "draft_model", "drafter": "generic", "num_speculative_tokens": 2}},
        {"name": "external", "speculative": {"method": "draft_model", "model": "/models/d", "num_speculative_tokens": 2}},
        {"name": "remote", "upstreams": ["http://10.0.0.1:8000"],
         "speculative": {"method": "draft_model", "model": "/models/d", "num_speculative_tokens": 2}},
    ]}, tmp_path / "x.yaml")
    paths = {a.name: draft_model_path(c, a) for a in c.arms}
    assert paths == {"baseline": None, "ngram": None, "mine": str(drafter_dir(c, "generic")),
                     "external": "/models/d", "remote": None}
    assert c.cost.prompts == 0


def test_cost_settings_are_validated(tmp_path):
    from core.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="cost.max_tokens"):
        config(tmp_path, cost={"max_tokens": 1})


def test_environment_records_the_files_and_the_run_keeps_each_drafter_s_card(tmp_path):
    from core.contracts import RunFiles
    from core.paths import drafter_dir
    from specdrift.runner import write_environment

    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "config.json").write_text("{}")
    c = parse_config({"name": "t", "cache_dir": str(tmp_path / "cache"),
                      "target": {"name": "tiny", "source": "path", "path": str(tmp_path / "target")},
                      "drafters": [{"name": "generic"}], "arms": [{"name": "baseline"}]}, tmp_path / "x.yaml")
    ddir = drafter_dir(c, "generic")
    ddir.mkdir(parents=True)
    (ddir / "model.safetensors").write_bytes(b"w")
    (ddir / "drafter_card.json").write_text('{"name": "generic"}')
    run = RunFiles(tmp_path / "run")
    run.root.mkdir()
    write_environment(c, run, ["generic"])
    env = json.loads(run.environment.read_text())
    assert set(env["drafters"]["generic"]["files"]) == {"model.safetensors", "drafter_card.json"}
    assert set(env["target"]["files"]) == {"config.json"}
    assert json.loads(run.drafter_card("generic").read_text()) == {"name": "generic"}


def test_the_k_sweep_names_draft_model_arms_and_valid_lengths(tmp_path):
    from core.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="cost.k_sweep"):
        config(tmp_path, cost={"k_sweep": [0]})
    with pytest.raises((ConfigError, ValueError), match="cost.sweep_arms"):
        config(tmp_path, cost={"k_sweep": [1], "sweep_arms": ["baseline"]})


def test_the_sweep_line_through_two_points_is_exact():
    from specdrift.cost import fit_step_cost

    assert fit_step_cost([{"k": 1, "r": 1.4}, {"k": 3, "r": 1.8}]) == {"c": 0.2, "v": 1.2}
    assert fit_step_cost([{"k": 2, "r": 1.4}]) is None


def test_the_pre_registration_is_copied_before_anything_runs_and_a_missing_one_stops_the_run(tmp_path):
    drafters = [{"name": "g", "init": "target"}, {"name": "short", "init": "g", "tasks": ["a"]},
                {"name": "long", "init": "g", "tasks": ["b"]}]
    design = {"generic": "g", "crossover": {"short": "a", "long": "b"}, "preregistration": "plan.yaml"}
    c = config(tmp_path, drafters=drafters, design=design)
    with pytest.raises(RunError, match="design.preregistration: no such file"):
        open_run_dir(c, tmp_path / "r1", resume=False)
    assert not (tmp_path / "r1").exists(), "a refused run leaves no directory behind"
    (tmp_path / "plan.yaml").write_bytes(b"hypotheses: []\n")
    run, _ = open_run_dir(c, tmp_path / "r1", resume=False)
    assert run.preregistration.read_bytes() == b"hypotheses: []\n"


def test_a_crossover_needs_a_drafter_on_each_side(tmp_path):
    drafters = [{"name": "g", "init": "target"}, {"name": "short", "init": "g", "tasks": ["a"]}]
    with pytest.raises(ConfigError, match="design.crossover.long: no drafter continues from 'g' on tasks: \\[b\\]"):
        config(tmp_path, drafters=drafters, design={"generic": "g", "crossover": {"short": "a", "long": "b"}})
    with pytest.raises(ConfigError, match="design.generic: 'nope' is not in 'drafters'"):
        config(tmp_path, drafters=drafters, design={"generic": "nope"})


def test_draft_models_of_one_architecture_share_one_timed_c(tmp_path):
    from specdrift.cost import architecture_key, measure_costs

    def model_dir(name, **fields):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"num_hidden_layers": 2, **fields}))
        return str(tmp_path / name)

    spec = {"method": "draft_model", "num_speculative_tokens": 2}
    c = parse_config({"name": "t", "target": {"name": "tiny"}, "arms": [
        {"name": "baseline"},
        {"name": "generic", "speculative": {**spec, "model": model_dir("g", _name_or_path="/a")}},
        {"name": "tuned", "speculative": {**spec, "model": model_dir("t", _name_or_path="/b")}},
        {"name": "deeper", "speculative": {**spec, "model": model_dir("d", num_hidden_layers=3)}}]}, tmp_path / "x.yaml")
    key = architecture_key(str(tmp_path / "g"), {})
    assert key == architecture_key(str(tmp_path / "t"), {})
    assert key != architecture_key(str(tmp_path / "d"), {}) and key != architecture_key(str(tmp_path / "g"), {"a": 1})
    assert architecture_key("org/hub-model", {}) is None
    cost_path = tmp_path / "cost.json"
    timed = {"c": 0.31, "method": "timed", "draft_step_s": 0.01, "target_step_s": 0.03, "n": 8, "architecture": key}
    cost_path.write_text(json.dumps({"arms": {"generic": timed}, "k_sweep": {}}))
    said = []
    # No server is reachable at the base URL: the shared c must not need one.
    measured = measure_costs(c, ["baseline", "generic", "tuned"], "http://127.0.0.1:1", [{"messages": []}] * 4,
                             cost_path, tmp_path, progress=said.append)
    assert measured["tuned"] == {**timed, "shared_with": "generic", "method": "timed; measured on generic, the same "
                                                                              "architecture"}
    assert json.loads(cost_path.read_text())["arms"]["tuned"]["c"] == 0.31
    assert said == ["cost tuned: c = 0.31, generic's: its draft model has the same architecture"]
