"""Dataset adapters: real datasets (and a user's own JSONL) into chat prompts.

Each adapter reads one folder of the data directory (see its SOURCE.md) and
yields `Item`s: chat messages ending in a user turn, an optional reference
output (for its length), and two keys:

- `key` names the prompt's content. Two items with the same key are the same
  prompt, even from different datasets (Spec-Bench contains MT-Bench, 80
  GSM8K questions and 43 NQ-open questions); the workload keeps the first
  and counts the rest as duplicates.
- `group` decides the train/eval split. Items that share content without
  being the same prompt share a group, so that they land in the same split:
  the NQ question with and without its passage, the queries on one meeting.

The templates that turn raw fields into prompts are in workload/templates.py.
"""

from __future__ import annotations

import gzip
import json
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from core.config import NAME_PATTERN, DatasetSpec, ExperimentConfig
from workload import templates


class DatasetError(ValueError):
    """A dataset that cannot be read as configured; the message says why."""


@dataclass(frozen=True)
class Item:
    dataset: str
    task: str
    source_id: str
    messages: list[dict]
    reference: str | None
    key: str
    group: str


def normalize(text: str) -> str:
    """Content identity for duplicate detection: case, spacing and trailing
    punctuation differ between copies of the same question (NQ-open drops
    the '?' and the capitals that Spec-Bench keeps)."""
    text = unicodedata.normalize("NFKC", text).lower()
    return re.sub(r"\s+", " ", text).strip().rstrip("?.!").strip()


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def safe_id(value) -> str:
    """A source id usable in a request tag ([A-Za-z0-9._:@+-])."""
    return re.sub(r"[^A-Za-z0-9._:@+-]", "_", str(value))[:64] or "_"


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    raise DatasetError(f"{path}:{number}: not JSON ({err.msg})") from None


# --- built-in datasets --------------------------------------------------------

SPEC_BENCH_TASKS = {  # Spec-Bench category -> task; its 8 MT-Bench categories are one task
    "translation": "spec_bench_translation",
    "summarization": "spec_bench_summarization",
    "qa": "spec_bench_qa",
    "math_reasoning": "spec_bench_math",
    "rag": "spec_bench_rag",
}
SPEC_BENCH_MT = "spec_bench_mt"


def spec_bench(folder: Path) -> Iterator[Item]:
    """All 480 questions, first turn only: Spec-Bench ships no answers, so its
    MT-Bench part has no first answer to put before the second turn (the
    mt_bench adapter does both turns)."""
    for _, rec in read_jsonl(folder / "question.jsonl"):
        category = rec["category"]
        prompt = rec["turns"][0]
        content = prompt.removeprefix("Translate German to English: ")  # the translation's own text
        reference = None
        if rec.get("reference"):
            first = rec["reference"][0]
            # rag references are lists of acceptable short answers
            reference = first if isinstance(first, str) else (first[0] if first else None)
        key = normalize(content)
        yield Item("spec_bench", SPEC_BENCH_TASKS.get(category, SPEC_BENCH_MT), safe_id(rec["question_id"]),
                   user(prompt), reference or None, key, key)


MT_BENCH_ANSWERS = "model_answer/gpt-4.jsonl"


def mt_bench(folder: Path) -> Iterator[Item]:
    """Both turns of the 80 questions as chat: turn 2 carries turn 1 and
    GPT-4's answer to it as context. GPT-4's answers are also the reference
    output lengths (SOURCE.md: length references, not training data)."""
    answers = {rec["question_id"]: rec["choices"][0]["turns"]
               for _, rec in read_jsonl(folder / MT_BENCH_ANSWERS)}
    for _, rec in read_jsonl(folder / "question.jsonl"):
        qid = rec["question_id"]
        first, second = rec["turns"]
        answer = answers.get(qid)
        if answer is None:
            raise DatasetError(f"{folder / MT_BENCH_ANSWERS}: no answer for question {qid}")
        key = normalize(first)
        yield Item("mt_bench", "mt_bench", f"{qid}.t1", user(first), answer[0], key, key)
        messages = [*user(first), {"role": "assistant", "content": answer[0]}, *user(second)]
        yield Item("mt_bench", "mt_bench", f"{qid}.t2", messages, answer[1], key + "\n" + normalize(second), key)


def gsm8k(folder: Path) -> Iterator[Item]:
    for number, rec in read_jsonl(folder / "test.jsonl"):
        key = normalize(rec["question"])
        yield Item("gsm8k", "gsm8k", str(number), user(templates.GSM8K.format(question=rec["question"])),
                   rec["answer"], key, key)


