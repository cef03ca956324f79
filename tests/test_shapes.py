"""Load shapes: the Scheduler's rotation, bounds, concurrency cap, blocks and
arrival times, on a clock the test moves by hand (no Locust, no servers)."""

from collections import Counter

import pytest
from scipy import stats

from loadgen.shapes import (Scheduler, ShapeError, Step, format_step, locust_shape_options, parse_step,
                            parse_sweep, rotation_step, steps_for)
from core.config import LoadRegime


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def rows(n):
    return [{"id": f"t:{i}", "task": "t", "stratum": "p0-64", "messages": [{"role": "user", "content": str(i)}],
             "max_tokens": 8, "split": "eval"} for i in range(n)]


def drain(scheduler, clock, step_s=0.01):
    """Run closed-loop jobs one at a time to the end; the jobs in order."""
    jobs = []
    while scheduler.demand() is not None:
        job = scheduler.next_job()
        if job is None:
            clock.now += step_s
            continue
        jobs.append(job)
        clock.now += step_s
        scheduler.finished(job["seq"])
    return jobs


def test_sequential_rotates_arms_per_prompt_and_ends_after_one_pass():
    clock = Clock()
    s = Scheduler(rows(4), ["a", "b", "c"], [Step("sequential")], clock=clock)
    jobs = drain(s, clock)
    order = [(j["row"]["id"], j["arm"]) for j in jobs]
    assert order == [("t:0", "a"), ("t:0", "b"), ("t:0", "c"),
                     ("t:1", "b"), ("t:1", "c"), ("t:1", "a"),
                     ("t:2", "c"), ("t:2", "a"), ("t:2", "b"),
                     ("t:3", "a"), ("t:3", "b"), ("t:3", "c")]
    assert {j["regime"] for j in jobs} == {"sequential"}
    assert not any(j["open_loop"] for j in jobs)


def test_sequential_keeps_one_request_in_flight():
    s = Scheduler(rows(3), ["a", "b"], [Step("sequential")], clock=Clock())
    first = s.next_job()
    assert first is not None and s.next_job() is None
    s.finished(first["seq"])
    assert s.next_job() is not None


def test_a_repeated_arm_is_a_slot_of_its_own():
    clock = Clock()
    s = Scheduler(rows(2), ["base", "spec", "base"], [Step("sequential")], clock=clock)
    arms = [j["arm"] for j in drain(s, clock)]
    assert arms == ["base", "spec", "base", "spec", "base", "base"]


def test_with_the_baseline_twice_no_arm_is_sent_two_requests_in_a_row():
    # the sequential regime's slots for four live arms (specdrift/runner.py regime_arms)
    slots = ["base", "a", "b", "base", "c"]
    clock = Clock()
    s = Scheduler(rows(10), slots, [Step("sequential")], clock=clock)
    jobs = drain(s, clock)
    arms = [j["arm"] for j in jobs]
    assert len(arms) == 50
    assert all(x != y for x, y in zip(arms, arms[1:]))
    for i in range(10):  # every prompt to every slot
        assert sorted(arms[5 * i:5 * i + 5]) == sorted(slots)
        assert {j["row"]["id"] for j in jobs[5 * i:5 * i + 5]} == {f"t:{i}"}
    for position in range(5):  # over a cycle of five prompts each arm takes each position as often as its slots
        assert Counter(arms[5 * i + position] for i in range(5)) == Counter(slots)


def test_rotation_step_is_one_where_plain_rotation_never_repeats_an_arm():
    assert rotation_step(["a", "b", "c"]) == 1
    assert rotation_step(["base", "a", "b", "base", "c", "d"]) == 1
    assert rotation_step(["base", "a", "b", "base", "c"]) == 3  # by one, the baseline would follow itself across prompts
    assert rotation_step(["only"]) == 1


