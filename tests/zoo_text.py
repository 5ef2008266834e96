"""Tiny random-weight Hugging Face transformers models, and an account of the relevance every
LRP operation absorbs, written out from the rules' definitions (docs/rules.md, AttnLRP).

``tests/zoo.py``'s ``Recorder`` sees the twins (modules); models whose forward code takes its
rules at run time apply them through operations, not modules. :class:`OpRecorder` records
every call of the one autograd Function of lrpx instead (and the score bias of attention), so
it sees both.
"""
from __future__ import annotations

import torch
from torch import nn

import lrpx
from lrpx import ops
from lrpx.core import LRPFunction
from lrpx.layers import sdpa as attention_layers
from zoo import sdpa_absorbed

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 100


def sign0(z):
    return torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def stab(z, e):
    return z + e * sign0(z)


def _decoder(config_cls, **extra):
    def build(attn: str):
        config = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            pad_token_id=0, **extra)
        config._attn_implementation = attn
        if hasattr(config, "_experts_implementation"):  # the loop over experts (grouped_mm has no float64)
            config._experts_implementation = "eager"
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float64)
    return build


def _gpt2(attn: str):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    config._attn_implementation = attn
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float64)


def _encoder(config_cls, **extra):
    def build(attn: str):
        config = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64, num_labels=3, pad_token_id=0,
                            **extra)
        config._attn_implementation = attn
        return transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float64)
    return build


def _distilbert(attn: str):
    config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                                           max_position_embeddings=64, num_labels=3, pad_token_id=0)
    config._attn_implementation = attn
    return transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float64)


def _with_attention(config, make):
    """A builder: ``make(config)`` with the attention implementation set."""
    def build(attn: str):
        config._attn_implementation = attn
        return make(config)
    return build


def _causal(config):
    return _with_attention(config, lambda c: transformers.AutoModelForCausalLM.from_config(c, dtype=torch.float64))


def _seq2seq(config):
    return _with_attention(config, lambda c: transformers.AutoModelForSeq2SeqLM.from_config(c, dtype=torch.float64))


def _image_classifier(config, cls):
    return _with_attention(config, lambda c: cls(c).double())


#: the image token of the vision-language models here (the last id of the vocabulary)
IMAGE_TOKEN = VOCAB - 1


def _tiny_vision(config_cls=None, patch_size=8):
    config_cls = config_cls or transformers.CLIPVisionConfig
    return config_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=32, patch_size=patch_size)


def _tiny_text(config_cls, **extra):
    return config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, **extra)


def _vlm(make_config, cls):
    def build(attn: str):
        config = make_config()
        config._attn_implementation = attn
        for name in getattr(config, "sub_configs", {}):
            getattr(config, name)._attn_implementation = attn
        model = cls(config).double()
        with torch.no_grad():  # projections that transformers initialises to zeros: random, so images matter
            for p in model.parameters():
                if p.dim() >= 2 and not p.any():
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
        return model
    return build


