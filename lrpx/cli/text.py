"""``lrpx explain-text``: the relevance of each token of a text for a language model's prediction.

Loads a Hugging Face ``transformers`` model and its tokenizer with ``from_pretrained`` (a local
``save_pretrained`` folder, or a hub name when online), explains the next token after the text
(causal language models), the next output token after ``--decoder-text`` (encoder-decoder
models) or the class (sequence classifiers, by the config's ``architectures``), and writes ``OUT/tokens.html`` and ``OUT/relevance.json``; the coloured tokens go to stdout.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from ..plot_text import save_html, terminal_heatmap, token_strings, use_colour
from ..text import TokenExplanation, explain_tokens
from ..text_inputs import input_embedding, model_logits
from .common import UsageError, check_out, device, first_line, out_dir

__all__ = ["add_text", "run_explain_text", "load_text_model", "convert_text_model", "resolve_target"]


def add_text(subparsers) -> None:
    """The ``explain-text`` command."""
    p = subparsers.add_parser(
        "explain-text", help="token relevance of a text for a transformers language model",
        description="Explain a Hugging Face transformers model's prediction for a text: the next token after the "
        "text (causal language models), the next output token (encoder-decoder models such as T5 and BART) or the "
        "class (sequence classifiers). Writes OUT/tokens.html and OUT/relevance.json and prints the tokens "
        "coloured by relevance (red positive, blue negative).")
    p.add_argument("--model", required=True, metavar="DIR_OR_NAME",
                   help="a folder written by save_pretrained (model and tokenizer), or a hub name when online")
    p.add_argument("--text", required=True, metavar="TEXT", help="the input text")
    p.add_argument("--target", default=None, metavar="TOKEN|ID",
                   help="the token to explain: a token id (digits), or a string that the tokenizer turns into a "
                   "single token (e.g. ' Paris' with its leading space for GPT-2); for a classifier, the class index. "
                   "Default: the top one")
    p.add_argument("--position", type=int, default=-1, metavar="N",
                   help="causal LMs: the position whose next-token logits are explained (default: -1, the last); "
                   "encoder-decoders: the position in the decoder's input")
    p.add_argument("--decoder-text", default=None, metavar="TEXT",
                   help="encoder-decoder models: the output so far, after the decoder's start token (default: none, "
                   "so the first output token is explained)")
    p.add_argument("--out", type=Path, default=Path("lrpx-explain-text"), metavar="DIR",
                   help="output folder (default: %(default)s)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the printed tokens: auto (on a terminal without NO_COLOR), always, never")
    p.add_argument("--device", default="cpu", metavar="D", help="torch device, e.g. cpu, cuda (default: cpu)")
    p.set_defaults(handler=run_explain_text)


def load_text_model(name: str):
    """``(tokenizer, model)`` from ``from_pretrained(name)``: a sequence classifier when the
    config's ``architectures`` name one, an encoder-decoder (sequence-to-sequence) model when
    the config is one, else a causal language model; in eval mode."""
    try:
        import transformers
    except ImportError:
        raise UsageError("explain-text needs the transformers package: pip install transformers") from None
    try:
        config = transformers.AutoConfig.from_pretrained(name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or ()))
        auto = transformers.AutoModelForSequenceClassification if classifier else \
            transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
        model = auto.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"cannot load model '{name}': {first_line(error)}") from None
    return tokenizer, model.eval()


def convert_text_model(model: nn.Module) -> nn.Module:
    """``lrpx.convert`` of a language model (the token embeddings are computed outside the
    explained forward, position embeddings absorb relevance like biases)."""
    from .. import Composite, UnsupportedModuleError, convert

    try:
        return convert(model, Composite())
    except UnsupportedModuleError as error:
        lines = [line.strip() for line in str(error).splitlines()[1:] if line.startswith("  ")]
        raise UsageError(f"lrpx cannot convert {type(model).__name__} yet; no LRP rule for: {'; '.join(lines[:6])}"
                         + (f" (and {len(lines) - 6} more)" if len(lines) > 6 else "")) from None


def resolve_target(target: str | None, tokenizer, size: int, classifier: bool) -> int | None:
    """The id (or class) of ``--target``: digits are an id; a string must be one token."""
    if target is None:
        return None
    what = "classes" if classifier else "token ids"
    if target.strip().lstrip("-").isdigit():
        value = int(target)
        if not 0 <= value < size:
            raise UsageError(f"--target {value} is out of range: the model has {size} {what} (0..{size - 1})")
        return value
    if classifier:
        raise UsageError(f"--target '{target}' must be a class index (0..{size - 1}) for a sequence classifier")
    vocabulary = tokenizer.get_vocab()
    if target in vocabulary:
        return int(vocabulary[target])
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise UsageError(f"--target '{target}' is {len(ids)} tokens {pieces}, not one; give a single token or its id")
    return int(ids[0])


def run_explain_text(args: argparse.Namespace) -> int:
    """Check the arguments, load and convert the model, explain, write the files."""
    check_out(args.out)
    where = device(args.device)
    if not args.text.strip():
        raise UsageError("--text is empty")
    tokenizer, model = load_text_model(args.model)
    model = model.to(where)
    encoded = tokenizer(args.text, return_tensors="pt")
    ids = encoded["input_ids"].to(where)
    mask = encoded.get("attention_mask")
    mask = None if mask is None else mask.to(where)
    if ids.shape[1] == 0:
        raise UsageError(f"the tokenizer turned --text '{args.text}' into no tokens")
    decoder = _decoder_ids(args, tokenizer, model, where)
    with torch.no_grad():
        logits = model_logits(model(input_ids=ids, attention_mask=mask, **decoder))
    classifier = logits.dim() == 2
    target = resolve_target(args.target, tokenizer, logits.shape[-1], classifier)
    length = logits.shape[1]
    if not classifier and not -length <= args.position < length:
        what = "decoder's" if decoder else "text's"
        raise UsageError(f"--position {args.position} is beyond the {what} {length} tokens "
                         f"(valid: 0..{length - 1}, or -{length}..-1)")
    lrp_model = convert_text_model(model)
    result = explain_tokens(lrp_model, ids, target, position=args.position, attention_mask=mask,
                            embedding=input_embedding(model), **decoder)
    return _write(args, tokenizer, model, ids, result, classifier, decoder.get("decoder_input_ids"))


def _decoder_ids(args: argparse.Namespace, tokenizer, model: nn.Module, where) -> dict:
    """``{"decoder_input_ids": (1, S)}`` of an encoder-decoder model: its start token and the
    tokens of ``--decoder-text``; ``{}`` for other models."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        if args.decoder_text is not None:
            raise UsageError(f"--decoder-text is for encoder-decoder models (T5, BART); {type(model).__name__} is "
                             "not one")
        return {}
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:  # newer configs keep it in the generation config
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    if isinstance(start, (list, tuple)):
        start = start[0] if start else None
    if start is None:
        raise UsageError(f"{type(model).__name__} names no decoder_start_token_id (in its config or generation "
                         "config) to start its output with")
    rest = tokenizer(args.decoder_text, add_special_tokens=False)["input_ids"] if args.decoder_text else []
    return {"decoder_input_ids": torch.tensor([[int(start), *rest]], device=where)}


