"""lrpx.explain_tokens and lrpx.explain_generated against hand-computed relevance."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lrpx
from toy_lm import BagClassifier, BagLM, BagSeq2Seq, ToyLM, converted, greedy, tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bag():
    torch.manual_seed(0)
    model = BagLM().double().eval()
    return model, converted(model)


def bag_reference(model, ids, mask, target, position):
    """Relevance of token s for logit k at position t: (W e_s)_k if s <= t and s is real, else 0."""
    embeds = model.embed.weight.detach().numpy()[ids.numpy()]  # (B, T, H)
    per_token = embeds @ model.head.weight.detach().numpy().T  # (B, T, V)
    batch, length = ids.shape
    out = np.zeros((batch, length))
    for b in range(batch):
        for s in range(length):
            if s <= position[b] and mask[b, s] == 1:
                out[b, s] = per_token[b, s, target[b]]
    return out


def test_bag_lm_relevance_is_each_tokens_share(bag):
    model, lrp_model = bag
    ids = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    result = lrpx.explain_tokens(lrp_model, ids, [7, 2], position=[-1, 2], attention_mask=mask)
    expected = bag_reference(model, ids, mask.numpy(), [7, 2], [4, 2])
    np.testing.assert_allclose(result.relevance.numpy(), expected, rtol=1e-4, atol=1e-9)
    assert result.position.tolist() == [4, 2]
    assert result.target.tolist() == [7, 2]
    logits = result.logits
    assert result.score.tolist() == [logits[0, 4, 7].item(), logits[1, 2, 2].item()]
    # no bias: the relevance of the real tokens sums to the explained logit
    np.testing.assert_allclose(result.relevance.sum(1).numpy(), result.score.numpy(), rtol=1e-4)
    assert result.embedding_relevance.shape == (2, 5, 6)


def test_padding_gets_exactly_zero(bag):
    _, lrp_model = bag
    ids = torch.tensor([[0, 0, 4, 1, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    result = lrpx.explain_tokens(lrp_model, ids, attention_mask=mask)
    assert (result.relevance[0, :2] == 0).all() and not torch.signbit(result.relevance[0, :2]).any()
    assert (result.embedding_relevance[0, :2] == 0).all()
    assert (result.relevance[0, 2:] != 0).all()


def test_default_target_is_top_id_and_unpacks(bag):
    _, lrp_model = bag
    ids = torch.tensor([2, 7, 1])  # one sequence without a batch dimension
    relevance, logits = lrpx.explain_tokens(lrp_model, ids)
    result = lrpx.explain_tokens(lrp_model, ids)
    assert relevance.shape == (1, 3) and logits.shape == (1, 3, 13)
    assert result.target.item() == int(np.argmax(logits[0, -1].numpy()))
    assert result.score.item() == logits[0, -1].max().item()


def test_sequence_classifier_relevance():
    torch.manual_seed(1)
    model = BagClassifier().double().eval()
    lrp_model = converted(model)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    result = lrpx.explain_tokens(lrp_model, ids, 2, attention_mask=mask, position=99)  # position is not used
    assert result.position is None and result.logits.shape == (2, 3)
    per_token = model.embed.weight.detach().numpy()[ids.numpy()] @ model.head.weight.detach().numpy()[2]
    np.testing.assert_allclose(result.relevance.numpy(), per_token * mask.numpy(), rtol=1e-4, atol=1e-9)


def test_batch_independence():
    torch.manual_seed(2)
    lrp_model = converted(ToyLM().eval())
    ids = torch.randint(0, 17, (3, 6))
    together = lrpx.explain_tokens(lrp_model, ids, [1, 2, 3], position=[5, 3, -2])
    for b, (t, p) in enumerate(zip([1, 2, 3], [5, 3, -2])):
        alone = lrpx.explain_tokens(lrp_model, ids[b:b + 1], t, position=p)
        torch.testing.assert_close(together.relevance[b:b + 1], alone.relevance)


def test_lrp_differs_from_gradient_times_logit():
    torch.manual_seed(3)
    model = ToyLM().eval()
    ids = torch.randint(0, 17, (1, 5))
    lrp = lrpx.explain_tokens(converted(model), ids, 4).relevance
    plain = lrpx.explain_tokens(model, ids, 4).relevance
    assert not torch.allclose(lrp, plain, atol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(position=5), "position 5 is beyond the sequence of 5 tokens"),
    (dict(position=-6), "position -6 is beyond"),
    (dict(target=13), "target 13 is outside the logits: the model has 13 token ids"),
    (dict(target=-1), "outside the logits"),
    (dict(target=1.5), "target must be an int"),
    (dict(attention_mask=torch.ones(1, 4)), "attention_mask has shape (1, 4), but input_ids has (1, 5)"),
    (dict(attention_mask=torch.full((1, 5), 2)), "only 0 (padding) and 1"),
])
def test_errors(bag, kwargs, message):
    _, lrp_model = bag
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        lrpx.explain_tokens(lrp_model, torch.tensor([[1, 2, 3, 4, 5]]), **kwargs)


def test_errors_of_ids_and_model(bag):
    _, lrp_model = bag
    with pytest.raises(ValueError, match=r"token id 20 is outside the vocabulary of 13 ids \(valid: 0..12\)"):
        lrpx.explain_tokens(lrp_model, torch.tensor([[1, 20, 3]]))
    with pytest.raises(ValueError, match="token id -2"):
        lrpx.explain_tokens(lrp_model, torch.tensor([[1, -2, 3]]))
    with pytest.raises(TypeError, match="integer token ids"):
        lrpx.explain_tokens(lrp_model, torch.tensor([[1.0, 2.0]]))
    with pytest.raises(TypeError, match="has no get_input_embeddings"):
        lrpx.explain_tokens(nn.Linear(2, 2), torch.tensor([[1, 2]]))

    class Ignores(nn.Module):  # reads nothing of inputs_embeds
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(4, 2)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, inputs_embeds, attention_mask=None):
            return torch.zeros(inputs_embeds.shape[0], 3)

    with pytest.raises(ValueError, match="do not depend on inputs_embeds"):
        lrpx.explain_tokens(Ignores(), torch.tensor([[1, 2]]))


def test_explain_generated_follows_greedy_decoding():
    torch.manual_seed(4)
    model = ToyLM().eval()
    lrp_model = converted(model)
    prompt = torch.tensor([[3, 5, 7], [2, 2, 9]])
    sequences = greedy(model, prompt, 4)
    for index in (3, 5, -1):
        result = lrpx.explain_generated(lrp_model, sequences, index)
        at = index % sequences.shape[1]
        assert torch.equal(result.target, sequences[:, at])
        assert result.relevance.shape == (2, at)
        # the generated token is the top logit of its prefix's last position
        torch.testing.assert_close(result.score, result.logits[:, -1].max(-1).values)
        direct = lrpx.explain_tokens(lrp_model, sequences[:, :at], sequences[:, at])
        torch.testing.assert_close(result.relevance, direct.relevance)
    with pytest.raises(ValueError, match="index 0 is outside"):
        lrpx.explain_generated(lrp_model, sequences, 0)


def test_explain_generated_with_transformers_generate():
    model = tiny_gpt2(5, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    prompt = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.ones_like(prompt)
    sequences = model.generate(prompt, attention_mask=mask, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    full_mask = torch.ones_like(sequences)
    result = lrpx.explain_generated(lrpx.convert(model), sequences, 4, attention_mask=full_mask)
    assert torch.equal(result.target, sequences[:, 4])
    torch.testing.assert_close(result.score, result.logits[:, -1].max(-1).values)
    assert result.relevance.shape == (2, 4) and result.logits.shape == (2, 4, 24)


def test_left_padding_of_gpt2_is_invisible():
    # the plain model (gradient x logit): the bookkeeping of positions is what is checked here
    model = tiny_gpt2(7, 20, pad_token_id=0, bos_token_id=0, eos_token_id=0, initializer_range=0.5)
    padded = lrpx.explain_tokens(model, torch.tensor([[0, 0, 5, 6, 7]]), 3,
                                 attention_mask=torch.tensor([[0, 0, 1, 1, 1]]))
    alone = lrpx.explain_tokens(model, torch.tensor([[5, 6, 7]]), 3)
    torch.testing.assert_close(padded.score, alone.score)
    torch.testing.assert_close(padded.relevance[:, 2:], alone.relevance)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_left_padding_of_a_converted_model_is_invisible(family, attention):
    """Left padding changes neither the score nor the real tokens' relevance: the converted
    model keeps ``forward``'s signature (so ``position_ids`` count the real tokens, as
    ``generate`` does), and queries that may attend to no key pass no relevance (no NaN)."""
    if family == "gpt2":
        model = tiny_gpt2(7, 20, pad_token_id=0, bos_token_id=0, eos_token_id=0, initializer_range=0.5)
        model.config._attn_implementation = attention
    else:
        import zoo_text
        model = zoo_text.randomized(zoo_text.families()["llama"][0](attention)).float()
    lrp_model = lrpx.convert(model)
    padded = lrpx.explain_tokens(lrp_model, torch.tensor([[0, 0, 5, 6, 7]]), 3,
                                 attention_mask=torch.tensor([[0, 0, 1, 1, 1]]))
    alone = lrpx.explain_tokens(lrp_model, torch.tensor([[5, 6, 7]]), 3)
    torch.testing.assert_close(padded.score, alone.score)
    assert torch.isfinite(padded.relevance).all() and (padded.relevance[:, :2] == 0).all()
    torch.testing.assert_close(padded.relevance[:, 2:], alone.relevance)


def test_a_converted_model_keeps_the_signature_of_forward():
    import inspect
    model = tiny_gpt2(7, 20)
    assert inspect.signature(lrpx.convert(model).forward) == inspect.signature(model.forward)


def test_explain_generated_of_left_padded_prompts():
    # generate numbers the positions of left-padded prompts by their real tokens; explaining its
    # tokens must see the same logits, so each generated token is the top one of its prefix
    # no end-of-sequence token: generate then takes the plain top token at every step
    model = tiny_gpt2(8, pad_token_id=1, bos_token_id=0, eos_token_id=None, initializer_range=0.5)
    prompt = torch.tensor([[1, 1, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    sequences = model.generate(prompt, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert sequences.shape == (2, 7)
    full_mask = torch.cat([mask, torch.ones(2, sequences.shape[1] - 4, dtype=mask.dtype)], dim=1)
    for index in range(4, sequences.shape[1]):  # the plain model: positions and targets are checked
        result = lrpx.explain_generated(model, sequences, index, attention_mask=full_mask)
        torch.testing.assert_close(result.score, result.logits[:, -1].max(-1).values)
        assert (result.relevance[0, :2] == 0).all()


def test_transformers_sequence_classifier():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(9)
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=16, num_labels=3,
                                     initializer_range=0.5)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.tensor([[2, 5, 7, 3, 0], [2, 9, 11, 12, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    result = lrpx.explain_tokens(model, ids, attention_mask=mask)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert result.position is None and result.relevance.shape == (2, 5)
    assert torch.equal(result.target, logits.argmax(1))
    torch.testing.assert_close(result.score, logits.max(1).values)
    assert result.relevance[0, 4] == 0
    with pytest.raises(ValueError, match="target 3 is outside the logits: the model has 3 classes"):
        lrpx.explain_tokens(model, ids, 3, attention_mask=mask)
    with pytest.raises(ValueError, match="token id 30 is outside the vocabulary of 30 ids"):
        lrpx.explain_tokens(model, torch.tensor([[2, 30]]))


def test_encoder_decoder_relevance_is_each_tokens_share():
    """Both the source tokens and the decoder's tokens so far get their share of the explained
    logit, by the closed form of :class:`BagSeq2Seq`."""
    torch.manual_seed(5)
    model = BagSeq2Seq().double().eval()
    lrp_model = converted(model)
    src = torch.tensor([[3, 1, 4, 1], [9, 2, 6, 5]])
    src_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    out = torch.tensor([[0, 7, 2], [0, 4, 4]])
    out_mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    result = lrpx.explain_tokens(lrp_model, src, [6, 1], position=[1, -1], attention_mask=src_mask,
                                 decoder_input_ids=out, decoder_attention_mask=out_mask)
    A = model.encoder_head.weight.detach().numpy() @ model.embed.weight.detach().numpy().T  # (V, vocabulary)
    B = model.decoder_head.weight.detach().numpy() @ model.decoder.embed.weight.detach().numpy().T
    expected_src = np.zeros((2, 4))
    expected_out = np.zeros((2, 3))
    for b, (k, t) in enumerate([(6, 1), (1, 2)]):
        for s_ in range(4):
            expected_src[b, s_] = A[k, src[b, s_]] * src_mask[b, s_].item()
        for u in range(t + 1):
            expected_out[b, u] = B[k, out[b, u]] * out_mask[b, u].item()
    np.testing.assert_allclose(result.relevance.numpy(), expected_src, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(result.decoder_relevance.numpy(), expected_out, rtol=1e-4, atol=1e-9)
    assert result.position.tolist() == [1, 2] and result.logits.shape == (2, 3, 11)
    np.testing.assert_allclose((result.relevance.sum(1) + result.decoder_relevance.sum(1)).numpy(),
                               result.score.numpy(), rtol=1e-4)
    assert result.decoder_embedding_relevance.shape == (2, 3, 5)
    # a decoder-only model has none
    assert lrpx.explain_tokens(converted(BagLM().double()), src).decoder_relevance is None


def test_encoder_decoder_errors():
    lrp_model = converted(BagSeq2Seq().double().eval())
    src, out = torch.tensor([[1, 2, 3]]), torch.tensor([[0, 4]])
    with pytest.raises(ValueError, match="BagSeq2Seq is an encoder-decoder model: pass decoder_input_ids"):
        lrpx.explain_tokens(lrp_model, src)
    with pytest.raises(ValueError, match="decoder_input_ids has 2 sequences, input_ids has 1"):
        lrpx.explain_tokens(lrp_model, src, decoder_input_ids=out.repeat(2, 1))
    with pytest.raises(ValueError, match=r"decoder_attention_mask has shape \(1, 3\), but decoder_input_ids has "
                                         r"\(1, 2\)"):
        lrpx.explain_tokens(lrp_model, src, decoder_input_ids=out, decoder_attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="token id 11 is outside the vocabulary of 11"):
        lrpx.explain_tokens(lrp_model, src, decoder_input_ids=torch.tensor([[0, 11]]))
    with pytest.raises(TypeError, match="decoder_input_ids must hold integer token ids"):
        lrpx.explain_tokens(lrp_model, src, decoder_input_ids=torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="position 2 is beyond the sequence of 2 tokens"):
        lrpx.explain_tokens(lrp_model, src, position=2, decoder_input_ids=out)
    bag = converted(BagLM().double())
    with pytest.raises(ValueError, match="decoder_input_ids is for encoder-decoder models .* BagLM is not one"):
        lrpx.explain_tokens(bag, src, decoder_input_ids=out)
    with pytest.raises(ValueError, match="decoder_attention_mask given without decoder_input_ids"):
        lrpx.explain_tokens(bag, src, decoder_attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="input_ids is for encoder-decoder models .* BagLM is not one"):
        lrpx.explain_generated(bag, torch.tensor([[1, 2, 3]]), 2, input_ids=src)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_explain_generated_of_an_encoder_decoder(family):
    """A token that ``generate`` wrote for a source is the top logit of the decoder's prefix
    before it; its relevance is that of explain_tokens on the source and that prefix."""
    import zoo_text
    model = zoo_text.randomized(zoo_text.families()[family][0]("sdpa")).float()
    lrp_model = lrpx.convert(model)
    src = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    sequences = model.generate(src, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    result = lrpx.explain_generated(lrp_model, sequences, 2, input_ids=src, attention_mask=mask)
    assert torch.equal(result.target, sequences[:, 2])
    torch.testing.assert_close(result.score, result.logits[:, -1].max(-1).values)
    assert result.relevance.shape == (2, 4) and result.decoder_relevance.shape == (2, 2)
    assert result.relevance[1, 3] == 0 and torch.isfinite(result.relevance).all()
    direct = lrpx.explain_tokens(lrp_model, src, sequences[:, 2], attention_mask=mask,
                                 decoder_input_ids=sequences[:, :2])
    torch.testing.assert_close(result.relevance, direct.relevance)
    torch.testing.assert_close(result.decoder_relevance, direct.decoder_relevance)
    with torch.no_grad():  # the original model's logits for that prefix
        logits = model(input_ids=src, attention_mask=mask, decoder_input_ids=sequences[:, :2]).logits[:, -1]
    torch.testing.assert_close(result.score, logits.max(-1).values, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="is an encoder-decoder model: pass input_ids, the encoder's input"):
        lrpx.explain_generated(lrp_model, sequences, 2)


def _vlm(name):
    import zoo_text
    model = zoo_text.randomized(zoo_text.families()[name][0]("sdpa"))
    return model, zoo_text.vlm_inputs(name, model)


def test_vision_language_model_gives_relevance_to_tokens_and_pixels():
    """LLaVA: the top next-token logit's relevance reaches the text tokens and the pixels
    (by the contract: embeddings and pixels as leaves, the logit's value as the initial
    relevance); the image tokens, whose embeddings the model replaces by the image's
    features, get none."""
    model, inputs = _vlm("llava")
    lrp_model = lrpx.convert(model)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    result = lrpx.explain_tokens(lrp_model, ids, pixel_values=pixels)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    x = pixels.clone().requires_grad_()
    logits = lrp_model(inputs_embeds=embeds, pixel_values=x).logits
    target = logits[0, -1].argmax()
    r_out = torch.zeros_like(logits)
    r_out[0, -1, target] = logits[0, -1, target].detach()
    r_embeds, r_pixels = torch.autograd.grad(logits, (embeds, x), r_out)
    torch.testing.assert_close(result.relevance, r_embeds.sum(-1), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(result.pixel_relevance, r_pixels, rtol=1e-12, atol=1e-15)
    assert result.pixel_relevance.shape == pixels.shape and r_pixels.abs().sum() > 0
    image = ids[0] == model.config.image_token_id
    assert (result.relevance[0, image] == 0).all() and (result.relevance[0, ~image] != 0).all()
    with torch.no_grad():
        assert result.score[0] == model(input_ids=ids, pixel_values=pixels).logits[0, -1].max()


def test_vision_language_model_takes_its_own_inputs():
    """Qwen2-VL computes its multimodal rotary positions from input_ids, which the
    explanation does not pass: given as ``inputs`` (with the image grid), the explained logit
    is the original model's."""
    model, inputs = _vlm("qwen2_vl")
    own = {k: inputs[k] for k in ("image_grid_thw", "mm_token_type_ids", "position_ids")}
    result = lrpx.explain_tokens(lrpx.convert(model), inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                 inputs=own)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(result.score[0], logits[0, -1].max(), rtol=1e-12, atol=0)
    assert torch.isfinite(result.pixel_relevance).all() and result.pixel_relevance.abs().sum() > 0