def vlm_inputs(name: str, model: nn.Module, seed: int = 1) -> dict:
    """One prompt with one image: two text tokens, the image's tokens, three text tokens; the
    model's own keyword arguments for it (Qwen2-VL: the image grid, the token types and the
    multimodal rotary positions, which it computes from input_ids only)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, VOCAB - 20, (1, 5), generator=g)
    if name == "qwen2_vl":  # a 16 px image in 4 px patches, 2 x 2 merged: 4 tokens; patches flattened
        start, end = model.config.vision_start_token_id, model.config.vision_end_token_id
        ids = torch.cat([text[:, :2], torch.tensor([[start] + [IMAGE_TOKEN] * 4 + [end]]), text[:, 2:]], 1)
        grid = torch.tensor([[1, 4, 4]])
        types = (ids == IMAGE_TOKEN).long()
        positions = model.model.get_rope_index(ids, image_grid_thw=grid, mm_token_type_ids=types)[0]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": torch.randn(16, 3 * 2 * 4 * 4, generator=g, dtype=torch.float64),
                "image_grid_thw": grid, "mm_token_type_ids": types, "position_ids": positions}
    count = getattr(model.config, "mm_tokens_per_image", None) or 16  # (32 / 8) ** 2 patches
    ids = torch.cat([text[:, :2], torch.full((1, count), IMAGE_TOKEN), text[:, 2:]], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(1, 3, 32, 32, generator=g, dtype=torch.float64)}


def _vision(config_cls, auto, **extra):
    def build(attn: str):
        config = config_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, num_channels=3, **extra)
        config._attn_implementation = attn
        return auto.from_config(config, dtype=torch.float64) if hasattr(auto, "from_config") else auto(config).double()
    return build


def families() -> dict:
    """``{name: (builder(attn) -> model, kind, attention implementations)}``; kind is "causal",
    "encoder", "seq2seq", "vlm" (a causal LM given an image, inputs from :func:`vlm_inputs`) or
    "vision"."""
    t = transformers
    both = ("eager", "sdpa")
    found = {
        "llama": (_decoder(t.LlamaConfig), "causal", both),
        "mistral": (_decoder(t.MistralConfig, sliding_window=None), "causal", both),
        "qwen2": (_decoder(t.Qwen2Config), "causal", both),
        "qwen3": (_decoder(t.Qwen3Config, head_dim=8), "causal", both),
        "qwen3_moe": (_decoder(t.Qwen3MoeConfig, head_dim=8, moe_intermediate_size=32, num_experts=4,
                               num_experts_per_tok=2, decoder_sparse_step=1), "causal", both),
        # transformers refuses sdpa for Gemma 2 itself
        "gemma2": (_decoder(t.Gemma2Config, head_dim=8, sliding_window=16), "causal", ("eager",)),
        "gemma3": (_decoder(t.Gemma3TextConfig, head_dim=8, sliding_window=16), "causal", both),
        "phi3": (_decoder(t.Phi3Config), "causal", both),
        "gpt2": (_gpt2, "causal", both),
        "mixtral": (_decoder(t.MixtralConfig, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
                    "causal", both),
        "qwen2_moe": (_decoder(t.Qwen2MoeConfig, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                               num_experts=4, num_experts_per_tok=2), "causal", both),
        "gemma": (_decoder(t.GemmaConfig, head_dim=8), "causal", both),
        "olmo": (_decoder(t.OlmoConfig), "causal", both),
        "olmo2": (_decoder(t.Olmo2Config), "causal", both),
        "cohere": (_decoder(t.CohereConfig), "causal", both),
        "granite": (_decoder(t.GraniteConfig), "causal", both),
        "smollm3": (_decoder(t.SmolLM3Config), "causal", both),
        "stablelm": (_decoder(t.StableLmConfig), "causal", both),
        "starcoder2": (_decoder(t.Starcoder2Config, sliding_window=None), "causal", both),
        "phi": (_decoder(t.PhiConfig), "causal", both),
        "gpt_neox": (_decoder(t.GPTNeoXConfig), "causal", both),
        "gptj": (_causal(t.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64,
                                      pad_token_id=0)), "causal", both),
        "falcon": (_causal(t.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_kv_heads=2, new_decoder_architecture=True, pad_token_id=0)),
                   "causal", both),
        "opt": (_causal(t.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                    pad_token_id=0)), "causal", both),
        # transformers has no sdpa for BLOOM (ALiBi) or DeBERTa-v2
        "bloom": (_causal(t.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0)),
                  "causal", ("eager",)),
        "bert": (_encoder(t.BertConfig), "encoder", both),
        "roberta": (_encoder(t.RobertaConfig), "encoder", both),
        "distilbert": (_distilbert, "encoder", both),
        "xlm_roberta": (_encoder(t.XLMRobertaConfig), "encoder", both),
        "electra": (_encoder(t.ElectraConfig, embedding_size=32), "encoder", both),
        "albert": (_encoder(t.AlbertConfig, embedding_size=16), "encoder", both),
        "deberta_v2": (_encoder(t.DebertaV2Config), "encoder", ("eager",)),
        "modernbert": (_encoder(t.ModernBertConfig), "encoder", both),
        "t5": (_seq2seq(t.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)), "seq2seq", both),
        "bart": (_seq2seq(t.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                       decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0,
                                       bos_token_id=2, eos_token_id=1, decoder_start_token_id=2,
                                       forced_eos_token_id=None, scale_embedding=True)), "seq2seq", both),
        "llava": (_vlm(lambda: t.LlavaConfig(vision_config=_tiny_vision(), text_config=_tiny_text(t.LlamaConfig),
                                             image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
                                             vision_feature_select_strategy="default"),
                       t.LlavaForConditionalGeneration), "vlm", both),
        "paligemma": (_vlm(lambda: t.PaliGemmaConfig(vision_config=_tiny_vision(t.SiglipVisionConfig),
                                                     text_config=_tiny_text(t.GemmaConfig, head_dim=8),
                                                     image_token_index=IMAGE_TOKEN, projection_dim=32,
                                                     hidden_size=32),
                           t.PaliGemmaForConditionalGeneration), "vlm", both),
        "gemma3_vlm": (_vlm(lambda: t.Gemma3Config(vision_config=_tiny_vision(t.SiglipVisionConfig, 4),
                                                   text_config=_tiny_text(t.Gemma3TextConfig, head_dim=8,
                                                                          sliding_window=16),
                                                   mm_tokens_per_image=16, image_token_index=IMAGE_TOKEN,
                                                   boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2),
                            t.Gemma3ForConditionalGeneration), "vlm", both),
        "qwen2_vl": (_vlm(lambda: t.Qwen2VLConfig(
            text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, pad_token_id=0),
            vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                               spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
            image_token_id=IMAGE_TOKEN, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3,
            vision_end_token_id=VOCAB - 4), t.Qwen2VLForConditionalGeneration), "vlm", both),
        "vit": (_vision(t.ViTConfig, t.ViTForImageClassification, num_labels=3), "vision", both),
        "deit": (_vision(t.DeiTConfig, t.DeiTForImageClassification, num_labels=3), "vision", both),
        "clip_vision": (_vision(t.CLIPVisionConfig, t.CLIPVisionModel), "vision", both),
        "siglip_vision": (_vision(t.SiglipVisionConfig, t.SiglipVisionModel), "vision", both),
        "dinov2": (_vision(t.Dinov2Config, t.Dinov2Model), "vision", both),
        "beit": (_vision(t.BeitConfig, t.BeitForImageClassification, num_labels=3), "vision", both),
        "swin": (_image_classifier(t.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                num_heads=[2, 4], window_size=4, num_labels=3),
                                   t.SwinForImageClassification), "vision", both),
        "convnext": (_image_classifier(t.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                                        num_labels=3), t.ConvNextForImageClassification),
                     "vision", ("eager",)),
        "segformer": (_image_classifier(t.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                                          hidden_sizes=[8, 16], num_attention_heads=[1, 2],
                                                          decoder_hidden_size=16, num_labels=3, patch_sizes=[7, 3],
                                                          strides=[4, 2]), t.SegformerForImageClassification),
                      "vision", ("eager",)),
    }
    return found


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero biases and norm weights away from 1 (Hugging Face initialises biases to 0 and
    norm weights to 1 or 0, which hides bias and scaling errors); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            elif "norm" in name.lower() and p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model.eval()


class OpRecorder:
    """Records every LRP operation (``LRPFunction`` calls and the score bias of attention):
    its description, rule, inputs, output, whether each input carries relevance, and the
    relevance that reaches its output. ``total_absorbed()`` sums what each gives to nothing
    that carries relevance, from the rule's definition. A context manager."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        original = LRPFunction.apply  # Function.apply, bound to LRPFunction
        self._biased = attention_layers._biased
        attend = attention_layers._Attention.apply
        recorder = self

        def apply(layer, rule, relu, weight, bias, *inputs):
            output = original(layer, rule, relu, weight, bias, *inputs)
            recorder._record("op", layer, rule, inputs, output, weight, bias)
            return output

        def biased(scores, bias, epsilon):
            output = recorder._biased(scores, bias, epsilon)
            recorder._record("biased", None, epsilon, (scores, bias), output, None, None)
            return output

        def attention(query, key, value, mask, is_causal, scale, enable_gqa, epsilon):
            output = attend(query, key, value, mask, is_causal, scale, enable_gqa, epsilon)
            recorder._record("attention", (mask, is_causal, scale), epsilon, (query, key, value), output, None, None)
            return output

        LRPFunction.apply = staticmethod(apply)
        attention_layers._Attention.apply = staticmethod(attention)
        attention_layers._biased = biased
        return self

    def __exit__(self, *exc):
        del LRPFunction.apply  # Function.apply again
        del attention_layers._Attention.apply
        attention_layers._biased = self._biased
        return False

    def _record(self, what, layer, rule, inputs, output, weight, bias):
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        entry = {"what": what, "layer": layer, "rule": rule, "inputs": tuple(t.detach() for t in inputs),
                 "carries": tuple(t.requires_grad for t in inputs), "output": output.detach(), "relevance": None,
                 "weight": None if weight is None else weight.detach(), "bias": None if bias is None else bias.detach()}
        self.calls.append(entry)
        output.register_hook(lambda grad, e=entry: e.__setitem__("relevance", grad))

    def total_absorbed(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for c in self.calls:
            if c["relevance"] is not None:
                total = total + absorbed(c).double()
        return total


def absorbed(c: dict) -> torch.Tensor:
    """Sum of a call's output relevance minus the relevance its rule gives to the inputs that
    carry relevance, from the rules' definitions."""
    R, z, layer, rule = c["relevance"].double(), c["output"].double(), c["layer"], c["rule"]
    xs = [t.double() for t in c["inputs"]]
    carries = c["carries"]
    if c["what"] == "attention":  # the rules of scaled dot-product attention, written out
        mask, is_causal, scale = layer
        if mask is not None and mask.is_floating_point():
            mask = mask.double()
        return sdpa_absorbed(*xs, R, mask, is_causal, scale, rule)
    if c["what"] == "biased":  # scores + bias: the scores take s R / stab(s + b) where b != 0
        scores, bias = xs
        share = torch.where(bias == 0, 1.0, scores / stab(z, rule)).to(R.dtype)
        return R.sum() - (R * share).sum()
    if isinstance(layer, ops.ElementwiseOps):
        return R.sum() * 0
    if isinstance(layer, (ops.LinearOps, ops.ConvOps)) and isinstance(rule, lrpx.rules.Epsilon):
        b = 0 if c["bias"] is None else c["bias"].double()
        if isinstance(layer, ops.ConvOps) and c["bias"] is not None:
            b = b.view(1, -1, *([1] * (z.dim() - 2)))
        return R.sum() - (R * (z - b) / stab(z, rule.epsilon)).sum()
    if isinstance(layer, (ops.WeightMatmulOps, ops.AvgPoolOps, ops.AdaptiveAvgPoolOps)) and \
            isinstance(rule, (lrpx.rules.Epsilon, lrpx.rules.Norm)):  # linear maps without bias
        return R.sum() - (R * z / stab(z, rule.epsilon)).sum()
    if isinstance(layer, ops.SumOps):
        share = R / stab(z, rule.epsilon)
        return R.sum() - sum((x * share).sum() for x, k in zip(xs, carries) if k)
    if isinstance(layer, ops.IndexAddOps):  # base + source placed at index: in proportion
        share = R / stab(z, rule.epsilon)
        parts = (xs[0] * share, xs[1] * share.index_select(layer.dim, layer.index))
        return R.sum() - sum(p.sum() for p, k in zip(parts, carries) if k)
    if isinstance(layer, ops.MeanOps):  # a linear map without bias: sum_i x_i ds/dx_i = z
        return R.sum() - (R * z / stab(z, rule.epsilon)).sum()
    if isinstance(layer, ops.ProductOps):  # all to the signal, or half each
        if layer.signal is not None:
            return R.sum() * (0 if carries[layer.signal] else 1)
        return R.sum() * sum(0.5 for k in carries if not k)
    if isinstance(layer, ops.MatmulOps):
        a, b = xs
        S = R / stab(2 * z, rule.epsilon)
        r_a = a * (S @ b.transpose(-2, -1))
        r_b = b * (a.transpose(-2, -1) @ S)
        return R.sum() - sum(r.sum() for r, k in zip((r_a, r_b), carries) if k)
    if isinstance(layer, ops.SoftmaxOps):
        (x,) = xs
        r_x = x * (R - z * R.sum(layer.dim, keepdim=True))
        return R.sum() - torch.where(torch.isinf(x), 0.0, r_x).sum()
    if isinstance(layer, ops.LayerNormOps):
        (x,) = xs
        dims = tuple(range(-len(layer.normalized_shape), 0))
        c_ = x - x.mean(dims, keepdim=True)
        b = 0 if c["bias"] is None else c["bias"].double()
        r_n = (z - b) * R / stab(z, rule.epsilon)
        return R.sum() - (r_n * c_ / stab(c_, rule.epsilon)).sum()
    raise NotImplementedError(type(layer))


def cache_tensors(cache) -> list[torch.Tensor]:
    """The cached keys and values of a transformers cache, made leaves that require grad (in
    place), so that the relevance they receive can be read."""
    found = []
    for layer in cache.layers:
        for attr in ("keys", "values"):
            t = getattr(layer, attr, None)
            if isinstance(t, torch.Tensor):
                t = t.detach().requires_grad_()
                setattr(layer, attr, t)
                found.append(t)
    return found


def explain_tokens(lrp: nn.Module, input_ids, attention_mask=None, position: int = -1, extra=(),
                   decoder_input_ids=None, pixel_values=None, **kwargs):
    """(relevance of the input embeddings, explained logit sum, absorbed relevance) of the
    top logit at ``position`` (causal models, or the decoder of an encoder-decoder model given
    ``decoder_input_ids``) or of the class logits (sequence classifiers), by the contract of
    lrpx's token explanations: embeddings looked up, passed as ``inputs_embeds`` (and
    ``decoder_inputs_embeds``); grad_outputs the logit value, one-hot. The relevance that reaches
    the tensors ``extra`` (a cache's keys and values) counts as absorbed. With a decoder, the
    relevance returned is that of both embeddings, flattened and joined; with ``pixel_values``
    (a vision-language model), that of the embeddings and the pixels."""
    embeds = [lrp.get_input_embeddings()(input_ids).detach().requires_grad_()]
    if decoder_input_ids is not None:
        embeds.append(lrp.get_decoder().get_input_embeddings()(decoder_input_ids).detach().requires_grad_())
        kwargs["decoder_inputs_embeds"] = embeds[1]
    if pixel_values is not None:
        embeds.append(pixel_values.detach().clone().requires_grad_())
        kwargs["pixel_values"] = embeds[-1]
    with OpRecorder() as rec:
        logits = lrp(inputs_embeds=embeds[0], attention_mask=attention_mask, **kwargs).logits
    y = logits[:, position] if logits.dim() == 3 else logits
    rows = torch.arange(len(y))
    target = y.detach().argmax(-1)
    grad = torch.zeros_like(y)
    grad[rows, target] = y.detach()[rows, target]
    params = [p for p in lrp.parameters() if p.requires_grad] + list(extra)
    *rel, = torch.autograd.grad(y, embeds + params, grad, allow_unused=True)
    rel, param_rel = rel[:len(embeds)], rel[len(embeds):]
    rel = rel[0] if len(rel) == 1 else torch.cat([r.flatten() for r in rel])
    by_parameters = sum((g.double().sum() for g in param_rel if g is not None), torch.zeros((), dtype=torch.float64))
    return rel, grad.sum(), (rec.total_absorbed() + by_parameters).detach()


def explain_pixels(lrp: nn.Module, pixels):
    """(relevance of the pixels, explained logit sum, absorbed relevance) of the top class or,
    for a model without classes, of the sum of the pooled output."""
    x = pixels.clone().requires_grad_()
    with OpRecorder() as rec:
        out = lrp(pixel_values=x)
    y = out.logits if hasattr(out, "logits") and out.logits is not None else out.pooler_output
    rows = torch.arange(len(y))
    target = y.detach().argmax(-1)
    grad = torch.zeros_like(y)
    grad[rows, target] = y.detach()[rows, target]
    params = [p for p in lrp.parameters() if p.requires_grad]
    rel, *param_rel = torch.autograd.grad(y, [x] + params, grad, allow_unused=True)
    by_parameters = sum((g.double().sum() for g in param_rel if g is not None), torch.zeros((), dtype=torch.float64))
    return rel, grad.sum(), (rec.total_absorbed() + by_parameters).detach()
