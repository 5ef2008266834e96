"""Hugging Face transformers models convert with no code of their own: tiny float64 configs with
random weights, eager and sdpa attention, padding masks and the KV cache.

For each family: the converted forward equals the original's; the relevance of the input
embeddings (or pixels) is finite; and it accounts for the explained logit: token relevance
plus what every LRP operation absorbs (biases, stabilizers, position embeddings, the softmax
rule's non-conserved part), each written out from the rule's definition in tests/zoo_text.py,
equals the logit.
"""
from __future__ import annotations

import copy

import pytest
import torch

import lrpx

from zoo_text import VOCAB, cache_tensors, explain_pixels, explain_tokens, families, randomized, vlm_inputs

transformers = pytest.importorskip("transformers")

FAMILIES = families()
FAST = {"llama", "gpt2", "bert"}
#: families convert refuses
REFUSED: set[str] = set()
CASES = [pytest.param(name, attn, id=f"{name}-{attn}",
                      marks=() if name in FAST else pytest.mark.slow)
         for name, (_, _, attns) in FAMILIES.items() for attn in attns if name not in REFUSED]


#: families whose LayerNorm computes in float32 inside a float64 model (OLMo's, Cohere's): the
#: centring takes its rule in float32, so the relevance crossing it is rounded to float32
FLOAT32_NORMS = {"olmo", "cohere"}


def _bound(name: str) -> float:
    """1e-8 of the logit for every family but :data:`FLOAT32_NORMS` (1e-7, measured 2e-8 to
    4e-8). RMSNorm computes in float32 inside a float64 model (as transformers writes it); its
    relevance skips that round trip (``lrpx.precision``), so it is not rounded to float32
    (measured 1e-16 to 5e-11; before, up to 1.8e-8)."""
    return 1e-7 if name in FLOAT32_NORMS else 1e-8


def _model(name: str, attn: str, seed: int = 0):
    build, kind, _ = FAMILIES[name]
    torch.manual_seed(seed)
    return randomized(build(attn), seed), kind


def _inputs(kind: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if kind == "vision":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)}
    ids = torch.randint(1, VOCAB, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0  # the second sequence is padded at its end
    if kind == "seq2seq":  # the decoder's output so far: 5 tokens
        return {"input_ids": ids, "attention_mask": mask,
                "decoder_input_ids": torch.randint(1, VOCAB, (2, 5), generator=g)}
    return {"input_ids": ids, "attention_mask": mask}


def _without_mask(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k != "attention_mask"}


def _output(out):
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.pooler_output


def _close(a, b, rtol=1e-8):
    assert torch.isfinite(a).all()
    error = float((a - b).abs().max() / b.abs().max())
    assert error <= rtol, f"relative error {error:.2e}"


@pytest.mark.parametrize("name, attn", CASES)
def test_family_converts_and_accounts_for_relevance(name, attn):
    model, kind = _model(name, attn)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lrp = lrpx.convert(model)
    inputs = vlm_inputs(name, model) if kind == "vlm" else _inputs(kind)
    with torch.no_grad():
        _close(_output(lrp(**inputs)), _output(model(**inputs)))
        if kind != "vision":  # without a mask, too
            _close(_output(lrp(**_without_mask(inputs))), _output(model(**_without_mask(inputs))))
    if kind == "vision":
        rel, logit, absorbed = explain_pixels(lrp, inputs["pixel_values"])
    else:  # position 4: the last one that is not padding in both sequences (or of the decoder's 5)
        rel, logit, absorbed = explain_tokens(lrp, position=-1 if kind == "vlm" else 4, **inputs)
    assert torch.isfinite(rel).all() and rel.abs().sum() > 0
    error = float((rel.sum() + absorbed - logit).abs() / logit.abs())
    assert error <= _bound(name), f"{name}/{attn}: accounting error {error:.2e}"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in lrp.parameters())


