"""udrra.lm.data: loading, validation, splitting, tokenisation and collation of preference data."""

import gzip
import json

import pytest
import torch

pytest.importorskip("transformers")
from lm_fixtures import BOS, EOS, PAD, char_tokenizer, one_torch_thread  # noqa: E402,F401

from udrra.errors import InputError  # noqa: E402
from udrra.lm import data as D  # noqa: E402
from udrra.lm.data import (PreferencePair, collate_pairs, load_preference_data, rows_to_pairs,  # noqa: E402
                           split_hh_dialogue, stratified_split, tokenize_pair, tokenize_pairs)

def ids(text):
    """Expected ids of the char tokenizer, computed independently of the tokenizer."""
    return [4 + (95 if c == "\n" else ord(c) - 32) for c in text]


# ------------------------------------------------------------------------------------------ HH split

DIALOGUE = ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke"
            "\n\nAssistant: Why did the chicken cross the road?")


def test_split_hh_dialogue_splits_at_the_last_assistant_marker_and_keeps_it_in_the_prompt():
    prompt, resp = split_hh_dialogue(DIALOGUE)
    assert prompt == ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke"
                      "\n\nAssistant:")
    assert resp == " Why did the chicken cross the road?"
    assert prompt + resp == DIALOGUE


def test_implicit_prompt_hh_rows_share_the_prompt_and_keep_only_the_final_replies():
    rejected = DIALOGUE.rsplit("\n\nAssistant:", 1)[0] + "\n\nAssistant: No."
    pairs, dropped, fmt = rows_to_pairs([{"chosen": DIALOGUE, "rejected": rejected}])
    assert fmt == "hh-dialogue" and not dropped
    assert pairs[0].prompt.endswith("Tell me a joke\n\nAssistant:")
    assert (pairs[0].chosen, pairs[0].rejected) == (" Why did the chicken cross the road?", " No.")


# ---------------------------------------------------------------------------------- bad user input


def test_missing_column_error_names_the_existing_and_required_columns():
    with pytest.raises(InputError) as e:
        rows_to_pairs([{"prompt": "p", "chosen": "a", "response_b": "b"}])
    msg = str(e.value)
    assert "['rejected']" in msg and "['prompt', 'chosen', 'response_b']" in msg and "required" in msg
    assert "\n" not in msg


def test_user_row_with_chosen_equal_to_rejected_is_an_error_naming_the_row():
    with pytest.raises(InputError, match=r"row 1: chosen == rejected"):
        rows_to_pairs([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "x", "rejected": "x"}])


def test_user_row_whose_rejected_dialogue_does_not_start_with_the_prompt_is_an_error():
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: bye\n\nAssistant: no"}]
    with pytest.raises(InputError, match="row 0: prompt is not a prefix"):
        rows_to_pairs(rows)


def test_user_row_with_an_empty_response_is_an_error():
    with pytest.raises(InputError, match="row 0: empty response"):
        rows_to_pairs([{"prompt": "p", "chosen": "  ", "rejected": "b"}])