def test_vision_language_errors():
    model, inputs = _vlm("llava")
    ids = inputs["input_ids"]
    with pytest.raises(TypeError, match="pixel_values must be a floating-point tensor, got torch.int64"):
        lrpx.explain_tokens(model, ids, pixel_values=torch.zeros(1, 3, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="inputs may not hold 'attention_mask': explain_tokens sets it"):
        lrpx.explain_tokens(model, ids, inputs={"attention_mask": torch.ones_like(ids)})
    with pytest.raises(TypeError, match="inputs must map keyword names to values, got list"):
        lrpx.explain_tokens(model, ids, inputs=[1])


def _tiny_translator(name: str, **config):
    """A one-layer encoder-decoder of transformers' ``name`` (hidden size 16) that scales its
    embeddings, random weights from seed 0, and its conversion."""
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, f"{name}Config")(
        vocab_size=60, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        scale_embedding=True, **config)
    torch.manual_seed(0)
    model = getattr(transformers, {"Marian": "MarianMTModel"}.get(name, f"{name}ForConditionalGeneration"))(config)
    return model.eval(), lrpx.convert(model.eval())


def test_a_model_that_scales_the_embeddings_of_ids_itself_is_caught():
    """Marian's encoder multiplies the lookup of input_ids by embed_scale, but not embeddings
    it is given: explaining through inputs_embeds would explain another forward. That is an
    error that says what to do; with the scaled embedding, the explained logit is the model's."""
    model, lrp_model = _tiny_translator("Marian", pad_token_id=0, decoder_start_token_id=0)
    src, out = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[0, 9, 10]])
    with pytest.raises(ValueError, match="MarianMTModel computes other logits from the embeddings than from "
                                         "input_ids .*lrpx.text.ScaledEmbedding"):
        lrpx.explain_tokens(lrp_model, src, decoder_input_ids=out)
    encoder = lrp_model.get_encoder()
    scaled = lrpx.text.ScaledEmbedding(encoder.embed_tokens, encoder.embed_scale)
    result = lrpx.explain_tokens(lrp_model, src, decoder_input_ids=out, embedding=scaled)
    with torch.no_grad():
        logits = model(input_ids=src, decoder_input_ids=out).logits
    torch.testing.assert_close(result.score[0], logits[0, -1].max(), rtol=1e-6, atol=0)
    assert torch.isfinite(result.relevance).all() and result.relevance.abs().sum() > 0