@pytest.mark.parametrize("name, attn", [c for c in CASES if FAMILIES[c.values[0]][1] == "causal"])
def test_kv_cache_gives_the_same_outputs(name, attn):
    """Two calls, the second with the cache of the first: the converted model's logits equal the
    original's; the relevance of the new tokens is finite and accounts for the logit together
    with what reaches the cached keys and values (the share of the earlier tokens)."""
    model, _ = _model(name, attn)
    lrp = lrpx.convert(model)
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first = model(input_ids=ids[:, :4], use_cache=True)
        first_lrp = lrp(input_ids=ids[:, :4], use_cache=True)
        _close(first_lrp.logits, first.logits)
        second = model(input_ids=ids[:, 4:], past_key_values=first.past_key_values, use_cache=True)
    cache = copy.deepcopy(first_lrp.past_key_values)
    with torch.no_grad():
        second_lrp = lrp(input_ids=ids[:, 4:], past_key_values=first_lrp.past_key_values, use_cache=True)
    _close(second_lrp.logits, second.logits)
    mask = torch.ones(2, 7, dtype=torch.long)
    rel, logit, absorbed = explain_tokens(lrp, ids[:, 4:], mask, extra=cache_tensors(cache), past_key_values=cache,
                                          use_cache=True)
    assert rel.shape == (2, 3, lrp.config.hidden_size) and torch.isfinite(rel).all()
    error = float((rel.sum() + absorbed - logit).abs() / logit.abs())
    assert error <= _bound(name), f"{name}/{attn}: accounting error {error:.2e}"


def test_embeddings_contract_matches_input_ids():
    """Looking the embeddings up and passing them as inputs_embeds gives the outputs of
    input_ids; the embedding table gets no gradient."""
    model, _ = _model("llama", "sdpa")
    lrp = lrpx.convert(model)
    ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    embeds = lrp.get_input_embeddings()(ids)
    assert not embeds.requires_grad
    torch.testing.assert_close(lrp(inputs_embeds=embeds).logits, model(input_ids=ids).logits, rtol=0, atol=0)


class _CumulativeActivation(torch.nn.Module):
    def forward(self, x):
        return x.cumsum(-1)


def test_unsupported_modules_are_named_with_path_and_type():
    """An operation without a rule in a module's forward (here ``cumsum`` in place of the MLP's
    activation) is refused, naming the module's path, its class and the operation."""
    model, _ = _model("llama", "sdpa")
    model.model.layers[1].mlp.act_fn = _CumulativeActivation()
    with pytest.raises(lrpx.UnsupportedModuleError) as info:
        lrpx.convert(model)
    message = str(info.value)
    assert "'model.layers.1.mlp.act_fn' (test_transformers._CumulativeActivation)" in message
    assert "applies cumsum to values computed from the input" in message
    assert [name for name, _ in info.value.modules] == ["model.layers.1.mlp.act_fn"]


def test_grouped_experts_are_refused_at_run_time():
    """transformers' grouped matrix product of experts has no rule: calling the converted model
    with it raises, saying what to set instead."""
    model, _ = _model("qwen3_moe", "sdpa")
    model.config._experts_implementation = "grouped_mm"
    lrp = lrpx.convert(model.float())
    embeds = lrp.get_input_embeddings()(torch.tensor([[1, 2, 3]])).requires_grad_()
    with pytest.raises(NotImplementedError, match="_experts_implementation = 'eager'"):
        lrp(inputs_embeds=embeds)


def _token_relevance(lrp, ids, target=None):
    """Relevance of the embeddings for the top logit (or ``target``) of the last position."""
    embeds = lrp.get_input_embeddings()(ids).detach().requires_grad_()
    y = lrp(inputs_embeds=embeds).logits
    y = y[:, -1] if y.dim() == 3 else y
    target = y.detach().float().argmax(-1) if target is None else target
    grad = torch.zeros_like(y)
    rows = torch.arange(len(y))
    grad[rows, target] = y.detach()[rows, target]
    y.backward(grad)
    return embeds.grad, target