def test_request_bound_stops_the_run():
    clock = Clock()
    s = Scheduler(rows(50), ["a", "b"], [Step("sequential")], max_requests=7, clock=clock)
    assert len(drain(s, clock)) == 7


def test_time_bound_stops_issuing_and_drains_in_flight():
    clock = Clock()
    s = Scheduler(rows(50), ["a"], [Step("concurrency", users=2)], run_seconds=10, drain_seconds=5, clock=clock)
    first, second = s.next_job(), s.next_job()
    clock.now += 10.5  # past the time bound
    assert s.next_job() is None
    assert s.demand() == 2  # still draining
    s.finished(first["seq"])
    s.finished(second["seq"])
    assert s.demand() is None and s.abandoned == 0


def test_hard_stop_after_drain_seconds_counts_abandoned_requests():
    clock = Clock()
    s = Scheduler(rows(5), ["a"], [Step("sequential")], run_seconds=10, drain_seconds=5, clock=clock)
    s.next_job()
    clock.now += 15.1
    assert s.demand() is None
    assert s.abandoned == 1


def test_concurrency_caps_requests_in_flight_and_blocks_alternate_arms():
    clock = Clock()
    s = Scheduler(rows(100), ["a", "b"], [Step("concurrency", users=3)], block_seconds=10, max_requests=100,
                  clock=clock)
    assert s.demand() == 3
    held = [s.next_job() for _ in range(3)]
    assert all(held) and s.next_job() is None
    assert {j["arm"] for j in held} == {"a"}
    clock.now += 10  # the second block belongs to b
    s.finished(held[0]["seq"])
    assert s.next_job()["arm"] == "b"
    clock.now += 10
    s.finished(held[1]["seq"])
    assert s.next_job()["arm"] == "a"


def test_blocks_cycle_the_prompts_until_a_bound():
    clock = Clock()
    s = Scheduler(rows(3), ["a"], [Step("concurrency", users=1)], max_requests=7, clock=clock)
    ids = [j["row"]["id"] for j in drain(s, clock)]
    assert ids == ["t:0", "t:1", "t:2", "t:0", "t:1", "t:2", "t:0"]


def test_poisson_arrival_times_are_exponential_at_the_rate_and_seeded():
    def arrivals(seed):
        clock = Clock()
        s = Scheduler(rows(10), ["a"], [Step("poisson", rate=5.0)], max_requests=2000, run_seconds=10_000,
                      seed=seed, clock=clock)
        times = []
        while len(times) < 2000:
            job = s.next_job()
            assert job["open_loop"]
            times.append(clock.now + job["delay_s"])
            clock.now = times[-1]  # the generator waits until the arrival, then asks again
            s.finished(job["seq"])  # completions do not gate arrivals; finishing at once keeps it simple
        return times

    times = arrivals(0)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert stats.kstest(gaps, "expon", args=(0, 1 / 5.0)).pvalue > 0.01
    assert abs(len(gaps) / (times[-1] - times[0]) - 5.0) < 0.5
    assert arrivals(0) == times and arrivals(1) != times


def test_poisson_does_not_wait_for_completions():
    clock = Clock()
    s = Scheduler(rows(10), ["a"], [Step("poisson", rate=100.0)], max_requests=50, clock=clock)
    jobs = [s.next_job() for _ in range(50)]  # none finished, all handed out
    assert all(jobs) and s.next_job() is None


def test_sweep_runs_steps_in_order_with_their_labels_and_bounds():
    clock = Clock()
    steps = parse_sweep("sequential:4r,concurrency:2:5r")
    s = Scheduler(rows(10), ["a", "b"], steps, regime_label="sweep", clock=clock)
    jobs = drain(s, clock)
    assert Counter(j["regime"] for j in jobs) == {"sweep.sequential": 4, "sweep.concurrency-2": 5}


