"""A small document model with two renderings: Markdown (figures linked) and
self-contained HTML (figures inlined as base64 PNG, no scripts, no network)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    path: str  # relative to the document's folder
    caption: str


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 13px; }
th, td { border: 1px solid #c8c8c8; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eef0f3; }
tr:nth-child(even) td { background: #f8f9fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
caption { caption-side: top; text-align: left; font-size: 13px; color: #555; padding-bottom: .3em; }
figure { margin: 1em 0 1.5em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 13px; color: #555; }
code { background: #f2f2f2; padding: 0 .2em; }
"""


def _looks_numeric(cell: str) -> bool:
    head = cell.strip().lstrip("+-−[").split(" ")[0].rstrip("×%")
    return bool(head) and head.replace(".", "", 1).replace("e", "", 1).replace("-", "").isdigit()


def _inline_html(text: str) -> str:
    """Escape, then render `code` spans (the only inline markup the report uses)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _markdown_cell(cell) -> str:
    return str(cell).replace("|", "\\|")


@dataclass
class Document:
    title: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks) -> None:
        self.blocks.extend(b for b in blocks if b is not None)

    def to_markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            if isinstance(block, Heading):
                out += ["#" * block.level + " " + block.text, ""]
            elif isinstance(block, Paragraph):
                out += [block.text, ""]
            elif isinstance(block, Bullets):
                out += [f"- {item}" for item in block.items] + [""]
            elif isinstance(block, Table):
                if block.caption:
                    out += [f"*{block.caption}*", ""]
                align = ["---:" if block.rows and _looks_numeric(str(block.rows[0][i])) else "---"
                         for i in range(len(block.columns))]
                out.append("| " + " | ".join(map(_markdown_cell, block.columns)) + " |")
                out.append("|" + "|".join(align) + "|")
                out += ["| " + " | ".join(map(_markdown_cell, row)) + " |" for row in block.rows]
                out.append("")
            elif isinstance(block, Figure):
                out += [f"![{block.caption}]({block.path})", "", f"*{block.caption}*", ""]
        return "\n".join(out).rstrip() + "\n"

    def to_html(self, base: Path) -> str:
        out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
               f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head><body>",
               f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            if isinstance(block, Heading):
                out.append(f"<h{block.level}>{_inline_html(block.text)}</h{block.level}>")
            elif isinstance(block, Paragraph):
                out.append(f"<p>{_inline_html(block.text)}</p>")
            elif isinstance(block, Bullets):
                out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block.items) + "</ul>")
            elif isinstance(block, Table):
                caption = f"<caption>{_inline_html(block.caption)}</caption>" if block.caption else ""
                head = "".join(f"<th>{html.escape(str(c))}</th>" for c in block.columns)
                body = "".join(
                    "<tr>" + "".join(f'<td class="num">{html.escape(str(c))}</td>' if _looks_numeric(str(c))
                                     else f"<td>{_inline_html(str(c))}</td>" for c in row) + "</tr>"
                    for row in block.rows)
                out.append(f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif isinstance(block, Figure):
                data = base64.b64encode((base / block.path).read_bytes()).decode()
                out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block.caption)}">'
                           f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"
