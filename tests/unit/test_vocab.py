"""Adding <bkspc> to tokenizers and models (DESIGN §2), and the tiny model maker."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sm_dist.core.tiny import make_tiny_model, train_tokenizer
from sm_dist.core.vocab import (
    BKSPC_TOKEN,
    BkspcError,
    add_bkspc,
    add_bkspc_to_dir,
    check_model_has_bkspc,
    get_bkspc_id,
)


def _plain_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["hello world", "the cat sat"], trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"])
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _model(arch, vocab):
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=1,
                num_attention_heads=2,
            )
        )
    if arch == "qwen2":
        return Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=vocab,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
            )
        )
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=1, n_head=2))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_add_bkspc_resizes_and_is_idempotent(arch, tmp_path):
    tok = _plain_tokenizer()
    model = _model(arch, len(tok))
    with pytest.raises(BkspcError, match="has no '<bkspc>'"):
        get_bkspc_id(tok)
    before = model.get_output_embeddings().weight[: len(tok)].clone()
    bid = add_bkspc(model, tok)
    assert bid == len(tok) - 1 and model.get_output_embeddings().weight.shape[0] == len(tok)
    assert torch.equal(model.get_output_embeddings().weight[:bid], before)  # old rows untouched
    assert add_bkspc(model, tok) == bid and len(tok) == bid + 1  # idempotent
    assert tok.encode("hello " + BKSPC_TOKEN, add_special_tokens=False)[-1] == bid
    check_model_has_bkspc(model, bid)
    with torch.no_grad():  # the new action starts rare: below the mean logit on real inputs
        logits = model(torch.tensor([tok.encode("hello world the cat")])).logits[0]
    assert (logits[:, bid] - logits.mean(-1)).mean() < 0
    assert logits.softmax(-1)[:, bid].mean() < 1.0 / logits.shape[-1]
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok2, model2 = AutoTokenizer.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)
    assert get_bkspc_id(tok2) == bid and model2.get_output_embeddings().weight.shape[0] == bid + 1


def test_add_bkspc_to_dir(tmp_path):
    tok = _plain_tokenizer()
    model = _model("llama", len(tok))
    model.save_pretrained(tmp_path / "in")
    tok.save_pretrained(tmp_path / "in")
    bid = add_bkspc_to_dir(tmp_path / "in", tmp_path / "out")
    assert get_bkspc_id(AutoTokenizer.from_pretrained(tmp_path / "out")) == bid
    with pytest.raises(FileNotFoundError, match="no config.json"):
        add_bkspc_to_dir(tmp_path / "missing", tmp_path / "x")


def test_model_without_token_is_named():
    tok = _plain_tokenizer()
    model = _model("llama", len(tok))
    tok.add_special_tokens({"additional_special_tokens": [BKSPC_TOKEN]})  # tokenizer only
    with pytest.raises(BkspcError, match="not resized"):
        check_model_has_bkspc(model, get_bkspc_id(tok))


def test_bkspc_as_ordinary_token_is_rejected():
    tok = _plain_tokenizer()
    tok.add_tokens([BKSPC_TOKEN])  # a real (non-special) token: text could produce it
    with pytest.raises(BkspcError, match="ordinary token"):
        get_bkspc_id(tok)


def test_tiny_model_and_tokenizer(tmp_path):
    out = make_tiny_model(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(out)
    q = "In base 7, what is 25 + -3?"
    assert tok.decode(tok.encode(q)) == q and len(tok.encode(q)) == len(q)  # one token per character
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size // model.config.num_attention_heads in (32, 64)
    check_model_has_bkspc(model, get_bkspc_id(tok))
    with pytest.raises(ValueError, match="head size"):
        make_tiny_model(tmp_path / "bad", hidden_size=96, num_heads=6)
    bpe = train_tokenizer(
        ["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300, with_bkspc=False
    )
    with pytest.raises(BkspcError):
        get_bkspc_id(bpe)
    assert add_bkspc(_model("llama", len(bpe)), bpe) == len(bpe) - 1
