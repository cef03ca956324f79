"""The report: every output written, `specdrift report` reproduces
results.json exactly, `compare`, and report.html rendered in headless
Chromium with every figure loaded and readable tables."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from analysis.document import Bullets, Document, Figure, Heading, Paragraph, Table
from specdrift.cli import main
from test_analysis_synthetic import write_synthetic_run

SECTIONS = ["Summary", "The run", "Acceptance (replay, primary outcome)",
            "Speed-up against the baseline, paired by prompt", "Acceptance (served)",
            "The analytic model (Leviathan et al. 2023)", "Losslessness", "Length divergence",
            "The answer: does the fine-tuned drafter's advantage follow length divergence?",
            "Length-matched control", "Load regimes", "Drift over time", "Environment", "Methods"]
FIGURES = ["speedup.png", "acceptance_per_position.png", "divergence_tasks.png", "divergence_drafters.png",
           "answer.png", "within_task.png", "load_curve.png", "drift.png"]


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """A synthetic run directory after `specdrift report`."""
    run_dir = write_synthetic_run(tmp_path_factory.mktemp("report") / "run", dies_after={"finetuned": 50})
    assert main(["report", str(run_dir)]) == 0
    return run_dir


def test_report_writes_every_output(reported):
    assert {p.name for p in (reported / "figures").iterdir()} == set(FIGURES)
    markdown = (reported / "report.md").read_text()
    headings = re.findall(r"^## (.+)$", markdown, flags=re.M)
    assert headings == SECTIONS
    for name in FIGURES:
        assert f"](figures/{name})" in markdown
    assert json.loads((reported / "results.json").read_text())["schema"] == 4


def test_report_reproduces_results_json_exactly(reported, tmp_path):
    before = (reported / "results.json").read_bytes()
    assert main(["report", str(reported), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "results.json").read_bytes() == before
    assert (tmp_path / "again" / "report.md").read_text() == (reported / "report.md").read_text()


def test_report_numbers_come_from_results_json(reported):
    results = json.loads((reported / "results.json").read_text())
    markdown = (reported / "report.md").read_text()
    cell = next(c for c in results["cells"] if (c["arm"], c["regime"], c["task"], c["stratum"])
                == ("ngram", "sequential", "all", "all"))
    speed = cell["speedup"]["tpot"]
    assert f"{speed['value']:.2f}× [{speed['ci'][0]:.2f}, {speed['ci'][1]:.2f}]" in markdown
    for line in results["summary"]:
        assert line in markdown


def test_report_html_is_self_contained(reported):
    page = (reported / "report.html").read_text()
    assert "<script" not in page
    assert not re.search(r'(src|href)="(?!data:)', page), "the report must not load anything from outside"
    assert page.count('<img src="data:image/png;base64,') == len(FIGURES)


def test_compare_two_runs(reported, tmp_path):
    other = write_synthetic_run(tmp_path / "other", seed=7, per_cell=3, regimes=("sequential",))
    assert main(["compare", str(reported), str(other), "--out", str(tmp_path / "cmp")]) == 0
    comparison = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert set(comparison["runs"]) == {"a", "b"}
    row = next(r for r in comparison["cells"] if (r["arm"], r["regime"], r["task"]) == ("ngram", "sequential", "all"))
    assert row["tpot_speedup"][0]["value"] and row["tpot_speedup"][1]["value"]
    assert "finetuned vs generic" in comparison["answer"]
    assert "concurrency-4" in (tmp_path / "cmp" / "compare.md").read_text()
    assert not (Path(other) / "results.json").exists()  # compare writes nothing into the runs


def test_report_on_a_missing_directory_fails_cleanly(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_document_renders_both_ways(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 3), "red").save(tmp_path / "f.png")
    doc = Document("T")
    doc.add(Heading(2, "H"), Paragraph("a `code` b"), Bullets(["x|y"]), Table(["k", "v"], [["a|b", "1.5×"]], "cap"),
            Figure("f.png", "fig"))
    markdown = doc.to_markdown()
    assert "| a\\|b | 1.5× |" in markdown and "|---|---:|" in markdown and "![fig](f.png)" in markdown
    page = doc.to_html(tmp_path)
    assert "<code>code</code>" in page and '<td class="num">1.5×</td>' in page and "data:image/png;base64," in page


# --- the page in a real browser ---------------------------------------------------

PROBE = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const cell = document.querySelector('td');
  const probe = document.createElement('pre');
  probe.id = 'probe';
  probe.textContent = JSON.stringify({
    images: images.map(i => ({complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
                              shown: i.getBoundingClientRect().width})),
    tableFontPx: parseFloat(getComputedStyle(cell).fontSize),
    pageWidth: document.documentElement.scrollWidth,
  });
  document.body.appendChild(probe);
});
</script>"""


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    return path


def _chromium_args(profile: Path) -> list[str]:
    return [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"]


def test_html_renders_in_chromium_with_figures_and_readable_tables(reported, tmp_path):
    """Load report.html in headless Chromium. A probe script, added to a copy
    of the page only, records every image's natural size and the table font
    size after load; a screenshot of the top of the page must show figures
    (many distinct colours), not a blank page."""
    page = (reported / "report.html").read_text().replace("</body>", PROBE + "</body>")
    probed = tmp_path / "probed.html"
    probed.write_text(page)
    dom = subprocess.run(_chromium_args(tmp_path / "profile-dom") + ["--virtual-time-budget=10000", "--dump-dom",
                                                                     probed.as_uri()],
                         capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, flags=re.S)
    assert match, f"the page did not finish loading in Chromium: {dom.stderr[-2000:]}"
    probe = json.loads(match.group(1).replace("&quot;", '"'))
    assert len(probe["images"]) == len(FIGURES)
    for image in probe["images"]:
        assert image["complete"] and image["width"] > 300 and image["height"] > 150, image
        assert image["shown"] > 300
    assert probe["tableFontPx"] >= 12
    assert probe["pageWidth"] <= 1280 + 20, "tables or figures overflow a 1280 px window"

    shot = tmp_path / "report.png"
    subprocess.run(_chromium_args(tmp_path / "profile-shot") + [f"--screenshot={shot}", "--window-size=1280,3000",
                                                                 (reported / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (3000, 1280)
    distinct = len(np.unique(pixels.reshape(-1, 3)[::7], axis=0))
    non_white = (pixels.min(axis=2) < 240).mean()
    assert distinct > 200 and non_white > 0.05, (distinct, non_white)