def wmt22_de_en(folder: Path) -> Iterator[Item]:
    sources = (folder / "generaltest2022.de-en.src.de").read_text(encoding="utf-8").split("\n")
    references = (folder / "generaltest2022.de-en.ref.A.en").read_text(encoding="utf-8").split("\n")
    if sources and sources[-1] == "":
        sources, references = sources[:-1], references[:-1]
    if len(sources) != len(references):
        raise DatasetError(f"{folder}: {len(sources)} source lines but {len(references)} reference lines")
    for number, (source, reference) in enumerate(zip(sources, references), start=1):
        key = normalize(source)
        yield Item("wmt22_de_en", "wmt22_de_en", str(number), user(templates.WMT22_DE_EN.format(source=source)),
                   reference, key, key)


def nq_open(folder: Path) -> Iterator[Item]:
    for number, rec in read_jsonl(folder / "NQ-open.dev.jsonl"):
        key = normalize(rec["question"])
        yield Item("nq_open", "nq_open", str(number), user(templates.NQ_OPEN.format(question=rec["question"])),
                   rec["answer"][0], key, key)


def nq_rag(folder: Path) -> Iterator[Item]:
    for number, rec in read_jsonl(folder / "nq-open-oracle.jsonl.gz"):
        passage = rec["ctxs"][0]
        question = normalize(rec["question"])
        prompt = templates.NQ_RAG.format(title=passage["title"], text=passage["text"], question=rec["question"])
        # Same question as in NQ-open, different prompt: a distinct key, a shared group.
        yield Item("nq_rag", "nq_rag", str(number), user(prompt), rec["answers"][0],
                   question + "\n" + normalize(passage["text"]), question)


def xsum(folder: Path) -> Iterator[Item]:
    records = json.loads((folder / "xsumfaith.json").read_text(encoding="utf-8"))
    for source_id, rec in records.items():
        key = normalize(rec["document"])
        yield Item("xsum", "xsum", safe_id(source_id), user(templates.XSUM.format(document=rec["document"])),
                   rec["claim"], key, key)


def qmsum(folder: Path) -> Iterator[Item]:
    """281 queries. A specific query sees the turns of its relevant spans (the
    span ends are inclusive turn indices); a general query sees the whole
    meeting, which is far longer than a small model's context. All queries on
    one meeting share a split group, since they share its transcript."""
    for number, rec in read_jsonl(folder / "test.jsonl"):
        turns = [templates.QMSUM_TURN.format(speaker=t["speaker"], content=t["content"])
                 for t in rec["meeting_transcripts"]]
        group = f"qmsum-meeting-{number}\n" + normalize(turns[0])
        queries = [("g", i, q, "\n".join(turns)) for i, q in enumerate(rec["general_query_list"])]
        for i, q in enumerate(rec["specific_query_list"]):
            spans = [turns[int(start):int(end) + 1] for start, end in q["relevant_text_span"]]
            queries.append(("s", i, q, "\n".join(line for span in spans for line in span)))
        for kind, i, q, transcript in queries:
            prompt = templates.QMSUM.format(transcript=transcript, query=q["query"])
            yield Item("qmsum", "qmsum", f"{number}.{kind}{i}", user(prompt), q["answer"],
                       group + "\n" + normalize(q["query"]) + "\n" + normalize(transcript[:200]), group)


@dataclass(frozen=True)
class Adapter:
    name: str
    folder: str  # under the data directory
    tasks: tuple[str, ...]  # what it produces; a one-task adapter can be renamed with `task:`
    read: Callable[[Path], Iterator[Item]]


BUILT_IN = {a.name: a for a in [
    Adapter("spec_bench", "spec_bench", (SPEC_BENCH_MT, *SPEC_BENCH_TASKS.values()), spec_bench),
    Adapter("mt_bench", "mt_bench", ("mt_bench",), mt_bench),
    Adapter("gsm8k", "gsm8k", ("gsm8k",), gsm8k),
    Adapter("wmt22_de_en", "wmt22_de_en", ("wmt22_de_en",), wmt22_de_en),
    Adapter("nq_open", "nq_open", ("nq_open",), nq_open),
    Adapter("nq_rag", "nq_open_oracle_rag", ("nq_rag",), nq_rag),
    Adapter("xsum", "xsum_faith", ("xsum",), xsum),
    Adapter("qmsum", "qmsum", ("qmsum",), qmsum),
]}
JSONL = "jsonl"
ADAPTER_NAMES = (*BUILT_IN, JSONL)


# --- a user's own JSONL ---------------------------------------------------------

JSONL_FIELDS = {"prompt", "messages", "reference", "id", "task"}


def lookup(record: dict, dotted: str):
    """record["a"]["b"] for "a.b"; None when any step is missing."""
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def check_task_name(task: str, where: str) -> str:
    if not isinstance(task, str) or not re.match(NAME_PATTERN, task):
        raise DatasetError(f"{where}: task name {task!r} must match {NAME_PATTERN}")
    return task


