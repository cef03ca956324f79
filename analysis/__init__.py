"""The analysis: a finished run directory in, the answer out.

`specdrift report RUN_DIR` (or `analysis.report.write_report(run_dir)`) reads
the run directory and writes `results.json`, `report.md`, `report.html` and
`figures/*.png` into it. It depends on nothing but the files below, so a run
can be re-analysed, anywhere, without re-running it; the same inputs give a
byte-identical `results.json` (seeded bootstrap, sorted keys, no timestamps).

Input contract (the runner, specdrift/runner.py, writes these)
------------------------------------------------------------
`records.sqlite`, table `requests`, one row per request (service/records.py
owns it). Columns read here:

    request_id, run_id, arm, task, stratum, prompt_id, regime, status,
    http_status, error, finish_reason, t_start, t_first_token, t_end (unix s),
    ttft_s, e2e_s, tpot_s, prompt_tokens, completion_tokens, max_tokens,
    temperature, spec_drafts (vLLM num_spec_steps), spec_draft_tokens,
    spec_accepted_tokens, spec_accepted_per_pos (JSON list, index 0 = first
    draft position), output_hash, output_hash_kind ('token_ids' | 'text')

  Only rows with status 'ok' enter the statistics; the others are counted per
  arm, regime and status. A missing column reads as null. The baseline arm is
  sent every sequential-regime eval prompt twice (two rows with the same
  prompt_id): that repeat is the noise floor for losslessness and for speed-up.
  A prompt's task and stratum are its records' own `task` and `stratum` (the
  tags its requests were sent with), never overwritten from the workload.

`workload.jsonl`: one row per prompt with `id` (= records.prompt_id), `task`,
  `stratum`, `prompt_tokens`, `split` ('train' | 'eval') and, on the rows of a
  length-matched control, `control: {"task": A, "like": B}` (task A resampled
  to task B's prompt lengths; their `task` is "A-like-B"). The analysis takes
  from it only what the records lack: which prompts are controls (analysed as
  their own task, never pooled into "all") and each prompt's length
  (the records' `prompt_tokens` where it has none). Optional: without it,
  prompt lengths come from the records and no row is known to be a control.

`workload.build.json` (optional): `lengths = {task: {"prompt_tokens": [...],
  "ref_tokens": [...]}}` of every prompt the workload kept (both splits): the
  datasets' own length distributions, beside the measured eval set's. Without
  it, the workload's train rows (a seeded random half) stand in.

`workload.replay.jsonl`, `replay/targets.jsonl`, `replay/matches.jsonl`,
  `replay/replay.json` (optional; docs/formats.md has every field): the
  acceptance replay's prompts, the target's extended greedy outputs, each
  drafter's teacher-forced match vectors. analysis/replayed.py replays vLLM's
  chain rule over them (analysis/chain.py) for the report's primary outcome,
  and validates it against the sequential regime's records. Without them the
  report says there was no replay.

`state.json` (optional): `dead_arms = {arm: reason}`, arms the runner gave up on.

`config.resolved.yaml`: the ExperimentConfig (core/config.py). Read:
  `arms[].name`, `arms[].speculative.{method, num_speculative_tokens,
  drafter}`, `baseline_arm`, `drafters[].{name, init, tasks}`, `regimes`
  (their `.label`s are the records' `regime` values, in load order),
  `target.dtype`, `temperature`, `design` (generic drafter, crossover, K).

`environment.json`: shown in the report as it is (scalars, two levels deep).

`drafters/<name>/drafter_card.json`: `name`, `init`, `tasks`, and
  `training_data.lengths = {"prompt": [...], "output": [...],
  "by_task": {task: {"prompt": [...], "output": [...]}}}`: the raw token
  lengths of the drafter's training split, prompt[i] and output[i] from the
  same example (so their sum is the total length); `recipe` (its `seed`
  and budget: drafters whose recipes differ only in `seed` are seeds of one
  family in the design).

`preregistration.yaml` (optional; copied by the runner from the config's
  `design.preregistration` before anything is measured): `hypotheses`, each
  with `id`, `statement`, `effect` (`crossover` or `matrix.in_domain`),
  `direction` and `smallest_effect`; its SHA-256 goes into results.json's
  `design.preregistration` (analysis/hypotheses.py).

`cost.json` (optional): the measured draft/target step-cost ratio per arm,

    {"arms": {"<arm>": {"c": 0.18, "method": "how it was measured, one line",
                        "draft_step_s": 0.0046, "target_step_s": 0.026,
                        "n": 50}}}

  `c` and `method` are required per arm; the other fields are shown when
  present. For a speculative arm missing from it, c is estimated from the
  records as c = (tau / S_tpot - 1) / gamma (S_tpot: the sequential-regime
  geometric-mean TPOT speed-up); the report says which method each arm used,
  and that the estimate makes the predicted-vs-measured comparison circular.

How to read the outputs: docs/report.md.
"""