def test_builtin_mode_drops_degenerate_rows_and_counts_them_by_reason():
    rows = [{"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant: y"},
            {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant: x"},
            {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
            {"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: y"},
            {"chosen": "no marker here", "rejected": "no marker there"}]
    pairs, dropped, _ = rows_to_pairs(rows, strict=False)
    assert len(pairs) == 1
    assert dict(dropped) == {"chosen_equals_rejected": 1, "prompt_not_prefix": 1, "empty_response": 1,
                             "no_assistant_marker": 1}


# ---------------------------------------------------------------------------------- conversational


def test_conversational_rows_render_the_prompt_with_the_chat_template_and_keep_the_assistant_text():
    tok = char_tokenizer()
    explicit = {"prompt": [{"role": "user", "content": "hi"}],
                "chosen": [{"role": "assistant", "content": "hello"}],
                "rejected": [{"role": "assistant", "content": "go away"}]}
    implicit = {"chosen": explicit["prompt"] + explicit["chosen"], "rejected": explicit["prompt"] + explicit["rejected"]}
    for row in (explicit, implicit):
        pairs, _, fmt = rows_to_pairs([row], tok)
        assert fmt == "conversational"
        assert pairs[0] == PreferencePair("[user]hi\n[assistant]", "hello", "go away")
    tp = tokenize_pair(tok, pairs[0].prompt, pairs[0].chosen, pairs[0].rejected)
    assert tp.chosen_ids == ids("[user]hi\n[assistant]") + ids("hello") + [EOS]


def test_conversational_rows_whose_histories_differ_are_an_error():
    row = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
           "rejected": [{"role": "user", "content": "ho"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(InputError, match="not a prefix"):
        rows_to_pairs([row], char_tokenizer())


# ------------------------------------------------------------------------------------------ splits


def test_stratified_split_counts_per_subset_match_the_fractions_and_the_seed_fixes_the_split():
    pairs = [PreferencePair(f"p{s}{i}", "a", "b", s) for s, n in (("A", 100), ("B", 37), ("C", 10)) for i in range(n)]
    (tr, va, te), info = stratified_split(pairs, (0.8, 0.1, 0.1), seed=7)
    expected = {"A": [80, 10, 10], "B": [37 - 4 - 4, 4, 4], "C": [8, 1, 1]}  # round(3.7) = 4
    assert info["counts"] == expected and info["seed"] == 7
    for part, k in ((tr, 0), (va, 1), (te, 2)):
        got = {s: sum(p.subset == s for p in part) for s in "ABC"}
        assert got == {s: expected[s][k] for s in "ABC"}
    assert len({p.prompt for p in tr + va + te}) == 147  # a partition
    (tr2, va2, _), _ = stratified_split(pairs, (0.8, 0.1, 0.1), seed=7)
    assert [p.prompt for p in va2] == [p.prompt for p in va]
    (_, va3, _), _ = stratified_split(pairs, (0.8, 0.1, 0.1), seed=8)
    assert [p.prompt for p in va3] != [p.prompt for p in va]


def _write_fake_hh(root, n=20):
    for k, s in enumerate(D.HH_SUBSETS):
        (root / "hh-rlhf" / s).mkdir(parents=True)
        with gzip.open(root / "hh-rlhf" / s / "test.jsonl.gz", "wt") as f:
            for i in range(n + k):
                p = f"\n\nHuman: q{s}{i}\n\nAssistant:"
                f.write(json.dumps({"chosen": p + " good", "rejected": p + (" good" if i == 0 else " bad")}) + "\n")


def test_builtin_hh_rlhf_from_udrra_data_dir_is_stratified_and_records_seed_counts_and_drops(tmp_path, monkeypatch):
    _write_fake_hh(tmp_path)
    monkeypatch.setenv("UDRRA_DATA_DIR", str(tmp_path))
    data = load_preference_data("hh-rlhf", seed=3)
    # row 0 of each subset has chosen == rejected: dropped, not an error
    assert data.info["dropped"] == {"chosen_equals_rejected": 4}
    n_usable = [19, 20, 21, 22]
    assert data.info["split"]["seed"] == 3 and data.info["split"]["fractions"] == [0.8, 0.1, 0.1]
    for s, n in zip(D.HH_SUBSETS, n_usable):
        nv = round(n * 0.1)
        assert data.info["split"]["counts"][s] == [n - 2 * nv, nv, nv]
    assert len(data.train) + len(data.eval) + len(data.test) == sum(n_usable)
    assert "seed 3" in data.describe() and "dropped 4" in data.describe()


def test_builtin_dataset_missing_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("UDRRA_DATA_DIR", str(tmp_path))
    with pytest.raises(InputError, match=f"not found at {tmp_path}"):
        load_preference_data("hh-rlhf")


def test_real_hh_rlhf_split_covers_all_8552_pairs_minus_the_dropped_ones():
    if not (D.data_dir() / "hh-rlhf").is_dir():
        pytest.skip("shared/data/hh-rlhf not present")
    data = load_preference_data("hh-rlhf")
    assert data.info["raw_total"] == 8552
    n_dropped = sum(data.info["dropped"].values())
    assert 0 < n_dropped < 100
    assert len(data.train) + len(data.eval) + len(data.test) == 8552 - n_dropped
    for s, (a, b, c) in data.info["split"]["counts"].items():
        n = a + b + c
        assert b == c == round(0.1 * n)


def test_local_jsonl_file_loads_and_holds_out_a_seeded_eval_split(tmp_path):
    f = tmp_path / "prefs.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(20)))
    data = load_preference_data(str(f), seed=5, cache_dir=str(tmp_path / "cache"))
    assert (len(data.train), len(data.eval)) == (18, 2)
    assert data.info["split"]["seed"] == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "chosen": "a"}) + "\n")
    with pytest.raises(InputError, match="missing column"):
        load_preference_data(str(bad), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(InputError, match="not found"):
        load_preference_data(str(tmp_path / "nope.jsonl"))


# ---------------------------------------------------------------------------------- tokenisation


def test_tokenize_pair_masks_exactly_the_response_tokens_and_appends_eos():
    tok = char_tokenizer()
    tp = tokenize_pair(tok, "Q: hi", " ok", " no way", max_length=64, max_prompt_length=32)
    assert tp.prompt_ids == ids("Q: hi")
    assert tp.chosen_ids == ids("Q: hi") + ids(" ok") + [EOS]
    assert tp.rejected_ids == ids("Q: hi") + ids(" no way") + [EOS]
    b = collate_pairs([tp], PAD)
    assert b["loss_mask"][0].tolist() == [0] * 5 + [1] * 4 + [0] * 4  # padded to the rejected length 13
    assert b["loss_mask"][1].tolist() == [0] * 5 + [1] * 8


def test_tokenize_pair_prepends_bos_when_the_tokenizer_adds_one():
    tp = tokenize_pair(char_tokenizer(add_bos=True), "Q", "a", "b")
    assert tp.prompt_ids == [BOS] + ids("Q") and tp.chosen_ids == [BOS] + ids("Q") + ids("a") + [EOS]


def test_changing_only_prompt_tokens_leaves_the_response_ids_and_loss_mask_unchanged():
    tok = char_tokenizer()
    a = collate_pairs([tokenize_pair(tok, "Human: abc", " reply", " other")], PAD)
    b = collate_pairs([tokenize_pair(tok, "Human: xyz", " reply", " other")], PAD)
    assert torch.equal(a["loss_mask"], b["loss_mask"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    m = a["loss_mask"].bool()
    assert torch.equal(a["input_ids"][m], b["input_ids"][m])
    assert not torch.equal(a["input_ids"], b["input_ids"])


def test_truncation_cuts_the_prompt_from_the_left_then_responses_from_the_right_and_counts_rows():
    tok = char_tokenizer()
    pairs = [PreferencePair("0123456789", "abcdefgh", "xy"),  # prompt 10 > 6 -> last 6; chosen 9 > 10-6=4
             PreferencePair("012", "ab", "cd"),  # fits: 3 + 3 <= 10
             PreferencePair("0123", "abcdefghijk", "z")]  # prompt fits; chosen 12 > 10-4=6
    rows, stats = tokenize_pairs(tok, pairs, max_length=10, max_prompt_length=6)
    assert rows[0].prompt_ids == ids("456789")
    assert rows[0].chosen_ids == ids("456789") + ids("abcd")  # eos cut with the tail
    assert rows[0].rejected_ids == ids("456789") + ids("xy") + [EOS]
    assert rows[1].chosen_ids == ids("012") + ids("ab") + [EOS] and not rows[1].truncated
    assert rows[2].chosen_ids == ids("0123") + ids("abcdef") and rows[2].rejected_ids == ids("0123z") + [EOS]
    assert all(len(r.chosen_ids) <= 10 and len(r.rejected_ids) <= 10 for r in rows)
    assert all(len(r.chosen_ids) > len(r.prompt_ids) for r in rows)  # every response keeps tokens
    assert stats.as_dict() == {"rows": 3, "truncated_rows": 2, "prompt_truncated": 1, "chosen_truncated": 2,
                               "rejected_truncated": 0, "max_length": 10, "max_prompt_length": 6}


def test_max_prompt_length_must_leave_room_for_a_response():
    with pytest.raises(InputError, match="max_prompt_length"):
        tokenize_pair(char_tokenizer(), "p", "a", "b", max_length=8, max_prompt_length=8)


def test_collate_pairs_right_pads_chosen_then_rejected_into_2b_rows():
    tok = char_tokenizer()
    rows, _ = tokenize_pairs(tok, [PreferencePair("ab", "c", "defg"), PreferencePair("a", "bcdefgh", "i")])
    b = collate_pairs(rows, PAD)
    assert b["input_ids"].shape == (4, 9) and int(b["n_pairs"]) == 2
    assert b["attention_mask"].sum(-1).tolist() == [4, 9, 7, 3]
    assert b["loss_mask"].sum(-1).tolist() == [2, 8, 5, 2]
    assert b["input_ids"][0].tolist() == ids("abc") + [EOS] + [PAD] * 5
    assert (b["loss_mask"] <= b["attention_mask"]).all()
