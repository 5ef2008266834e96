"""Token heatmaps: colours, word-boundary markers, terminal fallback and HTML."""
from __future__ import annotations

import io
import re

import pytest
import torch

from lrpx import plot_text


def test_colour_scale():
    assert plot_text.colour(0.0, 2.0) == (255, 255, 255)
    assert plot_text.colour(2.0, 2.0) == (255, 0, 0)
    assert plot_text.colour(-2.0, 2.0) == (0, 0, 255)
    assert plot_text.colour(1.0, 2.0) == (255, 128, 128)  # 255 * (1 - 0.5) = 127.5, rounded to even
    assert plot_text.colour(-5.0, 2.0) == (0, 0, 255)  # clipped
    assert plot_text.colour(1.0, 0.0) == (255, 255, 255)


@pytest.mark.parametrize("tokens, shown", [
    (["The", "Ġcat", "Ġsat", "Ċ", "ly"], ["The", " cat", " sat", "↵", "ly"]),
    (["▁Hello", "▁wor", "ld"], ["Hello", " wor", "ld"]),
    (["[CLS]", "play", "##ing", "well", "[SEP]"], ["[CLS]", " play", "ing", " well", " [SEP]"]),
    (["12", "7"], ["12", " 7"]),  # no markers: words (or ids) apart
    (["the", "<b>"], ["the", " <b>"]),
])
def test_display_tokens(tokens, shown):
    assert plot_text.display_tokens(tokens) == shown


def test_token_strings():
    class Tokenizer:
        def convert_ids_to_tokens(self, ids):
            return [f"t{i}" for i in ids]

    assert plot_text.token_strings(torch.tensor([3, 1])) == ["3", "1"]
    assert plot_text.token_strings([3, 1], Tokenizer()) == ["t3", "t1"]


def test_terminal_colours_and_fallback(monkeypatch):
    tokens, relevance = ["a", "Ġb", "Ġc"], torch.tensor([2.0, -1.0, 0.0])
    coloured = plot_text.terminal_heatmap(tokens, relevance, color=True)
    backgrounds = re.findall(r"\x1b\[48;2;(\d+);(\d+);(\d+)m", coloured)
    assert backgrounds == [("255", "0", "0"), ("128", "128", "255"), ("255", "255", "255")]
    assert coloured.count("\x1b[0m") == 3
    plain = plot_text.terminal_heatmap(tokens, relevance, color=False)
    assert plain == "a[+2] b[-1] c[+0]"

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert plot_text.use_colour(Terminal()) and not plot_text.use_colour(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not plot_text.use_colour(Terminal())


def test_html_is_standalone_and_escaped(tmp_path):
    path = plot_text.save_html(tmp_path / "t.html", ["<script>", "Ġ&", 'Ġ"q"'], [1.0, -0.5, 0.25],
                               title="next token '<x>' (logit 1.5)")
    page = path.read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;" in page and " &amp;" in page and "&quot;q&quot;" in page
    assert "<title>next token &#x27;&lt;x&gt;&#x27; (logit 1.5)</title>" in page
    assert "src=" not in page and "href=" not in page and "<link" not in page
    assert 'background: rgb(255, 0, 0)' in page and 'background: rgb(128, 128, 255)' in page
    legend = page.split('class="legend"')[1]
    assert [v for v in re.findall(r">([+-][\d.]+)</span>", legend)] == ["-1", "-0.5", "+0", "+0.5", "+1"]


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="3 tokens but 2 relevance values"):
        plot_text.terminal_heatmap(["a", "b", "c"], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        plot_text.html_heatmap(["a"], [float("nan")])