def _write(args: argparse.Namespace, tokenizer, model: nn.Module, ids: torch.Tensor, result: TokenExplanation,
           classifier: bool, decoder_ids: torch.Tensor | None = None) -> int:
    out = out_dir(args.out)
    tokens = token_strings(ids[0], tokenizer)
    relevance = result.relevance[0].double()
    extra: dict = {}
    shown, shown_relevance = tokens, relevance
    if decoder_ids is not None:  # the source, an arrow, the decoder's tokens
        decoder_tokens = token_strings(decoder_ids[0], tokenizer)
        decoder_relevance = result.decoder_relevance[0].double()
        extra = {"decoder_tokens": decoder_tokens, "decoder_ids": decoder_ids[0].tolist(),
                 "decoder_relevance": decoder_relevance.tolist()}
        shown = [*tokens, "→", *decoder_tokens]
        shown_relevance = torch.cat([relevance, relevance.new_zeros(1), decoder_relevance])
    target = int(result.target[0])
    logit = float(result.score[0])
    if classifier:
        labels = getattr(getattr(model, "config", None), "id2label", None) or {}
        name = str(labels.get(target, f"class {target}"))
        title = f"class {target} '{name}' (logit {logit:.4g})"
    else:
        name = token_strings([target], tokenizer)[0]
        after = "decoder position" if decoder_ids is not None else "position"
        title = f"next token '{name}' (id {target}, logit {logit:.4g}) after {after} {int(result.position[0])}"
    save_html(out / "tokens.html", shown, shown_relevance, title=title)
    record = {"model": args.model, "text": args.text, "tokens": tokens, "ids": ids[0].tolist(),
              "relevance": relevance.tolist(), "target": {"id": target, "token": name}, "logit": logit,
              "position": None if result.position is None else int(result.position[0]), **extra}
    (out / "relevance.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    color = {"always": True, "never": False}.get(args.color, use_colour())
    print(terminal_heatmap(shown, shown_relevance, color=color))
    print(f"explained {title}; relevance sum {float(shown_relevance.sum()):.4g}; wrote {out / 'tokens.html'} and "
          f"{out / 'relevance.json'}")
    return 0