def test_a_classifier_that_pools_by_input_ids_refuses_padding_at_the_end():
    """transformers' decoder classifiers pool the last token that is not padding, which they
    find from input_ids only; given embeddings they pool the last position. With padding at the
    end that would explain another logit: an error that says to pad on the left. Left-padded,
    the explained logits are the model's."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, num_labels=3)
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(config).eval()
    lrp_model = lrpx.convert(model)
    right = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    with pytest.raises(ValueError, match="LlamaForSequenceClassification computes other logits .* pad on the left"):
        lrpx.explain_tokens(lrp_model, right, attention_mask=(right != 0).long())
    left = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    result = lrpx.explain_tokens(lrp_model, left, attention_mask=(left != 0).long())
    with torch.no_grad():
        logits = model(input_ids=left, attention_mask=(left != 0).long()).logits
    torch.testing.assert_close(result.logits, logits, rtol=1e-5, atol=1e-7)
    assert lrp_model.lrpx_graph.verified == {"alone, padding at the start"}  # once per kind of batch
    # an encoder classifier pools its first token: padding at the end is fine
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, num_labels=3)).eval()
    result = lrpx.explain_tokens(lrpx.convert(bert), right, attention_mask=(right != 0).long())
    with torch.no_grad():
        logits = bert(input_ids=right, attention_mask=(right != 0).long()).logits
    torch.testing.assert_close(result.logits, logits, rtol=1e-5, atol=1e-7)


def test_position_minus_one_is_the_last_real_token_wherever_the_padding_is(bag):
    """With padding at the end, -1 (and -2) count from each sequence's last real token: the
    relevance is that of the sequence alone, by the closed form of the bag model."""
    model, lrp_model = bag
    ids = torch.tensor([[3, 1, 4, 0, 0], [9, 2, 6, 5, 3]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    result = lrpx.explain_tokens(lrp_model, ids, [7, 2], position=[-1, -2], attention_mask=mask)
    assert result.position.tolist() == [2, 3]
    expected = bag_reference(model, ids, mask.numpy(), [7, 2], [2, 3])
    np.testing.assert_allclose(result.relevance.numpy(), expected, rtol=1e-4, atol=1e-9)
    alone = lrpx.explain_tokens(lrp_model, ids[:1, :3], 7)
    np.testing.assert_allclose(result.relevance[0, :3].numpy(), alone.relevance[0].numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="position -4 is beyond the 3 real tokens of sequence 0"):
        lrpx.explain_tokens(lrp_model, ids, position=-4, attention_mask=mask)


def test_explain_generated_of_a_vision_language_model():
    """A token that generate wrote for a prompt with an image: the top logit of its prefix, as
    the original model computes it, with relevance for the prefix and the pixels."""
    model, inputs = _vlm("paligemma")
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    sequences = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=2, min_new_tokens=2,
                               do_sample=False)
    at = ids.shape[1] + 1
    result = lrpx.explain_generated(lrpx.convert(model), sequences, at, pixel_values=pixels)
    assert torch.equal(result.target, sequences[:, at])
    with torch.no_grad():
        logits = model(input_ids=sequences[:, :at], pixel_values=pixels).logits[:, -1]
    torch.testing.assert_close(result.score, logits.max(-1).values, rtol=1e-10, atol=0)
    assert result.relevance.shape == (1, at) and result.pixel_relevance.abs().sum() > 0


def test_the_check_sees_the_whole_batch_and_stays_out_of_the_way():
    """Padding at the end of any sequence (here not the first, which is all padding) is caught
    for a classifier that pools by input_ids; RoBERTa, which numbers positions from input_ids,
    is explained for its own logits with padding at the end; a model in training mode or one
    whose forward takes no input_ids is not checked; a sequence without real tokens is no error."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    llama = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=0, num_labels=3)).eval()
    ids = torch.tensor([[0, 0, 0, 0], [5, 6, 7, 0]])
    with pytest.raises(ValueError, match="pad on the left"):
        lrpx.explain_tokens(lrpx.convert(llama), ids, attention_mask=(ids != 0).long())
    roberta = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, num_labels=3, pad_token_id=1)).eval()
    right = torch.tensor([[0, 5, 6, 2, 1, 1], [0, 7, 8, 9, 10, 2]])
    mask = (right != 1).long()
    result = lrpx.explain_tokens(lrpx.convert(roberta), right, attention_mask=mask)
    with torch.no_grad():
        torch.testing.assert_close(result.logits, roberta(input_ids=right, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-7)
    gpt2 = tiny_gpt2(3)
    gpt2.train()  # dropout: two forwards differ; not checked (the plain gradient of a training model)
    assert torch.isfinite(lrpx.explain_tokens(gpt2, torch.tensor([[1, 2, 3]])).relevance).all()
    empty = lrpx.explain_tokens(tiny_gpt2(3), torch.tensor([[0, 0, 0], [4, 5, 6]]),
                                attention_mask=torch.tensor([[0, 0, 0], [1, 1, 1]]))
    assert empty.position.tolist() == [2, 2] and (empty.relevance[0] == 0).all()

    class EmbedsOnly(nn.Module):  # takes **kwargs, but no input_ids
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(9, 4), nn.Linear(4, 3)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, inputs_embeds, attention_mask=None, **kwargs):
            return self.head(inputs_embeds.sum(1))

    assert lrpx.explain_tokens(EmbedsOnly(), torch.tensor([[1, 2]])).relevance.shape == (1, 2)


