"""Shared offline fixtures for the LM tests: a character tokenizer and a tiny random Llama (no downloads)."""

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS, BOS = 0, 1, 2


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread (and do not stall when the other core is busy); restore after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def char_tokenizer(add_bos=False, with_pad=True):
    """One token per character (ids 4..), specials <pad>=0 <eos>=1 <bos>=2 <unk>=3, a ChatML-like template."""
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    kw = {"pad_token": "<pad>"} if with_pad else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", bos_token="<bos>", unk_token="<unk>", **kw)
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")
    tok.add_bos_token = add_bos
    return tok


def tiny_llama(seed=0, vocab_size=100, tie=False):
    """A 2-layer, hidden-32 Llama with random weights, seeded."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    return LlamaForCausalLM(cfg)
