"""``lrpx explain-text`` end to end: a tiny word-level tokenizer, toy models through a patched
loader, and a tiny GPT-2 saved with save_pretrained."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lrpx
import lrpx.cli.text as cli_text
from lrpx.cli import main
from toy_lm import BagClassifier, BagLM

pytestmark = pytest.mark.usefixtures("one_thread")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["[PAD]", "[UNK]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "<b>", "&"]


def word_tokenizer():
    vocabulary = {w: i for i, w in enumerate(WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                                mask_token="[MASK]")


def run(capsys, *args):
    code = main(["explain-text", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def bag_lm(monkeypatch):
    torch.manual_seed(0)
    model = BagLM(vocabulary=len(WORDS)).double().eval()
    model.config = SimpleNamespace(pad_token_id=0)
    monkeypatch.setattr(cli_text, "load_text_model", lambda name: (word_tokenizer(), model))
    return model


def test_toy_lm_files_and_relevance(bag_lm, capsys, tmp_path):
    code, out, err = run(capsys, "--model", "toy", "--text", "the cat sat on", "--target", "mat",
                         "--out", tmp_path / "out", "--color", "never")
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "relevance.json").read_text())
    assert record["tokens"] == ["the", "cat", "sat", "on"] and record["ids"] == [3, 4, 5, 6]
    assert record["target"] == {"id": 7, "token": "mat"} and record["position"] == 3
    # bag of tokens: token s's relevance for 'mat' is (W e_s)[mat]
    weight = bag_lm.head.weight.detach().numpy()
    expected = bag_lm.embed.weight.detach().numpy()[[3, 4, 5, 6]] @ weight[7]
    np.testing.assert_allclose(record["relevance"], expected, rtol=1e-4)
    assert record["logit"] == pytest.approx(expected.sum(), rel=1e-4)
    page = (tmp_path / "out" / "tokens.html").read_text()
    assert "next token &#x27;mat&#x27; (id 7" in page and "http" not in page.replace("https://no-color", "")
    assert "\x1b[" not in out and "the[" in out and "wrote" in out


def test_target_by_id_position_and_colour(bag_lm, capsys, tmp_path):
    code, out, err = run(capsys, "--model", "toy", "--text", "<b> & dog ran", "--target", "9", "--position", "1",
                         "--out", tmp_path, "--color", "always")
    assert code == 0, err
    record = json.loads((tmp_path / "relevance.json").read_text())
    assert record["position"] == 1 and record["target"]["id"] == 9
    assert record["relevance"][2:] == [0.0, 0.0]  # after the explained position
    assert "\x1b[48;2;" in out
    page = (tmp_path / "tokens.html").read_text()
    assert "&lt;b&gt;" in page and "&amp;" in page and "<b>" not in page.split("<body>")[1]


@pytest.mark.parametrize("args, message", [
    (["--target", "cat sat"], "--target 'cat sat' is 2 tokens ['cat', 'sat'], not one"),
    (["--target", "13"], "--target 13 is out of range: the model has 13 token ids (0..12)"),
    (["--position", "4"], "--position 4 is beyond the text's 4 tokens"),
    (["--text", "  "], "--text is empty"),
])
def test_argument_errors(bag_lm, capsys, tmp_path, args, message):
    base = {"--text": "the cat sat on", "--out": str(tmp_path / "o")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    code, _, err = run(capsys, "--model", "toy", *[x for kv in base.items() for x in kv])
    assert code == 2 and message in err
    assert not (tmp_path / "o").exists()


def test_out_is_a_file(bag_lm, capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "--model", "toy", "--text", "the cat", "--out", tmp_path / "file")
    assert code == 2 and "exists and is not a folder" in err


def test_sequence_classifier(monkeypatch, capsys, tmp_path):
    torch.manual_seed(1)
    model = BagClassifier(vocabulary=len(WORDS), classes=3).double().eval()
    model.config = SimpleNamespace(id2label={0: "neg", 1: "neutral", 2: "pos"})
    monkeypatch.setattr(cli_text, "load_text_model", lambda name: (word_tokenizer(), model))
    code, _, err = run(capsys, "--model", "toy", "--text", "a dog ran", "--target", "2", "--out", tmp_path)
    assert code == 0, err
    record = json.loads((tmp_path / "relevance.json").read_text())
    assert record["target"] == {"id": 2, "token": "pos"} and record["position"] is None
    expected = model.embed.weight.detach().numpy()[[8, 9, 10]] @ model.head.weight.detach().numpy()[2]
    np.testing.assert_allclose(record["relevance"], expected, rtol=1e-4)
    code, _, err = run(capsys, "--model", "toy", "--text", "a dog", "--target", "dog", "--out", tmp_path)
    assert code == 2 and "must be a class index (0..2)" in err


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(2)
    config = transformers.GPT2Config(vocab_size=len(WORDS), n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def test_saved_gpt2_loads_and_writes(tiny_gpt2, monkeypatch, capsys, tmp_path):
    # the plain model (gradient x logit) stands in for the converted one: this checks loading,
    # tokenising and writing from a save_pretrained folder
    monkeypatch.setattr(cli_text, "convert_text_model", lambda model: model)
    code, _, err = run(capsys, "--model", tiny_gpt2, "--text", "the dog sat", "--out", tmp_path)
    assert code == 0, err
    record = json.loads((tmp_path / "relevance.json").read_text())
    assert record["tokens"] == ["the", "dog", "sat"] and record["ids"] == [3, 9, 5]
    model = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[3, 9, 5]])).logits[0, -1]
    assert record["target"]["id"] == int(logits.argmax())
    assert record["logit"] == pytest.approx(float(logits.max()), rel=1e-5)


def test_missing_model_folder(capsys, tmp_path):
    code, _, err = run(capsys, "--model", tmp_path / "nothing-here", "--text", "the cat", "--out", tmp_path / "o")
    assert code == 2 and "cannot load model" in err


def test_saved_gpt2_is_converted_and_explained(tiny_gpt2, capsys, tmp_path):
    code, _, err = run(capsys, "--model", tiny_gpt2, "--text", "the dog sat", "--out", tmp_path)
    assert code == 0, err
    record = json.loads((tmp_path / "relevance.json").read_text())
    assert record["ids"] == [3, 9, 5]
    model = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()
    expected = lrpx.explain_tokens(lrpx.convert(model), torch.tensor([[3, 9, 5]]))
    assert record["relevance"] == pytest.approx(expected.relevance[0].tolist(), rel=1e-5, abs=1e-7)
    assert record["logit"] == pytest.approx(float(expected.logits[0, -1].max()), rel=1e-5)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-t5")
    torch.manual_seed(3)
    config = transformers.T5Config(vocab_size=len(WORDS), d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    transformers.T5ForConditionalGeneration(config).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def test_saved_t5_explains_the_next_output_token(tiny_t5, capsys, tmp_path):
    """An encoder-decoder model: the source and the decoder's tokens (its start token, then
    --decoder-text) both get relevance, equal to explain_tokens on the same inputs."""
    code, out, err = run(capsys, "--model", tiny_t5, "--text", "the dog sat", "--decoder-text", "a cat",
                         "--out", tmp_path, "--color", "never")
    assert code == 0, err
    record = json.loads((tmp_path / "relevance.json").read_text())
    assert record["ids"] == [3, 9, 5] and record["decoder_ids"] == [0, 8, 4]
    assert record["decoder_tokens"] == ["[PAD]", "a", "cat"] and record["position"] == 2
    model = transformers.T5ForConditionalGeneration.from_pretrained(tiny_t5).eval()
    expected = lrpx.explain_tokens(lrpx.convert(model), torch.tensor([[3, 9, 5]]),
                                   decoder_input_ids=torch.tensor([[0, 8, 4]]))
    assert record["relevance"] == pytest.approx(expected.relevance[0].tolist(), rel=1e-5, abs=1e-7)
    assert record["decoder_relevance"] == pytest.approx(expected.decoder_relevance[0].tolist(), rel=1e-5, abs=1e-7)
    assert record["target"]["id"] == int(expected.target[0])
    assert "after decoder position 2" in out and "→" in out
    # no --decoder-text: the first output token, after the start token alone
    code, _, err = run(capsys, "--model", tiny_t5, "--text", "the dog sat", "--out", tmp_path / "first")
    assert code == 0, err
    first = json.loads((tmp_path / "first" / "relevance.json").read_text())
    assert first["decoder_ids"] == [0] and first["position"] == 0


def test_decoder_text_for_a_causal_model_is_refused(tiny_gpt2, capsys, tmp_path):
    code, _, err = run(capsys, "--model", tiny_gpt2, "--text", "the dog", "--decoder-text", "a", "--out", tmp_path)
    assert code == 2 and "--decoder-text is for encoder-decoder models (T5, BART); GPT2LMHeadModel is not one" in err
