"""Request tags: what a request is (run, task, stratum, prompt, load regime),
read from `X-Specdrift-*` headers (docs/formats.md, "Request tags").

Raw tag values go into the records. Prometheus labels only take values from a
bounded vocabulary fixed at start-up; anything else is counted as `other`, so
no client can grow the number of series."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel, Field

from core.contracts import (CLIENT_REQUEST_ID_HEADER, CLIENT_REQUEST_ID_PATTERN, TAG_HEADERS, TAG_MISSING,
                            TAG_VALUE_PATTERN)

UNKNOWN = "other"  # a label value outside the vocabulary
TAG_VALUE = re.compile(TAG_VALUE_PATTERN)
CLIENT_REQUEST_ID = re.compile(CLIENT_REQUEST_ID_PATTERN)


class TagError(ValueError):
    """A tag header whose value is not allowed; the message names the header."""


@dataclass(frozen=True, slots=True)
class Tags:
    run_id: str = TAG_MISSING
    task: str = TAG_MISSING
    stratum: str = TAG_MISSING
    prompt_id: str = TAG_MISSING
    regime: str = TAG_MISSING
    client_request_id: str | None = None  # the client's X-Request-ID; only stored, never a label


def parse_tags(headers) -> Tags:
    """Tags from request headers (a case-insensitive mapping); missing ones are `none`."""
    values = {}
    for field, header in TAG_HEADERS.items():
        value = headers.get(header)
        if value is None:
            continue
        if not TAG_VALUE.fullmatch(value):
            raise TagError(f"header {header} must match {TAG_VALUE_PATTERN}")
        values[field] = value
    client_request_id = headers.get(CLIENT_REQUEST_ID_HEADER)
    if client_request_id is not None:
        if not CLIENT_REQUEST_ID.fullmatch(client_request_id):
            raise TagError(f"header X-Request-ID must match {CLIENT_REQUEST_ID_PATTERN} (printable ASCII, no spaces)")
        values["client_request_id"] = client_request_id
    return Tags(**values)


class Vocabulary(BaseModel):
    """The label values Prometheus may see, besides `none` and `other`."""

    run: list[str] = Field(default_factory=list)
    task: list[str] = Field(default_factory=list)
    stratum: list[str] = Field(default_factory=list)


class LabelMapper:
    """Maps tags to bounded (run, task, stratum) label values."""

    def __init__(self, vocabulary: Vocabulary):
        self._allowed = {
            "run": frozenset(vocabulary.run) | {TAG_MISSING},
            "task": frozenset(vocabulary.task) | {TAG_MISSING},
            "stratum": frozenset(vocabulary.stratum) | {TAG_MISSING},
        }

    def _bounded(self, kind: str, value: str) -> str:
        return value if value in self._allowed[kind] else UNKNOWN

    def labels(self, tags: Tags) -> tuple[str, str, str]:
        return (self._bounded("run", tags.run_id), self._bounded("task", tags.task),
                self._bounded("stratum", tags.stratum))