def test_a_decoder_that_scales_its_embeddings_takes_a_scaled_decoder_embedding():
    """MVP scales the lookup of ids in its encoder and its decoder: refused as it is, explained
    for the model's own logit with both embeddings scaled."""
    model, lrp_model = _tiny_translator("Mvp", pad_token_id=1, decoder_start_token_id=2)
    src, out = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[2, 9, 10]])
    with pytest.raises(ValueError, match="computes other logits from the embeddings than from input_ids"):
        lrpx.explain_tokens(lrp_model, src, decoder_input_ids=out)
    encoder, decoder = lrp_model.get_encoder(), lrp_model.get_decoder()
    result = lrpx.explain_tokens(lrp_model, src, decoder_input_ids=out,
                                 embedding=lrpx.text.ScaledEmbedding(encoder.embed_tokens, encoder.embed_scale),
                                 decoder_embedding=lrpx.text.ScaledEmbedding(decoder.embed_tokens, decoder.embed_scale))
    with torch.no_grad():
        logits = model(input_ids=src, decoder_input_ids=out).logits
    torch.testing.assert_close(result.score[0], logits[0, -1].max(), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="decoder_embedding given without decoder_input_ids"):
        lrpx.explain_tokens(lrp_model, src, decoder_embedding=decoder.embed_tokens)