def test_skip_done_leaves_out_recorded_pairs():
    clock = Clock()
    done = Counter({("sequential", "t:0", "a"): 1, ("sequential", "t:1", "a"): 1, ("other", "t:2", "a"): 1})
    s = Scheduler(rows(3), ["a", "b"], [Step("sequential")], done=done, clock=clock)
    pairs = [(j["row"]["id"], j["arm"]) for j in drain(s, clock)]
    assert pairs == [("t:0", "b"), ("t:1", "b"), ("t:2", "a"), ("t:2", "b")]


def test_regime_label_overrides_the_step_label():
    s = Scheduler(rows(2), ["a"], [Step("concurrency", users=4)], regime_label="load-4", clock=Clock())
    assert s.next_job()["regime"] == "load-4"


@pytest.mark.parametrize("text, step", [
    ("sequential", Step("sequential")),
    ("concurrency:4:60s", Step("concurrency", users=4, max_seconds=60)),
    ("poisson:2.5:120s:200r", Step("poisson", rate=2.5, max_seconds=120, max_requests=200)),
    ("sequential:30r", Step("sequential", max_requests=30)),
])
def test_step_syntax_round_trips(text, step):
    assert parse_step(text) == step
    assert format_step(step) == text


@pytest.mark.parametrize("text", ["burst", "concurrency", "concurrency:2.5", "poisson", "poisson:0",
                                  "sequential:3", "concurrency:2:60"])
def test_bad_steps_are_refused(text):
    with pytest.raises(ShapeError):
        parse_step(text)


def test_shape_options_for_each_regime_kind():
    assert locust_shape_options(LoadRegime(kind="sequential")) == ["--shape", "sequential"]
    assert locust_shape_options(LoadRegime(kind="concurrency", users=4)) == ["--shape", "concurrency",
                                                                             "--concurrency", "4"]
    assert locust_shape_options(LoadRegime(kind="poisson", rate=1.5)) == ["--shape", "poisson", "--rate", "1.5"]
    sweep = LoadRegime(kind="sweep", steps=[LoadRegime(kind="concurrency", users=2, max_seconds=60, max_requests=50),
                                            LoadRegime(kind="poisson", rate=0.5, max_seconds=90, max_requests=40)])
    options = locust_shape_options(sweep)
    assert options == ["--shape", "sweep", "--sweep", "concurrency:2:60s:50r,poisson:0.5:90s:40r"]
    assert [s.label for s in steps_for("sweep", sweep=options[-1])] == ["concurrency-2", "poisson-0.5"]
    assert [s.label for s in steps_for("sweep", sweep=options[-1])] == [r.label for r in sweep.steps]


def test_blocks_give_every_arm_the_same_prompts_in_the_same_order():
    clock = Clock()
    s = Scheduler(rows(5), ["a", "b"], [Step("concurrency", users=1)], block_seconds=10, max_requests=12,
                  clock=clock)
    sent = {"a": [], "b": []}
    for _ in range(12):
        job = s.next_job()
        sent[job["arm"]].append(job["row"]["id"])
        s.finished(job["seq"])
        clock.now += 10 / 3 + 0.01  # three requests per block
    assert sent["a"] == ["t:0", "t:1", "t:2", "t:3", "t:4", "t:0"]
    assert sent["b"] == sent["a"]


def test_blocks_resume_each_arm_past_what_it_already_sent():
    clock = Clock()
    done = Counter({("concurrency-1", "t:0", "a"): 1, ("concurrency-1", "t:1", "a"): 1,
                    ("concurrency-1", "t:0", "b"): 1, ("other", "t:0", "b"): 5})
    s = Scheduler(rows(5), ["a", "b"], [Step("concurrency", users=1)], block_seconds=10, max_requests=2,
                  regime_label="concurrency-1", done=done, clock=clock)
    first = s.next_job()
    s.finished(first["seq"])
    clock.now += 10
    second = s.next_job()
    assert (first["arm"], first["row"]["id"]) == ("a", "t:2")
    assert (second["arm"], second["row"]["id"]) == ("b", "t:1")
