"""Token heatmaps: coloured terminal text and standalone HTML.

Each token's background is red for positive relevance, blue for negative and white for zero,
with an intensity of ``|relevance| / max |relevance|`` over the sequence.

>>> tokens = lrpx.plot_text.token_strings(input_ids[0], tokenizer)
>>> print(lrpx.plot_text.terminal_heatmap(tokens, relevance[0]))
>>> lrpx.plot_text.save_html("tokens.html", tokens, relevance[0], title="next token 'Paris' (logit 7.1)")
"""
from __future__ import annotations

import html
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

__all__ = ["token_strings", "display_tokens", "colour", "terminal_heatmap", "html_heatmap", "save_html",
           "use_colour"]

_SPACE_MARKERS = ("Ġ", "▁")  # byte-level BPE (GPT-2, RoBERTa) and SentencePiece (Llama, T5)
_NEWLINE_MARKERS = ("Ċ", "<0x0A>")
_CONTINUATION = "##"  # WordPiece (BERT)


def token_strings(ids: Sequence[int] | Tensor, tokenizer=None) -> list[str]:
    """The tokens of ``ids`` as strings: ``tokenizer.convert_ids_to_tokens`` if given, else the ids."""
    ids = [int(i) for i in (ids.tolist() if isinstance(ids, Tensor) else ids)]
    if tokenizer is None:
        return [str(i) for i in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]


def display_tokens(tokens: Sequence[str]) -> list[str]:
    """Tokens as text to show: word-boundary markers become a leading space.

    ``Ġ`` and ``▁`` (a word starts here) become a space and ``Ċ`` a newline sign ``↵``; with
    WordPiece tokens (any token starts with ``##``), a token without ``##`` starts a word and one
    with ``##`` continues it; tokens without any of these markers (a word-level vocabulary, ids)
    are separated by spaces. The first token never gets a leading space.
    """
    wordpiece = any(t.startswith(_CONTINUATION) and len(t) > 2 for t in tokens)
    marked = any(m in t for t in tokens for m in _SPACE_MARKERS + _NEWLINE_MARKERS)
    shown = []
    for token in tokens:
        if not (wordpiece or marked):  # word-level tokens, or ids as strings
            text = " " + token
        elif wordpiece:
            text = token[2:] if token.startswith(_CONTINUATION) and len(token) > 2 else " " + token
        else:
            text = token
            for marker in _SPACE_MARKERS:
                text = text.replace(marker, " ")
            for marker in _NEWLINE_MARKERS:
                text = text.replace(marker, "↵")
        shown.append(text)
    if shown:
        shown[0] = shown[0].lstrip(" ") or shown[0]
    return shown


def colour(value: float, scale: float) -> tuple[int, int, int]:
    """RGB of a relevance value: white at 0, pure red at ``+scale``, pure blue at ``-scale``."""
    share = 0.0 if scale <= 0 else min(abs(value) / scale, 1.0)
    fade = round(255 * (1.0 - share))
    return (255, fade, fade) if value > 0 else (fade, fade, 255) if value < 0 else (255, 255, 255)


def use_colour(stream=None) -> bool:
    """Colour only on a terminal and when ``NO_COLOR`` is unset (https://no-color.org)."""
    stream = sys.stdout if stream is None else stream
    if os.environ.get("NO_COLOR"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def terminal_heatmap(tokens: Sequence[str], relevance: Sequence[float] | Tensor, *, color: bool | None = None) -> str:
    """The tokens as one line of text with 24-bit ANSI background colours.

    Parameters
    ----------
    tokens
        Token strings (see :func:`token_strings`); word-boundary markers are shown as spaces.
    relevance
        One value per token.
    color
        ``True``: ANSI colours; ``False``: plain text, each token followed by its relevance in
        brackets; ``None``: colour when :func:`use_colour` says so.
    """
    values = _values(tokens, relevance)
    scale = _scale(values)
    shown = display_tokens(tokens)
    if not (use_colour() if color is None else color):
        return " ".join(f"{text.strip() or repr(text)}[{value:+.3g}]" for text, value in zip(shown, values))
    parts = []
    for text, value in zip(shown, values):
        red, green, blue = colour(value, scale)
        ink = 0 if min(red, green, blue) > 100 else 255  # white text on a deep colour
        parts.append(f"\x1b[48;2;{red};{green};{blue}m\x1b[38;2;{ink};{ink};{ink}m{text}\x1b[0m")
    return "".join(parts) + f"  (scale ±{scale:.3g})"


def html_heatmap(tokens: Sequence[str], relevance: Sequence[float] | Tensor, *, title: str = "Token relevance") -> str:
    """A standalone HTML page: the coloured tokens (relevance on hover), a title and a legend."""
    values = _values(tokens, relevance)
    scale = _scale(values)
    spans = []
    for text, value in zip(display_tokens(tokens), values):
        red, green, blue = colour(value, scale)
        ink = "#000" if min(red, green, blue) > 100 else "#fff"
        spans.append(f'<span class="tok" style="background: rgb({red}, {green}, {blue}); color: {ink}" '
                     f'title="{value:+.6g}">{html.escape(text)}</span>')
    steps = [-1.0, -0.5, 0.0, 0.5, 1.0]
    legend = "".join(f'<span class="key" style="background: rgb{colour(s * scale, scale)}">{s * scale:+.3g}</span>'
                     for s in steps)
    return _PAGE.format(title=html.escape(title), tokens="".join(spans), legend=legend)


def save_html(path: str | Path, tokens: Sequence[str], relevance: Sequence[float] | Tensor, *,
              title: str = "Token relevance") -> Path:
    """Write :func:`html_heatmap` to ``path`` (UTF-8); returns the path."""
    path = Path(path)
    path.write_text(html_heatmap(tokens, relevance, title=title), encoding="utf-8")
    return path


def _values(tokens: Sequence[str], relevance) -> list[float]:
    values = relevance.detach().double().flatten().tolist() if isinstance(relevance, Tensor) else \
        [float(v) for v in relevance]
    if len(values) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(values)} relevance values; give one value per token")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("relevance contains NaN or inf")
    return values


def _scale(values: list[float]) -> float:
    return max((abs(v) for v in values), default=0.0)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; }}
h1 {{ font-size: 1.2em; }}
.text {{ font-family: ui-monospace, monospace; line-height: 2; white-space: pre-wrap; }}
.tok {{ padding: 0.15em 0; border-radius: 0.2em; }}
.legend {{ margin-top: 1.5em; font-size: 0.9em; }}
.key {{ display: inline-block; width: 5em; text-align: center; padding: 0.2em; border: 1px solid #ccc; }}
</style>
</head>
<body>
<h1>{title}</h1>
<div class="text">{tokens}</div>
<div class="legend">Relevance (red positive, blue negative; hover a token for its value): {legend}</div>
</body>
</html>
"""