#: relevance in half precision against float32, over 8 inputs per family (sdpa): the worst max
#: |R - R_float32| / max |R_float32| and the worst cosine similarity measured were
#: bfloat16: llama 1.4e-2 / 0.99995, gpt2 0.27 / 0.9945, bert 0.37 / 0.976;
#: float16: llama 3.2e-3 / 0.99999, gpt2 0.27 / 0.9947, bert 2.5e-2 / 0.99992.
#: Over every text family (the inputs of the test): bfloat16 cosine 0.976 (bert) to 1, the
#: others at least 0.9978 (phi); float16 at least 0.99995.
#: The rules compute in float32 (lrpx.core); the rest is the half-precision forward, whose
#: values the epsilon rule divides by where they are near 0.
HALF_COSINE = {torch.bfloat16: 0.95, torch.float16: 0.99}
HALF_LLAMA = {torch.bfloat16: 3e-2, torch.float16: 1e-2}


TEXT = [pytest.param(name, marks=() if name in FAST else pytest.mark.slow)
        for name, (_, kind, _) in FAMILIES.items() if kind in ("causal", "encoder")]


@pytest.mark.parametrize("dtype", list(HALF_COSINE), ids=str)
@pytest.mark.parametrize("name", TEXT)
def test_half_precision_relevance_agrees_with_float32(name, dtype):
    model, _ = _model(name, FAMILIES[name][2][-1])  # sdpa where the family has it
    model = model.float()
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    reference, target = _token_relevance(lrpx.convert(model), ids)
    half = copy.deepcopy(model).to(dtype)
    lrp = lrpx.convert(half)
    with torch.no_grad():
        out, expected = lrp(input_ids=ids).logits, half(input_ids=ids).logits
    assert float((out - expected).abs().max() / expected.abs().max()) <= 2 * torch.finfo(dtype).eps
    relevance, _ = _token_relevance(lrp, ids, target)
    assert relevance.dtype == dtype and torch.isfinite(relevance).all()
    cosine = float(torch.nn.functional.cosine_similarity(relevance.float().flatten(), reference.flatten(), 0))
    assert cosine >= HALF_COSINE[dtype], f"{name} {dtype}: cosine {cosine:.4f}"
    if name == "llama":
        error = float((relevance.float() - reference).abs().max() / reference.abs().max())
        assert error <= HALF_LLAMA[dtype], f"{name} {dtype}: {error:.2e}"


@pytest.mark.parametrize("name", sorted(FAST))
def test_gradient_checkpointing_gives_the_same_relevance(name):
    """transformers checkpoints in training mode only: the converted model in training mode
    with dropout off recomputes each layer's forward in backward (counted), and the relevance is
    the same as without checkpointing; parameters get no gradient."""
    model, _ = _model(name, "sdpa")
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(6))
    plain, target = _token_relevance(lrpx.convert(model), ids)
    lrp = lrpx.convert(model)
    lrp.gradient_checkpointing_enable()
    lrp.train()
    for module in lrp.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    calls = []
    layers = [m for m in lrp.modules() if isinstance(m, transformers.modeling_layers.GradientCheckpointingLayer)]
    inner = next(m for m in layers[0].modules() if isinstance(m, torch.nn.Linear))  # hooks inside the checkpoint
    handle = inner.register_forward_hook(lambda *args: calls.append(1))
    checkpointed, _ = _token_relevance(lrp, ids, target)
    handle.remove()
    assert len(calls) == 2  # once in forward, once more in backward
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)
    assert all(p.grad is None for p in lrp.parameters())


@pytest.mark.slow
def test_readme_table_is_current():
    from pathlib import Path

    from transformers_table import END, START, table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    stored = readme.split(START)[1].split(END)[0].strip()
    assert stored == table(list(FAMILIES)), \
        "README.md's transformers table is out of date: run python tests/transformers_table.py --write README.md"


@pytest.mark.parametrize("implementation", ["flex_attention", "flash_attention_2"])
def test_attention_kernels_without_rules_are_refused(implementation):
    model, _ = _model("llama", "sdpa")
    model.config._attn_implementation = implementation
    with pytest.raises(ValueError, match=f"'<root>' \\(LlamaForCausalLM\\) uses the attention implementation "
                                         f"'{implementation}'.*'eager' and 'sdpa'"):
        lrpx.convert(model)
