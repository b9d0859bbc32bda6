"""udrra.lm.rewards: last-token reward-model scoring, VADER, function specs and the one validation point."""

import math
import sys

import pytest
import torch

pytest.importorskip("transformers")
from lm_fixtures import BOS, EOS, PAD, char_tokenizer, one_torch_thread  # noqa: E402,F401
from transformers import LlamaConfig, LlamaForSequenceClassification  # noqa: E402

from udrra.errors import InputError  # noqa: E402
from udrra.lm.rewards import (Reward, RewardError, last_token_scores, load_reward, score_head,  # noqa: E402
                              VADER_INSTALL_HINT)


def tiny_rm(seed=0, num_labels=1, pad=EOS):
    """A 2-layer Llama sequence classifier, pad == eos (as SmolLM2), random (non-zero) score head."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=pad, eos_token_id=EOS, bos_token_id=BOS, num_labels=num_labels)
    return LlamaForSequenceClassification(cfg).eval()


def _alone(model, row):
    """Score of one row by a separate, unpadded forward through backbone + head at its final position."""
    with torch.no_grad():
        h = model.model(input_ids=torch.tensor([row])).last_hidden_state
        return float(model.score(h[0, -1]).squeeze())


def _pad(rows, side, pad_id, T=None):
    T = T or max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        ids[i, sl] = torch.tensor(r)
        att[i, sl] = 1
    return ids, att


# rows: one ending in eos (a stopped rollout), one with eos INSIDE (and at the end), a one-token row, a long row
ROWS = [[5, 6, 7, EOS], [8, 9, EOS, 10, 11, 12, EOS], [13], [20, 21, 22, 23, 24, 25, 26, 27, 28]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_scores_with_padding_and_pad_equal_eos_match_each_row_alone(side):
    model = tiny_rm()
    expected = torch.tensor([_alone(model, r) for r in ROWS])
    ids, att = _pad(ROWS, side, EOS, T=11)  # pad id == eos id, extra padding columns
    with torch.no_grad():
        got = last_token_scores(model, ids, att)
    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_last_token_scores_differ_from_the_first_pad_and_the_last_non_pad_readings():
    model = tiny_rm()
    ids, att = _pad(ROWS, "right", EOS)
    with torch.no_grad():
        ours = last_token_scores(model, ids, att)
        per_pos = model.score(model.model(input_ids=ids, attention_mask=att).last_hidden_state).squeeze(-1)
        hf = model(input_ids=ids, attention_mask=att).logits.squeeze(-1)
    # the "first pad token" reading (old transformers, transformers#35352): one before the first id == pad
    first_pad = (ids == EOS).int().argmax(-1) - 1
    legacy = per_pos[torch.arange(4), first_pad]
    assert abs(float(legacy[1] - ours[1])) > 1e-4  # row 1 has an eos inside: read 5 tokens early
    # transformers' current reading (rightmost id != pad) skips a response's own final eos
    assert abs(float(hf[0] - ours[0])) > 1e-4 and abs(float(hf[1] - ours[1])) > 1e-4
    torch.testing.assert_close(hf[2:], ours[2:])  # rows without eos agree


def test_last_token_scores_are_differentiable_and_reject_bad_inputs():
    model = tiny_rm().train()
    ids, att = _pad(ROWS, "right", EOS)
    last_token_scores(model, ids, att).sum().backward()
    assert model.score.weight.grad is not None and model.model.layers[0].mlp.up_proj.weight.grad is not None
    att[2] = 0
    with pytest.raises(InputError, match="row 2 has no real token"):
        last_token_scores(model, ids, att)
    with pytest.raises(InputError, match="2 outputs"):
        last_token_scores(tiny_rm(num_labels=2), ids, torch.ones_like(ids))
    from lm_fixtures import tiny_llama

    with pytest.raises(InputError, match="LlamaForCausalLM is not supported"):
        score_head(tiny_llama())


# ------------------------------------------------------------------------------------------- VADER


def test_vader_scores_the_response_only_and_equals_the_analyzer():
    SentimentIntensityAnalyzer = pytest.importorskip("vaderSentiment.vaderSentiment").SentimentIntensityAnalyzer

    r = load_reward("vader")
    assert r.name == "vader" and r.kind == "vader"
    texts = ["I love this wonderful day", "This is a terrible, awful day. I hate it.", "The box is on the table."]
    out = r(["", "", ""], texts)
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert out[0] > 0.5 and out[1] < 0
    sia = SentimentIntensityAnalyzer()
    expected = torch.tensor([sia.polarity_scores(t)["compound"] for t in texts], dtype=torch.float32)
    assert torch.equal(out, expected)
    # the prompt is ignored
    assert torch.equal(r(["I hate everything, awful!", "I love you", "wonderful"], texts), expected)


def test_vader_missing_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    with pytest.raises(RewardError) as e:
        load_reward("vader")
    assert VADER_INSTALL_HINT in str(e.value) and "pip install --no-deps vadersentiment==3.3.2" in str(e.value)


# ------------------------------------------------------------------------------------ function specs


def test_module_function_file_function_and_callable_specs(tmp_path, monkeypatch):
    src = "def score(prompts, responses):\n    return [len(p) + 0.5 * len(r) for p, r in zip(prompts, responses)]\n"
    (tmp_path / "udrra_test_reward_mod.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    f = tmp_path / "sub dir" / "my_reward.py"
    f.parent.mkdir()
    f.write_text(src)
    prompts, responses = ["ab", "", "xyz"], ["c", "de", ""]
    expected = torch.tensor([2.5, 1.0, 3.0])
    r_mod = load_reward("udrra_test_reward_mod:score")
    r_file = load_reward(f"{f}:score")
    assert r_mod.name == "udrra_test_reward_mod:score" and r_file.name == f"{f}:score"

    def my_reward(p, r):
        return torch.tensor([len(x) + 0.5 * len(y) for x, y in zip(p, r)], dtype=torch.float64)

    r_call = load_reward(my_reward)
    assert r_call.name.endswith("my_reward") and "<locals>" in r_call.name  # __qualname__
    for r in (r_mod, r_file, r_call):
        out = r(prompts, responses)
        assert out.dtype == torch.float32 and torch.equal(out, expected), r.name
    assert load_reward(r_call) is r_call


BAD = [
    ("raises", lambda p, r: (_ for _ in ()).throw(ValueError("model exploded\nsecond line")),
     ["raised ValueError: model exploded on a batch of 4 responses"]),
    ("nan", lambda p, r: [float("nan"), 1.0, 2.0, 3.0],
     ["returned nan for row 0 (prompt 'Once upon a time there w…', response 'and it ran away\\nfast'); rewards must "
      "be finite numbers"]),
    ("inf", lambda p, r: [0.0, -float("inf"), 1.0, 1.0], ["returned -inf for row 1"]),
    ("overflow", lambda p, r: [0.0, 0.0, 1e300, 1.0], ["returned 1e+300 for row 2", "overflows float32"]),
    ("count", lambda p, r: [0.0, 1.0, 2.0], ["returned 3 values for 4 responses"]),
    ("string", lambda p, r: [0.0, "0.5", 1.0, 1.0], ["returned a str ('0.5') for row 1", "finite numbers"]),
    ("none", lambda p, r: [0.0, 1.0, None, 1.0], ["returned a NoneType", "for row 2"]),
    ("scalar", lambda p, r: 1.0, ["returned float", "list of 4 numbers"]),
    ("matrix", lambda p, r: torch.zeros(4, 2), ["shape (4, 2)"]),
]


@pytest.mark.parametrize("case,fn,parts", BAD, ids=[b[0] for b in BAD])
def test_bad_reward_outputs_raise_one_line_reward_errors_naming_the_reward_and_row(case, fn, parts):
    r = Reward(f"mymod:{case}", fn)
    prompts = ["Once upon a time there was a fox", "p1", "p2", "p3"]
    responses = ["and it ran away\nfast", "r1", "r2", "r3"]
    with pytest.raises(RewardError) as e:
        r(prompts, responses)
    msg = str(e.value)
    assert isinstance(e.value, InputError)
    assert "\n" not in msg and f"reward 'mymod:{case}'" in msg, msg
    for part in parts:
        assert part in msg, (part, msg)


def test_good_outputs_of_several_types_are_accepted():
    import numpy as np

    r = Reward("ok", lambda p, resp: [1, np.float64(0.5), True, torch.tensor(-2.0)])
    assert torch.equal(r(["a"] * 4, ["b"] * 4), torch.tensor([1.0, 0.5, 1.0, -2.0]))
    assert torch.equal(Reward("np", lambda p, resp: np.array([0.25, 2]))(["a", "b"], ["c", "d"]),
                       torch.tensor([0.25, 2.0]))
    with pytest.raises(RewardError, match="got 1 prompts for 2 responses"):
        r(["a"], ["b", "c"])


def test_bad_specs_list_the_valid_forms(tmp_path):
    for spec, match in [("not a reward", "valid forms"), (42, "valid forms"),
                        ("udrra_no_such_module_xyz:f", "cannot import module"),
                        ("math:no_such_function", "has no attribute 'no_such_function'"),
                        ("math:pi", "not a function"),
                        (f"{tmp_path}/missing.py:f", "not found"),
                        (str(tmp_path), "no config.json")]:
        with pytest.raises(RewardError, match=match):
            load_reward(spec)
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(RewardError, match="raised RuntimeError: boom"):
        load_reward(f"{tmp_path}/broken.py:f")


# ----------------------------------------------------------------------------------- reward-model dir


def test_reward_model_directory_scores_prompt_plus_response_independent_of_batching(tmp_path):
    model = tiny_rm(pad=PAD)
    tok = char_tokenizer()
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts = ["Hi there. ", "Q: 2+2=", "", "A much longer prompt with many characters in it"]
    responses = ["hello<eos>", " 4", "x", " ok"]
    r = load_reward(str(tmp_path / "rm"), batch_size=3)
    assert r.kind == "reward_model" and r.name == str(tmp_path / "rm")
    out = r(prompts, responses)
    expected = [_alone(model, tok(p, add_special_tokens=False)["input_ids"] +
                       tok(x, add_special_tokens=False)["input_ids"]) for p, x in zip(prompts, responses)]
    assert tok("hello<eos>", add_special_tokens=False)["input_ids"][-1] == EOS  # the response's own eos is kept
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(load_reward(str(tmp_path / "rm"), batch_size=1)(prompts, responses), out,
                               rtol=1e-5, atol=1e-6)
    # max_length keeps the end of the sequence
    short = load_reward(str(tmp_path / "rm"), max_length=3)(prompts[3:], responses[3:])
    assert math.isclose(float(short), _alone(model, tok("t ok", add_special_tokens=False)["input_ids"][-3:]),
                        rel_tol=1e-5, abs_tol=1e-6)
    with pytest.raises(RewardError, match="prompt and response are both empty"):
        r([""], [""])


def test_reward_model_directory_with_two_labels_is_refused(tmp_path):
    tiny_rm(num_labels=2).save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(RewardError, match="num_labels=2"):
        load_reward(tmp_path)
