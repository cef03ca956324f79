"""The target's own greedy responses to the train prompts: the distillation data.

Generation runs vLLM's offline API in a child process (`python -m
drafters.responses ...`): vLLM spawns workers, and keeping it out of the
trainer's process returns its memory and threads before training starts.

Cache: one JSONL file per (target weights, dtype, top-k). Each line is

    {"id": str, "prompt_sha": str, "prompt_ids": [int], "output_ids": [int],
     "topk_ids": [[int] * k per output token], "topk_logprobs": [[float] * k ...]}

`topk_*` are the target's k most likely tokens and their log-probabilities at
every output position (the soft targets for distillation); top-k 0 leaves them out.

The acceptance replay asks for `extend` more tokens: the stop token is ignored
and generation runs `extend` tokens past `max_tokens` (within the context),
because vLLM verifies the drafts of a request's last step, and counts the
accepted ones, before it cuts the output at the stop. Such lines also carry
`served_tokens` (the output vLLM would return: through the first stop token
within max_tokens, else max_tokens) and `finish` (`stop` or `length`). A line is reused
when its id and prompt hash match a request, so an interrupted run resumes
where it stopped and drafters that share prompts share responses.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core.processes import Child, log_tail, start_child

log = logging.getLogger(__name__)

# Prompts sent to vLLM per batch; each batch is appended to the cache when done.
CHUNK_PROMPTS = 64
PROGRESS_PREFIX = "responses: "  # the child's own progress lines, among vLLM's


@dataclass(frozen=True)
class Request:
    id: str
    prompt_ids: list[int]
    max_tokens: int

    @property
    def prompt_sha(self) -> str:
        return prompt_sha(self.prompt_ids)


def prompt_sha(prompt_ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(prompt_ids).encode()).hexdigest()[:16]


def read_cache(path: Path) -> dict[str, dict]:
    """Cached lines (responses, or the replay's matches) by id; a torn last line (killed run) is skipped."""
    cached: dict[str, dict] = {}
    if not path.exists():
        return cached
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            cached[entry["id"]] = entry
    return cached


def missing_requests(requests: list[Request], cached: dict[str, dict]) -> list[Request]:
    """Requests without a cached line of the same prompt (and budget, where the line records it)."""
    def current(r: Request) -> bool:
        entry = cached.get(r.id, {})
        return entry.get("prompt_sha") == r.prompt_sha and entry.get("max_tokens", r.max_tokens) == r.max_tokens
    return [r for r in requests if not current(r)]


def generate_responses(requests: list[Request], cache_file: Path, model_dir: Path, dtype: str,
                       max_model_len: int, top_k: int, env: dict[str, str], log_path: Path,
                       progress=log.info, extend: int = 0) -> dict[str, dict]:
    """Responses for every request, generating only the ones not cached yet.
    vLLM's own output goes to `log_path`; its progress lines go to `progress`."""
    missing = missing_requests(requests, read_cache(cache_file))
    if missing:
        progress(f"generating {len(missing)} of {len(requests)} target responses with vLLM "
                 f"(cache {cache_file}, log {log_path})")
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        todo = cache_file.with_suffix(".todo.jsonl")
        with open(todo, "w") as f:
            for r in missing:
                f.write(json.dumps({"id": r.id, "prompt_ids": r.prompt_ids, "max_tokens": r.max_tokens}) + "\n")
        cmd = [sys.executable, "-m", "drafters.responses", "--model", str(model_dir), "--dtype", dtype,
               "--max-model-len", str(max_model_len), "--top-k", str(top_k),
               "--extend", str(extend), "--requests", str(todo), "--out", str(cache_file)]
        # Its own process group, stopped whole if we are interrupted: vLLM's
        # engine and workers would otherwise outlive us and hold their memory.
        child = start_child("target responses", cmd, log_path, env={**os.environ, **env})
        try:
            follow_progress(child, progress)
        finally:
            child.stop()
        if child.proc.returncode != 0:
            raise RuntimeError(f"target response generation failed (exit {child.proc.returncode}); "
                               f"last lines of {log_path}:\n{log_tail(log_path)}")
        todo.unlink()
    else:
        progress(f"all {len(requests)} target responses cached in {cache_file}")
    cached = read_cache(cache_file)
    still_missing = missing_requests(requests, cached)
    if still_missing:
        raise RuntimeError(f"{len(still_missing)} responses missing after generation, e.g. {still_missing[0].id}")
    return {r.id: cached[r.id] for r in requests}


def follow_progress(child: Child, progress, poll_s: float = 2.0) -> None:
    """Until the child exits, pass on the progress lines it writes to its log."""
    with open(child.log_path, errors="replace") as log_file:
        while True:
            running = child.alive()
            for line in log_file.readlines():
                if line.startswith(PROGRESS_PREFIX):
                    progress(line.strip())
            if not running:
                return
            time.sleep(poll_s)


def _run_vllm(args: argparse.Namespace) -> None:
    """Child-process entry: generate greedily in chunks, appending each to the cache."""
    # Here, not at the top: only this child process runs vLLM; the parent imports this module to call it.
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(args.requests) as f:
        todo = [json.loads(line) for line in f]
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=True,
              seed=0, max_num_seqs=CHUNK_PROMPTS)
    stop_ids = _stop_token_ids(llm) if args.extend else set()
    started, done_tokens = time.monotonic(), 0
    with open(args.out, "a") as out:
        for first in range(0, len(todo), CHUNK_PROMPTS):
            chunk = todo[first:first + CHUNK_PROMPTS]
            # A prompt longer than the context window keeps its tail (the generation prompt).
            prompts = [TokensPrompt(prompt_token_ids=r["prompt_ids"][-(args.max_model_len - r["max_tokens"]):])
                       for r in chunk]
            params = [_sampling_params(SamplingParams, r, args, len(p["prompt_token_ids"]))
                      for r, p in zip(chunk, prompts)]
            results = llm.generate(prompts, params, use_tqdm=False)
            for request, result in zip(chunk, results):
                completion = result.outputs[0]
                entry = {"id": request["id"], "prompt_sha": prompt_sha(request["prompt_ids"]),
                         "prompt_ids": request["prompt_ids"], "output_ids": list(completion.token_ids),
                         "max_tokens": request["max_tokens"]}
                if args.top_k:
                    topk = [sorted(step.items(), key=lambda kv: kv[1].rank)[:args.top_k]
                            for step in completion.logprobs]
                    entry["topk_ids"] = [[tid for tid, _ in step] for step in topk]
                    entry["topk_logprobs"] = [[round(lp.logprob, 4) for _, lp in step] for step in topk]
                if args.extend:
                    entry["served_tokens"], entry["finish"] = served_length(entry["output_ids"],
                                                                            request["max_tokens"], stop_ids)
                out.write(json.dumps(entry) + "\n")
                done_tokens += len(completion.token_ids)
            out.flush()
            done = first + len(chunk)
            elapsed = time.monotonic() - started
            eta = elapsed / done * (len(todo) - done)
            print(f"{PROGRESS_PREFIX}{done}/{len(todo)} prompts, {done_tokens} tokens, "
                  f"{done_tokens / elapsed:.0f} tok/s, ETA {eta / 60:.1f} min", flush=True)


