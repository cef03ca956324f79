"""The target's own greedy responses to the train prompts: the distillation data.

Generation runs vLLM's offline API in a child process (`python -m
drafters.responses ...`): vLLM spawns workers, and keeping it out of the
trainer's process returns its memory and threads before training starts.

Cache: one JSONL file per (target weights, dtype, top-k). Each line is

    {"id": str, "prompt_sha": str, "prompt_ids": [int], "output_ids": [int],
     "topk_ids": [[int] * k per output token], "topk_logprobs": [[float] * k ...]}

`topk_*` are the target's k most likely tokens and their log-probabilities at
every output position (the soft targets for distillation). A line is reused
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
    """Cached responses by id; a torn last line (killed run) is skipped."""
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
    return [r for r in requests if cached.get(r.id, {}).get("prompt_sha") != r.prompt_sha]


def generate_responses(requests: list[Request], cache_file: Path, model_dir: Path, dtype: str,
                       max_model_len: int, top_k: int, env: dict[str, str], log_path: Path,
                       progress=log.info) -> dict[str, dict]:
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
               "--requests", str(todo), "--out", str(cache_file)]
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
    started, done_tokens = time.monotonic(), 0
    with open(args.out, "a") as out:
        for first in range(0, len(todo), CHUNK_PROMPTS):
            chunk = todo[first:first + CHUNK_PROMPTS]
            # A prompt longer than the context window keeps its tail (the generation prompt).
            prompts = [TokensPrompt(prompt_token_ids=r["prompt_ids"][-(args.max_model_len - r["max_tokens"]):])
                       for r in chunk]
            params = [SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], logprobs=args.top_k)
                      for r in chunk]
            results = llm.generate(prompts, params, use_tqdm=False)
            for request, result in zip(chunk, results):
                completion = result.outputs[0]
                topk = [sorted(step.items(), key=lambda kv: kv[1].rank)[:args.top_k] for step in completion.logprobs]
                out.write(json.dumps({
                    "id": request["id"],
                    "prompt_sha": prompt_sha(request["prompt_ids"]),
                    "prompt_ids": request["prompt_ids"],
                    "output_ids": list(completion.token_ids),
                    "topk_ids": [[tid for tid, _ in step] for step in topk],
                    "topk_logprobs": [[round(lp.logprob, 4) for _, lp in step] for step in topk],
                }) + "\n")
                done_tokens += len(completion.token_ids)
            out.flush()
            done = first + len(chunk)
            elapsed = time.monotonic() - started
            eta = elapsed / done * (len(todo) - done)
            print(f"{PROGRESS_PREFIX}{done}/{len(todo)} prompts, {done_tokens} tokens, "
                  f"{done_tokens / elapsed:.0f} tok/s, ETA {eta / 60:.1f} min", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="generate target responses with vLLM (used by drafter distill)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--max-model-len", type=int, required=True)
    parser.add_argument("--top-k", type=int, required=True)
    parser.add_argument("--requests", required=True)
    parser.add_argument("--out", required=True)
    _run_vllm(parser.parse_args())