def jsonl(path: Path, spec: DatasetSpec) -> Iterator[Item]:
    """A user's file, one JSON object a line. `fields` maps roles to field
    names (dots reach into nested objects):

    - `prompt`: a string, sent as one user message; or `messages`: a list of
      {"role", "content"} chat messages ending with a user turn;
    - `reference` (optional): a reference answer, for its length;
    - `id` (optional): the record's id (default: its line number);
    - `task` (optional): a field holding each record's task name, for a file
      with several tasks; otherwise the dataset's `task:` names them all.
    """
    fields = spec.fields
    unknown = set(fields) - JSONL_FIELDS
    if unknown:
        raise DatasetError(f"jsonl fields: unknown {sorted(unknown)}; known: {sorted(JSONL_FIELDS)}")
    if ("prompt" in fields) == ("messages" in fields):
        raise DatasetError("jsonl fields: map exactly one of 'prompt' or 'messages'")
    if not spec.task and "task" not in fields:
        raise DatasetError("jsonl dataset needs `task:` or a `task` field mapping")
    dataset = f"jsonl:{path.name}"
    for number, rec in read_jsonl(path):
        where = f"{path}:{number}"
        if "prompt" in fields:
            prompt = lookup(rec, fields["prompt"])
            if not isinstance(prompt, str) or not prompt.strip():
                raise DatasetError(f"{where}: field {fields['prompt']!r} is missing or not a non-empty string")
            messages = user(prompt)
        else:
            messages = lookup(rec, fields["messages"])
            if not (isinstance(messages, list) and messages
                    and all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in
                            ("system", "user", "assistant") for m in messages)):
                raise DatasetError(f"{where}: field {fields['messages']!r} is not a list of chat messages")
            if messages[-1]["role"] != "user":
                raise DatasetError(f"{where}: the last message must be the user's")
            messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        reference = lookup(rec, fields["reference"]) if "reference" in fields else None
        if reference is not None and not isinstance(reference, str):
            raise DatasetError(f"{where}: field {fields['reference']!r} is not a string")
        source_id = lookup(rec, fields["id"]) if "id" in fields else number
        if source_id is None:
            raise DatasetError(f"{where}: field {fields['id']!r} is missing")
        task = check_task_name(lookup(rec, fields["task"]), where) if "task" in fields else spec.task
        key = normalize("\n".join(m["content"] for m in messages))
        yield Item(dataset, task, safe_id(source_id), messages, reference or None, key, key)


def jsonl_tasks(path: Path, spec: DatasetSpec) -> list[str]:
    """The task names a JSONL file produces, without building its prompts."""
    if "task" not in spec.fields:
        return [spec.task] if spec.task else []
    found = {lookup(rec, spec.fields["task"]) for _, rec in read_jsonl(path)}
    return sorted(check_task_name(t, str(path)) for t in found)


# --- entry points --------------------------------------------------------------

def source_path(config: ExperimentConfig, spec: DatasetSpec) -> Path:
    """The file (jsonl) or folder (built-in) a dataset is read from."""
    if spec.adapter == JSONL:
        if not spec.path:
            raise DatasetError("jsonl dataset needs `path:`")
        return config.resolve_path(spec.path)
    adapter = BUILT_IN.get(spec.adapter)
    if adapter is None:
        raise DatasetError(f"unknown adapter {spec.adapter!r}; known: {', '.join(ADAPTER_NAMES)}")
    return config.resolve_path(spec.path) if spec.path else config.data_path / adapter.folder


def dataset_tasks(config: ExperimentConfig, spec: DatasetSpec) -> list[str]:
    """The task names a configured dataset produces (cheap: no prompts built)."""
    if spec.adapter == JSONL:
        return jsonl_tasks(source_path(config, spec), spec)
    adapter = BUILT_IN.get(spec.adapter)
    if adapter is None:
        raise DatasetError(f"unknown adapter {spec.adapter!r}; known: {', '.join(ADAPTER_NAMES)}")
    if spec.task:
        if len(adapter.tasks) > 1:
            raise DatasetError(f"adapter {spec.adapter!r} produces several tasks "
                               f"({', '.join(adapter.tasks)}); it cannot be renamed with `task:`")
        return [spec.task]
    return list(adapter.tasks)


def load_items(config: ExperimentConfig, spec: DatasetSpec) -> list[Item]:
    """The items of one configured dataset, in file order, the first `limit`."""
    path = source_path(config, spec)
    if not spec.path and not config.data_path.is_dir():
        raise DatasetError(f"data_dir {config.data_path} does not exist: it is relative to the config file "
                           f"(../shared/data beside the checkout for the shipped configs); "
                           f"set SPECDRIFT_DATA_DIR to the datasets folder")
    if not path.exists():
        raise DatasetError(f"{spec.adapter}: {path} does not exist (data_dir: {config.data_path})")
    if spec.adapter == JSONL:
        items = jsonl(path, spec)
    else:
        dataset_tasks(config, spec)  # a rename of a several-task adapter fails here
        items = (replace(item, task=spec.task) if spec.task else item for item in BUILT_IN[spec.adapter].read(path))
    out = []
    for item in items:
        if spec.limit is not None and len(out) >= spec.limit:
            break
        out.append(item)
    return out
