"""The eval report's HTML is its Markdown rendered by markdown-it, self-contained (plots inline)."""

from __future__ import annotations

import base64
import re

from fvqa.eval.report import render_html

PNG = b"\x89PNG\r\n\x1a\n-fake-plot-bytes"

MD = "\n".join([
    "# fvqa evaluation: run `r1`", "", "## Protocol",
    "- Primary metric (the 'accuracy' column): **judge**.",
    "- **Note**: compared <script>alert(1)</script> & more", "",
    "![accuracy](plots/accuracy.png)", "", "![search_ratio](plots/search_ratio.png)", "",
    "## Accuracy", "", "| model / workflow | mmsearch | n |", "|---|---|---|",
    "| scripted-vlm / rag | 100.0 | 3 |", "| m_a / direct | 33.3 | 3 |", "",
])


def test_markdown_becomes_one_self_contained_page() -> None:
    page = render_html("fvqa evaluation: run `r1`", MD, {"accuracy": PNG, "search_ratio": PNG})
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</body></html>")
    assert "<title>fvqa evaluation: run r1</title>" in page
    assert "<h1>fvqa evaluation: run <code>r1</code></h1>" in page
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert page.count(f'src="{uri}"') == 2 and "plots/" not in page  # no file next to it needed
    assert '<img src="' in page and 'alt="accuracy"' in page
    assert "<strong>judge</strong>" in page  # Markdown emphasis renders, not stripped
    assert "<th>model / workflow</th>" in page and "<td>scripted-vlm / rag</td>" in page
    assert len(re.findall(r"<tr>", page)) == 3  # header + two rows
    assert "<td>m_a / direct</td>" in page  # intraword underscores stay text


def test_raw_html_in_the_markdown_is_escaped() -> None:
    page = render_html("t", MD, {})
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page


def test_a_plot_without_bytes_keeps_its_relative_link() -> None:
    page = render_html("t", MD, {"accuracy": PNG})
    assert page.count("data:image/png;base64,") == 1 and 'src="plots/search_ratio.png"' in page
