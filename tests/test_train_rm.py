"""udrra.lm.train_rm: Bradley–Terry reward-model training end to end on a tiny random Llama."""

import argparse
import json
import random

import pytest
import torch

pytest.importorskip("transformers")
from lm_fixtures import char_tokenizer, one_torch_thread, tiny_llama  # noqa: E402,F401

from udrra.errors import InputError  # noqa: E402
from udrra.lm.data import PreferencePair, tokenize_pairs  # noqa: E402
from udrra.lm.rewards import load_reward  # noqa: E402
from udrra.lm.train_rm import (_zero_head_metrics, add_train_rm_arguments, build_reward_model,  # noqa: E402
                               evaluate_reward_model, run_train_rm_from_args, train_reward_model)

WORDS = ["the film", "our trip", "dinner", "the book", "my day", "the game", "class", "the show", "lunch", "work"]


def _rows(n=200, seed=0):
    """Chosen responses say 'good', rejected ones 'bad'; both end in 'd', so the last token alone cannot tell."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        w = rng.choice(WORDS)
        rows.append({"prompt": f"Q{i}: how was {w}?", "chosen": f" {w} was good", "rejected": f" {w} was bad"})
    return rows


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_lm")
    tiny_llama().save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return f


FAST = dict(batch_size=8, learning_rate=3e-3, max_length=48, eval_pairs=20, progress=False, verbose=False)


@pytest.fixture(scope="module")
def trained(lm_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "rm"
    res = train_reward_model(str(lm_dir), str(data_file), output_dir=out, max_steps=40, **FAST)
    return out, res


def test_build_from_a_causal_lm_copies_the_backbone_and_zeroes_the_head(lm_dir):
    rm, tok, info = build_reward_model(str(lm_dir))
    lm = tiny_llama()
    assert type(rm).__name__ == "LlamaForSequenceClassification" and rm.config.num_labels == 1
    assert info["head_init"] == "zeros" and info["backbone_keys_copied"] == len(lm.model.state_dict())
    for k, v in lm.model.state_dict().items():
        assert torch.equal(rm.model.state_dict()[k], v), k
    assert torch.count_nonzero(rm.score.weight) == 0 and rm.config.pad_token_id == tok.pad_token_id == 0
    # the zero head's metrics, reported without a pass, are what an evaluation pass computes
    rows, _ = tokenize_pairs(tok, [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in _rows(6)],
                             max_length=48, max_prompt_length=36, append_eos=False)
    run = evaluate_reward_model(rm, rows, batch_size=4, pad_token_id=0)
    shortcut = _zero_head_metrics(rm, 6)
    assert {k: run[k] for k in shortcut if k not in ("seconds", "note")} == \
        {k: v for k, v in shortcut.items() if k not in ("seconds", "note")}


def test_training_learns_the_pattern_writes_metrics_and_reloads_as_a_reward(trained, data_file):
    out, res = trained
    assert sorted(p.name for p in out.parent.iterdir()) == ["rm"]  # no temporary sibling left
    m = json.loads((out / "metrics.json").read_text())
    for k in ("config", "model", "data", "truncation", "eval_before", "eval_after", "log_history", "seconds_per_step",
              "peak_rss_mb", "torch_threads", "train_time_s", "wall_time_s", "loss", "scoring", "versions"):
        assert k in m, k
    assert m["torch_threads"] == 1 and m["config"]["append_eos"] is False
    assert [h["step"] for h in m["log_history"]] == list(range(1, 41))
    assert {"train/loss", "train/accuracy", "train/margin", "train/grad_norm"} <= set(m["log_history"][0])
    before, after = m["eval_before"], m["eval_after"]
    assert before["n_pairs"] == after["n_pairs"] == 20
    # zero head: every pair starts tied (ties count 1/2), margin 0, loss log 2
    assert before["accuracy"] == 0.5 and before["margin"] == 0.0
    assert after["accuracy"] > before["accuracy"] and after["accuracy"] >= 0.9 and after["margin"] > 0
    assert m["data"]["split"]["totals"] == [180, 20] and m["model"]["head_init"] == "zeros"
    assert res["eval_after"] == after and res["output_dir"] == str(out.resolve())
    # the saved model is a reward: it ranks held-out chosen above rejected
    r = load_reward(str(out))
    rows = _rows(40, seed=1)
    rc = r([x["prompt"] for x in rows], [x["chosen"] for x in rows])
    rr = r([x["prompt"] for x in rows], [x["rejected"] for x in rows])
    assert float((rc > rr).float().mean()) >= 0.9


def test_train_layers_freezes_all_but_the_last_layers_and_training_continues_from_a_checkpoint(trained, data_file,
                                                                                                tmp_path):
    ckpt, _ = trained
    start, tok, info = build_reward_model(str(ckpt))
    assert info["initialised_from"] == "sequence-classification checkpoint"
    res = train_reward_model(str(ckpt), str(data_file), output_dir=tmp_path / "more", max_steps=3, train_layers=1,
                             **FAST)
    assert res["model"]["trained_layers"] == [1] and res["model"]["head_init"] == "from checkpoint"
    # the continued model starts where the checkpoint ended
    assert res["eval_before"]["accuracy"] == pytest.approx(json.loads((ckpt / "metrics.json").read_text())
                                                           ["eval_after"]["accuracy"])
    end = load_reward(str(tmp_path / "more")).model
    s0, s1 = start.state_dict(), end.state_dict()
    frozen = [k for k in s0 if k.startswith(("model.embed_tokens", "model.layers.0."))]
    trained_keys = [k for k in s0 if k.startswith(("model.layers.1.", "score"))]
    assert frozen and all(torch.equal(s0[k], s1[k]) for k in frozen)
    assert any(not torch.equal(s0[k], s1[k]) for k in trained_keys)


def test_bad_arguments_and_non_empty_output_dir_write_nothing(lm_dir, data_file, tmp_path):
    out = tmp_path / "sub" / "rm"
    for kw, match in [(dict(max_steps=0), "max_steps must be an integer >= 1"),
                      (dict(learning_rate=float("nan")), "learning_rate"),
                      (dict(train_layers=3), r"train_layers must be in \[0, 2\]"),
                      (dict(batch_size=500), "fewer than batch_size=500"),
                      (dict(dataset=str(tmp_path / "missing.jsonl")), "not found")]:
        args = dict(FAST, max_steps=1)
        args.update(kw)
        with pytest.raises(InputError, match=match):
            train_reward_model(str(lm_dir), args.pop("dataset", str(data_file)), output_dir=out, **args)
        assert list(tmp_path.iterdir()) == [], match
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        train_reward_model(str(lm_dir), str(data_file), output_dir=taken, max_steps=1, **FAST)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_cli_arguments_run_and_overwrite(lm_dir, data_file, tmp_path):
    out = tmp_path / "cli"
    out.mkdir()
    (out / "old.txt").write_text("x")
    p = add_train_rm_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--model", str(lm_dir), "--dataset", str(data_file), "--output-dir", str(out),
                         "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3", "--max-length", "40",
                         "--eval-pairs", "4", "--seed", "3", "--split-seed", "7", "--train-layers", "0",
                         "--threads", "1", "--overwrite", "--no-progress"])
    assert run_train_rm_from_args(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert not (out / "old.txt").exists()
    c = m["config"]
    assert (c["max_steps"], c["batch_size"], c["learning_rate"], c["max_length"], c["eval_pairs"], c["seed"],
            c["split_seed"], c["train_layers"]) == (2, 4, 1e-3, 40, 4, 3, 7, 0)
    assert m["model"]["trainable_parameters"] == 32 + 32  # final norm + score head of the hidden-32 model


def test_a_failure_during_training_leaves_nothing_behind(lm_dir, data_file, tmp_path, monkeypatch):
    import udrra.lm.train_rm as T

    def nan_scores(model, input_ids, attention_mask):
        return torch.full((input_ids.shape[0],), float("nan"), requires_grad=True)

    monkeypatch.setattr(T, "last_token_scores", nan_scores)
    with pytest.raises(InputError, match="step 1: the loss is nan"):
        train_reward_model(str(lm_dir), str(data_file), output_dir=tmp_path / "new" / "rm", max_steps=2, **FAST)
    assert list(tmp_path.iterdir()) == []
