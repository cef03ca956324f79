"""What an EAGLE-3 head costs on this machine, by its draft vocabulary: the two
parts of its build (the target's feature pass, a training step) and its served
step cost r, for heads of one shape that draft over the target's full
vocabulary and over trimmed ones (recipe `vocab_size`).

- Feature pass: the target in float32 over the config's head's real train
  prompts (chat template), tokens/s of the full pass against the pass that
  stops at the deepest aux layer (drafters/eagle3.py `target_features`, what
  the build runs); per batch, the two alternating; medians.
- Training step: `eagle3.train_step` (the unrolled draft steps, backward,
  the optimiser) on the same batches for every vocabulary; median seconds per
  step and the ratio against the full vocabulary.
- Served step cost: each head saved as vLLM loads it and served at K =
  ttt_steps beside the baseline, timed as the cost step's K sweep does
  (specdrift/cost.py `time_speculative_pair`: forced output tokens, the two
  servers alternating): r = TPOT_head / TPOT_base x tokens per decode step,
  median over prompts. r is the time of a speculative step in plain steps.

The heads are freshly initialised: a step's time depends on the shapes, not on
the weights (a trained head accepts more, and r counts that through tokens per
step). For the same reason the training batches pair each real prompt with
random output tokens of its reference length (capped at max_tokens) and random
top-k targets. The trimmed vocabularies are the most frequent tokens of those
prompts (the build takes the responses'), which changes nothing in the time.

Usage (hold the shared lock; it serves the baseline and one head at a time):

    flock /tmp/specdrift-heavy.lock .venv/bin/python benchmarks/head_cost.py \\
        --config experiments/cpu-eagle3.yaml [--drafter head-generic] [--vocab-sizes full,16384,8192] \\
        [--dtype float32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.arms import HOST, launch_arm  # noqa: E402
from core.config import ArmConfig, SpeculativeConfig, load_config  # noqa: E402
from core.paths import target_model_arg  # noqa: E402
from core.processes import ProcessStack, StartupError, free_port  # noqa: E402
from drafters.data import drafter_tasks, select_prompts  # noqa: E402
from drafters.eagle3 import (collate, default_aux_layers, example_features, head_example, head_from_target,  # noqa: E402
                             save_head, target_features, train_step)
from drafters.recipe import recipe_for  # noqa: E402
from drafters.train import batches  # noqa: E402
from drafters.vocab import VocabMap, choose_vocabulary  # noqa: E402
from specdrift.cost import time_speculative_pair  # noqa: E402
from workload.builder import build_workload  # noqa: E402

FULL = "full"


def synthetic_response(prompt_ids: list[int], output_tokens: int, vocab: int, top_k: int, rng: random.Random) -> dict:
    """A response-cache row for `prompt_ids` with random output and top-k (timing only)."""
    logprobs = sorted((rng.uniform(-8.0, -0.05) for _ in range(top_k)), reverse=True)
    return {"prompt_ids": prompt_ids, "output_ids": [rng.randrange(vocab) for _ in range(output_tokens)],
            "topk_ids": [rng.sample(range(vocab), top_k) for _ in range(output_tokens)],
            "topk_logprobs": [logprobs] * output_tokens}


def time_features(target, batched: list, layers: list[int], pad_id: int) -> dict:
    """Tokens/s of the full target pass and of the early-stopping one, alternating per batch."""
    full_s, early_s, tokens = [], [], []
    with torch.no_grad():
        for i, batch in enumerate(batched):
            ids, mask = collate(batch, pad_id, torch.device("cpu"))[:2]
            timed = {}
            for which in (("full", "early") if i % 2 == 0 else ("early", "full")):
                started = time.perf_counter()
                if which == "full":
                    target.model(input_ids=ids, attention_mask=mask)
                else:
                    target_features(target, ids, mask, layers, logits=False)
                timed[which] = time.perf_counter() - started
            full_s.append(timed["full"])
            early_s.append(timed["early"])
            tokens.append(int(mask.sum()))
    per_token = lambda seconds: statistics.median(s / n for s, n in zip(seconds, tokens))  # noqa: E731
    return {"batches": len(batched), "tokens": sum(tokens),
            "full_tokens_per_s": 1 / per_token(full_s), "early_tokens_per_s": 1 / per_token(early_s),
            "early_over_full_time": statistics.median(e / f for e, f in zip(early_s, full_s))}


def time_training(target, examples: list[tuple[str, dict]], target_ids: list[int] | None, recipe,
                  layers: list[int], pad_id: int, features: dict[int, torch.Tensor], steps: int, warmup: int) -> dict:
    """Median seconds of a training step of a fresh head with this vocabulary (after `warmup` steps), on
    the first batches of the build's batching; `features`: example index -> its target features."""
    torch.manual_seed(0)
    vocab = VocabMap(target.config.vocab_size, target_ids, unk_id=0)
    mine = [(i, head_example(task, response, vocab, recipe.max_seq_len)) for i, (task, response) in enumerate(examples)]
    index_of = {id(e): i for i, e in mine if e is not None}
    plan = batches([e for _, e in mine if e is not None], recipe.batch_tokens, random.Random(0))[:warmup + steps]
    cache = {id(e): features[index_of[id(e)]] for batch in plan for e in batch}
    head = head_from_target(target, target_ids, layers, recipe.norm_before_residual).train()
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=recipe.learning_rate)
    seconds = []
    for step, batch in enumerate(plan):
        started = time.perf_counter()
        train_step(head, target, batch, optimizer, recipe.hard_weight, recipe.ttt_steps, recipe.step_decay, pad_id,
                   torch.device("cpu"), cache)
        if step >= warmup:
            seconds.append(time.perf_counter() - started)
    return {"step_s": statistics.median(seconds), "steps": len(seconds),
            "trainable_parameters": sum(p.numel() for p in head.parameters() if p.requires_grad)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--drafter", help="the head whose recipe and train prompts to use (default: the first "
                                          "eagle3 drafter built from the target)")
    parser.add_argument("--vocab-sizes", default=f"{FULL},16384,8192",
                        help=f"comma-separated draft vocabularies; '{FULL}' shares the target's output head")
    parser.add_argument("--prompts", type=int, default=240, help="train prompts to time on")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per vocabulary (after one untimed)")
    parser.add_argument("--feature-batches", type=int, default=4, help="batches the feature pass is timed on")
    parser.add_argument("--serve-prompts", type=int, default=8, help="eval prompts per served head (0 skips serving)")
    parser.add_argument("--max-tokens", type=int, default=32, help="forced output tokens per served request")
    parser.add_argument("--dtype", help="the served dtype (default: the config's target dtype)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = load_config(args.config)
    if args.dtype:
        config.target.dtype = args.dtype
    heads = [d for d in config.drafters if d.kind == "eagle3" and d.init == "target"]
    drafter = next((d for d in config.drafters if d.name == args.drafter), None) if args.drafter else \
        (heads[0] if heads else None)
    if drafter is None or drafter.kind != "eagle3":
        parser.error(f"{args.config}: no EAGLE-3 drafter {args.drafter or 'built from the target'}")
    recipe = recipe_for(drafter)
    sizes = [None if s.strip() == FULL else int(s) for s in args.vocab_sizes.split(",")]

    model_dir = target_model_arg(config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    target = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    layers = recipe.aux_layers or default_aux_layers(target.config.num_hidden_layers)
    pad_id = target.config.pad_token_id or 0
    rows = build_workload(config)
    chosen = select_prompts(rows, drafter_tasks(drafter, rows), recipe, tokenizer)
    chosen = [chosen[i * len(chosen) // args.prompts] for i in range(min(args.prompts, len(chosen)))]
    by_id = {r["id"]: r for r in rows}
    rng = random.Random(0)
    examples = [(p.task, synthetic_response(
        p.request.prompt_ids, min(by_id[p.row_id].get("ref_tokens") or p.request.max_tokens, p.request.max_tokens),
        target.config.vocab_size, recipe.top_k, rng)) for p in chosen]
    print(f"{drafter.name}: {len(examples)} train prompts ({', '.join(sorted({task for task, _ in examples}))}), "
          f"aux layers {layers}, batch_tokens {recipe.batch_tokens}, ttt_steps {recipe.ttt_steps}", flush=True)

    report: dict = {"drafter": drafter.name, "prompts": len(examples), "aux_layers": layers,
                    "torch_threads": torch.get_num_threads(), "vocabularies": {}}
    identity = VocabMap(target.config.vocab_size, None, unk_id=0)
    plain = [(i, head_example(task, response, identity, recipe.max_seq_len)) for i, (task, response) in enumerate(examples)]
    plain = [(i, e) for i, e in plain if e is not None]
    plan = batches([e for _, e in plain], recipe.batch_tokens, random.Random(0))
    report["features"] = time_features(target, plan[:args.feature_batches], layers, pad_id)
    f = report["features"]
    print(f"feature pass over {f['tokens']} tokens in {f['batches']} batches: full target {f['full_tokens_per_s']:.0f} "
          f"tok/s, stopping at layer {max(layers)} {f['early_tokens_per_s']:.0f} tok/s "
          f"(time ratio {f['early_over_full_time']:.3f}, median per batch)", flush=True)

    streams = [response["prompt_ids"] for _, response in examples]
    kept = {size: (None if size is None or size >= target.config.vocab_size
                   else choose_vocabulary(tokenizer, size, streams)) for size in sizes}
    # The features of the examples the timed steps train on, once: they do not depend on the vocabulary.
    index_of = {id(e): i for i, e in plain}
    trained = [e for batch in plan[:args.steps + 1] for e in batch]
    cached = example_features(target, trained, layers, pad_id, torch.device("cpu"), recipe.batch_tokens)
    features = {index_of[key]: value for key, value in cached.items()}
    for size in sizes:
        label = FULL if size is None else str(size)
        figures = time_training(target, examples, kept[size], recipe, layers, pad_id, features, args.steps, warmup=1)
        report["vocabularies"][label] = {"training": figures}
        print(f"vocabulary {label}: training step {figures['step_s']:.2f} s (median of {figures['steps']}), "
              f"{figures['trainable_parameters'] / 1e6:.2f}M trainable parameters", flush=True)
    reference = report["vocabularies"].get(FULL, {}).get("training")
    if reference:
        print("training step against the full vocabulary: " + ", ".join(
            f"{label} {v['training']['step_s'] / reference['step_s']:.3f}" for label, v in report["vocabularies"].items()))

    if args.serve_prompts:
        eval_rows = [r for r in rows if r["split"] == "eval" and "control" not in r]
        serve = [eval_rows[i * len(eval_rows) // args.serve_prompts] for i in range(args.serve_prompts)]
        baseline = config.arm(config.baseline_arm)
        log_dir = Path(tempfile.mkdtemp(prefix="head-cost-"))
        print(f"serving in {config.target.dtype}: {config.baseline_arm} and each head at K = {recipe.ttt_steps}, "
              f"{len(serve)} eval prompts x {args.max_tokens} forced tokens (logs {log_dir})", flush=True)
        with ProcessStack() as stack:
            base = launch_arm(config, baseline, free_port(HOST, config.ports.arms_from), log_dir, stack,
                              health_timeout_s=600)
            for size in sizes:
                label = FULL if size is None else str(size)
                directory = log_dir / f"head-{label}"
                torch.manual_seed(0)
                save_head(head_from_target(target, kept[size], layers, recipe.norm_before_residual), directory,
                          dtype=config.target.dtype, trained_draft_steps=recipe.ttt_steps)
                arm = ArmConfig(name=f"head-{label}", engine_args=baseline.engine_args, speculative=SpeculativeConfig(
                    method="eagle3", model=str(directory), num_speculative_tokens=recipe.ttt_steps))
                try:
                    with ProcessStack() as own:
                        running = launch_arm(config, arm, free_port(HOST, config.ports.arms_from), log_dir, own,
                                             health_timeout_s=600)
                        served = time_speculative_pair(running.url, arm.name, base.url, baseline.name, serve,
                                                       args.max_tokens)
                except (StartupError, RuntimeError, httpx.HTTPError) as err:
                    print(f"vocabulary {label}: not served ({str(err).splitlines()[0]})", flush=True)
                    continue
                report["vocabularies"][label]["served"] = served
                print(f"vocabulary {label}: served r = {served['r']:.3f} (TPOT speed-up {served['speedup']:.3f}, "
                      f"{served['tokens_per_step']:.3f} tokens per step, median of {served['n']} prompts)", flush=True)
        served_full = report["vocabularies"].get(FULL, {}).get("served")
        if served_full:
            print("served r against the full vocabulary: " + ", ".join(
                f"{label} {v['served']['r'] / served_full['r']:.3f}"
                for label, v in report["vocabularies"].items() if "served" in v))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