def served_length(output_ids: list[int], max_tokens: int, stop_ids: set[int]) -> tuple[int, str]:
    """What vLLM returns of an output generated past its stop: through the
    first stop token within max_tokens (finish `stop`), else max_tokens."""
    for position, token in enumerate(output_ids[:max_tokens]):
        if token in stop_ids:
            return position + 1, "stop"
    return min(max_tokens, len(output_ids)), "length"


def _sampling_params(sampling_params_class, request: dict, args: argparse.Namespace, prompt_len: int):
    if not args.extend:
        return sampling_params_class(temperature=0.0, max_tokens=request["max_tokens"], logprobs=args.top_k or None)
    longest = min(request["max_tokens"] + args.extend, args.max_model_len - prompt_len)
    return sampling_params_class(temperature=0.0, max_tokens=longest, ignore_eos=True,
                                 logprobs=args.top_k or None)


def _stop_token_ids(llm) -> set[int]:
    """The tokens that end a request: the tokenizer's EOS and the generation
    config's, as vLLM's input processor sets them."""
    from vllm import SamplingParams  # the child's own vLLM (see _run_vllm)

    probe = SamplingParams(temperature=0.0)
    probe.update_from_generation_config(llm.llm_engine.model_config.try_get_generation_config(),
                                        llm.get_tokenizer().eos_token_id)
    return {t for t in [probe.eos_token_id, *(probe.stop_token_ids or [])] if t is not None}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="generate target responses with vLLM (used by drafter distill)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--max-model-len", type=int, required=True)
    parser.add_argument("--top-k", type=int, required=True)
    parser.add_argument("--extend", type=int, default=0, help="ignore the stop token; generate this many more")
    parser.add_argument("--requests", required=True)
    parser.add_argument("--out", required=True)
    _run_vllm(parser.parse_args())
