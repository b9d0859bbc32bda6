"""udrra.lm.train: end-to-end preference training on a tiny random Llama with the real ``udrra.load`` algorithms."""

import argparse
import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from lm_fixtures import char_tokenizer, one_torch_thread, tiny_llama  # noqa: E402,F401
from transformers import AutoModelForCausalLM  # noqa: E402

import udrra  # noqa: E402
from udrra.errors import ConfigError, InputError  # noqa: E402
import random  # noqa: E402

import udrra.lm.train as lm_train  # noqa: E402
from udrra.lm.data import PreferencePair, collate_pairs, tokenize_pairs  # noqa: E402
from udrra.lm.logprobs import sequence_logps  # noqa: E402
from udrra.lm.models import make_reference  # noqa: E402
from udrra.lm.producers import OfflinePairs  # noqa: E402
from udrra.lm.train import (add_train_arguments, run_from_args, sample_responses, sampled_kl, train,  # noqa: E402
                            update_reference)


ROWS = [{"prompt": f"Q{i}: {i}+{i}=", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1} or so"} for i in range(30)]
FAST = dict(batch_size=4, learning_rate=1e-2, max_length=48, max_prompt_length=24, eval_pairs=3, kl_prompts=3,
            kl_max_new_tokens=4, progress=False, verbose=False)


def test_three_step_dpo_run_writes_model_algorithm_toml_and_metrics_and_reloads(tmp_path):
    algo = udrra.load("dpo")
    model, tok = tiny_llama(), char_tokenizer()
    out = tmp_path / "run"
    res = train(algo, model, ROWS, tokenizer=tok, output_dir=out, max_steps=3, **FAST)
    assert (out / "algorithm.toml").read_text() == algo.to_toml()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in metrics["log_history"]] == [1, 2, 3]
    assert metrics["config"]["max_steps"] == 3 and metrics["pairs_seen"] == 12
    assert metrics["data"]["split"]["seed"] == 1234 and metrics["data"]["split"]["totals"] == [27, 3]
    assert metrics["truncation"]["train"]["rows"] == 27
    # before training policy == reference: every implicit reward is 0, accuracy counts ties as 1/2, KL is 0
    before = metrics["eval_before"]
    assert before["eval/reward_margin"] == 0.0 and before["eval/reward_accuracy"] == 0.5
    assert before["eval/kl_sampled_k1"] == 0.0 and before["eval/kl_sampled_k3"] == 0.0
    assert before["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["eval_after"]["eval/loss"] < before["eval/loss"]  # lr 1e-2 on 12 pairs fits them
    assert metrics["eval_after"]["eval/kl_sampled_k3"] > 0.0
    assert res["eval_after"] == metrics["eval_after"] and res["output_dir"] == str(out.resolve())
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary sibling left
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (n, a), (_, b) in zip(model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(a.detach(), b), n


def test_bad_inputs_raise_before_anything_is_written(tmp_path):
    out = tmp_path / "sub" / "run"
    cases = [
        (InputError, "missing column", dict(dataset=[{"prompt": "p", "chosen": "a", "answer": "b"}] * 8)),
        (InputError, "chosen == rejected", dict(dataset=ROWS + [{"prompt": "p", "chosen": "a", "rejected": "a"}])),
        (ConfigError, "dpo, ipo, cdpo, rdpo, hinge, simpo", dict(algorithm=udrra.load("grpo"))),
        (ConfigError, "offline_pairs", dict(algorithm=udrra.load("online_dpo"))),
        (InputError, "max_prompt_length", dict(max_prompt_length=48)),
        (InputError, "not found", dict(dataset=str(tmp_path / "missing.jsonl"))),
    ]
    for err, match, kw in cases:
        args = dict(algorithm=udrra.load("dpo"), dataset=ROWS, max_prompt_length=24)
        args.update(kw)
        fast = {k: v for k, v in FAST.items() if k != "max_prompt_length"}
        with pytest.raises(err, match=match):
            train(args.pop("algorithm"), tiny_llama(), args.pop("dataset"), tokenizer=char_tokenizer(),
                  output_dir=out, max_steps=1, **args, **fast)
        assert list(tmp_path.iterdir()) == [], match


def test_non_empty_output_dir_is_refused_unless_overwrite_and_then_replaced(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(InputError, match="not empty"):
        train(udrra.load("dpo"), tiny_llama(), ROWS, tokenizer=char_tokenizer(), output_dir=out, max_steps=1, **FAST)
    assert (out / "keep.txt").read_text() == "old"
    train(udrra.load("dpo"), tiny_llama(), ROWS, tokenizer=char_tokenizer(), output_dir=out, max_steps=1,
          overwrite=True, **FAST)
    assert not (out / "keep.txt").exists() and (out / "metrics.json").exists()


def test_reset_every_copies_the_policy_into_the_reference_so_rewards_vanish_after_the_reset_step(tmp_path):
    algo = udrra.load("dpo", overrides={"reference.update": "reset_every", "reference.every": 2})
    res = train(algo, tiny_llama(), ROWS, tokenizer=char_tokenizer(), output_dir=tmp_path / "r", max_steps=2, **FAST)
    after = res["eval_after"]  # reference reset at step 2 == the final policy
    assert after["eval/reward_margin"] == 0.0 and after["eval/reward_accuracy"] == 0.5
    assert after["eval/kl_sampled_k1"] == 0.0
    assert res["algorithm"]["reference_update"] == {"rule": "reset_every", "every": 2}
    frozen = train(udrra.load("dpo"), tiny_llama(), ROWS, tokenizer=char_tokenizer(), output_dir=tmp_path / "f",
                   max_steps=2, **FAST)
    assert frozen["eval_after"]["eval/reward_margin"] != 0.0


def test_update_reference_rules_ema_lerps_and_reset_every_copies_on_multiples_only():
    policy = tiny_llama(0)
    ref0 = make_reference(tiny_llama(1))
    ref = make_reference(ref0)
    assert update_reference(ref, policy, "ema", {"decay": 0.75}, step=1)
    for a, p, r in zip(ref0.parameters(), policy.parameters(), ref.parameters()):
        torch.testing.assert_close(r, 0.75 * a + 0.25 * p)
    ref = make_reference(ref0)
    assert not update_reference(ref, policy, "reset_every", {"every": 3}, step=2)
    assert all(torch.equal(r, a) for r, a in zip(ref.parameters(), ref0.parameters()))
    assert update_reference(ref, policy, "reset_every", {"every": 3}, step=3)
    assert all(torch.equal(r, p) for r, p in zip(ref.parameters(), policy.parameters()))
    assert not update_reference(ref, policy, "frozen", {}, step=3)
    with pytest.raises(ConfigError, match="unknown reference update rule"):
        update_reference(ref, policy, "sometimes", {}, step=3)


def test_simpo_trains_without_a_reference_and_reports_no_sampled_kl(tmp_path):
    res = train(udrra.load("simpo"), tiny_llama(), ROWS, tokenizer=char_tokenizer(), output_dir=tmp_path / "s",
                max_steps=2, gradient_accumulation_steps=2, **FAST)
    assert res["algorithm"]["uses_reference"] is False and res["pairs_seen"] == 16
    assert "eval/kl_sampled_k1" not in res["eval_after"]
    b = res["eval_before"]
    beta = udrra.load("simpo").beta
    # SimPO implicit reward = beta * mean token log-prob (no reference): negative, and above beta * the summed
    # log-prob, since every response has >= 1 token
    assert b["eval/reward_chosen"] < 0 and beta > 0
    assert b["eval/reward_chosen"] >= beta * b["eval/logps_chosen"] - 1e-6


def test_sample_responses_uses_the_untruncated_distribution_and_sampled_kl_matches_the_exact_kl():
    policy, ref = tiny_llama(0).eval(), tiny_llama(1).eval()
    prompt = [5, 6, 7]
    n = 3000
    resp = sample_responses(policy, [prompt] * n, max_new_tokens=1, seed=0, pad_token_id=0, eos_token_id=1)
    assert all(len(r) == 1 for r in resp)
    assert len({r[0] for r in resp}) > 60  # no top-k=50 (random init: nearly uniform over 100 tokens)
    with torch.no_grad():
        lp = torch.log_softmax(policy(torch.tensor([prompt])).logits[0, -1].double(), -1)
        lr = torch.log_softmax(ref(torch.tensor([prompt])).logits[0, -1].double(), -1)
    exact = float((lp.exp() * (lp - lr)).sum())
    kl = sampled_kl(policy, ref, [prompt] * n, max_new_tokens=1, seed=0, pad_token_id=0, eos_token_id=1)
    d = torch.tensor([float(lp[r[0]] - lr[r[0]]) for r in resp], dtype=torch.float64)
    assert kl["kl_sampled_k1"] == pytest.approx(float(d.mean()), abs=1e-5)  # scored by sequence_logps
    se = float(d.std()) / n ** 0.5
    assert abs(kl["kl_sampled_k1"] - exact) < 4 * se
    assert kl["kl_sampled_k3"] == pytest.approx(float((torch.exp(-d) - 1 + d).mean()), abs=1e-5)


def test_cli_contract_add_train_arguments_and_run_from_args_train_a_local_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    tiny_llama().save_pretrained(ckpt)
    char_tokenizer().save_pretrained(ckpt)
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    parser = add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--model", str(ckpt), "--dataset", str(data), "--max-steps", "2", "--output-dir",
                              str(tmp_path / "out"), "--batch-size", "2", "--lr", "1e-3", "--max-length", "40",
                              "--max-prompt-length", "20", "--eval-pairs", "2", "--kl-prompts", "2",
                              "--kl-max-new-tokens", "3", "--seed", "1", "--no-progress"])
    assert (args.batch_size, args.lr, args.eval_steps, args.overwrite) == (2, 1e-3, 0, False)
    assert run_from_args(args, udrra.load("ipo")) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["algorithm"]["name"] == "ipo" and metrics["config"]["seed"] == 1
    assert metrics["config"]["learning_rate"] == 1e-3 and len(metrics["log_history"]) == 2
    with pytest.raises(InputError, match="not empty"):
        run_from_args(args, udrra.load("ipo"))
    defaults = parser.parse_args(["--model", "m", "--dataset", "d"])
    # None = resolved per run: batch 4 pairs / lr 5e-6 offline (8 prompts / 1e-5 online), prompt 3/4 of
    # max_length, evaluation scaled to the run (test below)
    assert (defaults.batch_size, defaults.lr, defaults.max_length, defaults.max_prompt_length, defaults.eval_pairs) \
        == (None, None, 256, None, None)


def test_default_evaluation_scales_with_the_run(tmp_path):
    """A 2-step run of 4 pairs evaluates 2 × 8 = 16 held-out pairs (and samples KL on 16 prompts), not 100: the
    17-minute `--max-steps 2` run of the issue spent nearly all its time in the default evaluation."""
    rows = ROWS * 3
    res = train(udrra.load("dpo"), tiny_llama(), rows, tokenizer=char_tokenizer(), output_dir=tmp_path / "d",
                max_steps=2, **{**FAST, "eval_pairs": None, "kl_prompts": None, "batch_size": 4})
    assert res["config"]["eval_pairs"] == 16 and res["config"]["kl_prompts"] == 16
    assert res["eval_after"]["eval/n_pairs"] == min(16, res["data"]["eval_pairs_available"])
    assert lm_train._default_eval_pairs(4, 1, 100) == 100 and lm_train._default_eval_pairs(2, 3, 1) == 12


def test_max_prompt_length_defaults_to_three_quarters_of_max_length(tmp_path):
    res = train(udrra.load("dpo"), tiny_llama(), ROWS, tokenizer=char_tokenizer(), output_dir=tmp_path / "d",
                max_steps=1, **{**FAST, "max_prompt_length": None, "max_length": 40})
    assert res["config"]["max_prompt_length"] == 30 and res["truncation"]["train"]["max_prompt_length"] == 30


def test_policy_and_reference_logps_agree_with_sequence_logps_on_the_training_batch():
    # the trainer's only log-prob path: a fresh reference copy scores exactly like the policy
    policy = tiny_llama()
    ref = make_reference(policy)
    x = torch.randint(3, 100, (2, 9))
    att = torch.ones_like(x)
    lm = torch.zeros_like(x)
    lm[:, 4:] = 1
    a, _ = sequence_logps(policy.eval(), x, att, lm)
    with torch.no_grad():
        b, _ = sequence_logps(ref, x, att, lm)
    assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("name", ["dpo", "ipo", "cdpo", "rdpo", "hinge", "simpo", "orpo", "fdpo_js", "fdpo_alpha", "nca"])
def test_every_builtin_pair_based_algorithm_trains_one_step_through_its_own_loss(tmp_path, name):
    algo = udrra.load(name)
    fast = {**FAST, "kl_prompts": 0, "eval_pairs": 2}
    res = train(algo, tiny_llama(), ROWS, tokenizer=char_tokenizer(), output_dir=tmp_path / name, max_steps=1, **fast)
    step = res["log_history"][0]
    assert math.isfinite(step["train/loss"]) and math.isfinite(res["eval_before"]["eval/loss"])
    assert (tmp_path / name / "algorithm.toml").read_text() == algo.to_toml()


def _tokenized_rows(n=10):
    pairs = [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in ROWS[:n]]
    rows, _ = tokenize_pairs(char_tokenizer(), pairs, max_length=48, max_prompt_length=24)
    return rows


def test_offline_pairs_collects_reference_logps_without_gradient_and_attaches_the_same_rows_with_it():
    rows = _tokenized_rows()
    policy = tiny_llama()
    reference = make_reference(policy)
    prod = OfflinePairs(rows, batch_size=3, pad_token_id=0, device="cpu", policy=policy, reference=reference, seed=5)
    order = list(range(len(rows)))
    random.Random(5).shuffle(order)
    batch = prod.collect()
    b = collate_pairs([rows[i] for i in order[:3]], 0)
    with torch.no_grad():
        ref, n = sequence_logps(reference, b["input_ids"], b["attention_mask"], b["loss_mask"])
    assert not batch.ref_chosen_logps.requires_grad and not batch.chosen_logps.requires_grad
    assert torch.equal(batch.ref_chosen_logps, ref[:3]) and torch.equal(batch.ref_rejected_logps, ref[3:])
    assert torch.equal(batch.chosen_lengths, n[:3]) and torch.equal(batch.rejected_lengths, n[3:])
    attached = prod.attach(batch)
    assert attached.chosen_logps.requires_grad and attached.ref_chosen_logps is batch.ref_chosen_logps
    assert torch.equal(attached.chosen_logps.detach(), ref[:3])  # the reference is a copy of the policy
    assert prod.attached[0][0] == 3 and torch.equal(prod.attached[0][1], ref)
    assert (prod.pairs_seen, prod.tokens_seen) == (3, int(b["attention_mask"].sum()))
    second = prod.collect()
    with pytest.raises(InputError, match="last collect"):
        prod.attach(batch)
    prod.attach(second)
    rng, orders = random.Random(5), []
    for _ in range(2):
        orders.append(list(range(len(rows))))
        rng.shuffle(orders[-1])
    fresh = OfflinePairs(rows, batch_size=3, pad_token_id=0, device="cpu", policy=policy, reference=None, seed=5)
    got = [fresh.next_rows() for _ in range(4)]  # a fresh shuffle once fewer than batch_size rows are left
    assert got == [[rows[i] for i in o] for o in (orders[0][:3], orders[0][3:6], orders[0][6:9], orders[1][:3])]
    assert fresh.epoch == 1
    no_ref = OfflinePairs(rows, batch_size=2, pad_token_id=0, device="cpu", policy=policy, reference=None, seed=0)
    assert torch.equal(no_ref.collect().ref_chosen_logps, torch.zeros(2))


def test_the_lm_trainer_runs_the_shared_loop_and_reset_every_counts_optimizer_steps_not_micro_batches(
        tmp_path, monkeypatch):
    calls = []

    def spy(*args, **kw):
        calls.append(kw)
        return udrra.loop.fit(*args, **kw)

    import udrra.lm.runner

    monkeypatch.setattr(udrra.lm.runner, "fit", spy)  # the step loop of every LM trainer
    algo = udrra.load("dpo", overrides={"reference.update": "reset_every", "reference.every": 2})
    fast = {**FAST, "batch_size": 2, "kl_prompts": 0}
    res = train(algo, tiny_llama(), ROWS, tokenizer=char_tokenizer(), output_dir=tmp_path / "a", max_steps=2,
                gradient_accumulation_steps=2, **fast)
    assert len(calls) == 1 and calls[0]["steps"] == 2 and calls[0]["accumulate"] == 2
    assert calls[0]["reference_update"] == udrra.loop.ReferenceUpdate("reset_every", every=2)
    assert res["pairs_seen"] == 8 and [h["step"] for h in res["log_history"]] == [1, 2]
    assert res["eval_after"]["eval/reward_margin"] == 0.0  # reset after optimizer step 2 (= 4 micro-batches)
    res = train(algo, tiny_llama(), ROWS, tokenizer=char_tokenizer(), output_dir=tmp_path / "b", max_steps=3,
                gradient_accumulation_steps=2, eval_steps=2, **fast)
    assert [h["step"] for h in res["eval_history"]] == [0, 2, 3]
    assert res["eval_history"][1]["eval/reward_margin"] == 0.0  # evaluated after step 2's reset
    assert res["eval_after"]["eval/reward_margin"] != 0.0  # step 3 moved the policy, not the reference
