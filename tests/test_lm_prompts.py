"""udrra.lm.prompts: prompt-only datasets for on-policy rollouts (loading, hold-out, left truncation)."""

import gzip
import json

import pytest

pytest.importorskip("transformers")
from lm_fixtures import BOS, char_tokenizer, one_torch_thread  # noqa: E402,F401

from udrra.errors import InputError  # noqa: E402
from udrra.lm import data as D  # noqa: E402
from udrra.lm.prompts import (BUILTIN_PROMPTS, DEFAULT_EVAL_PROMPTS, PromptData, PromptTruncation,  # noqa: E402
                              load_prompts, tokenize_prompts)


def ids(text):
    """Expected ids of the char tokenizer, computed independently of the tokenizer."""
    return [4 + (95 if c == "\n" else ord(c) - 32) for c in text]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def needs(folder):
    if not (D.data_dir() / folder).is_dir():
        pytest.skip(f"shared/data/{folder} not present")


# -------------------------------------------------------------------------------------------- tinystories


def paragraphs_by_lines(path):
    """Blank-line-separated paragraphs, by grouping non-blank lines (independent of the module's regex)."""
    paras, cur = [], []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            cur.append(line)
        elif cur:
            paras.append("\n".join(cur))
            cur = []
    if cur:
        paras.append("\n".join(cur))
    return paras


def test_tinystories_prompts_follow_the_documented_rule_on_the_real_file():
    needs("tinystories-val-subset")
    data = load_prompts("tinystories")
    paras = paragraphs_by_lines(D.data_dir() / "tinystories-val-subset" / "tinystories_val.txt")
    assert paras[0].startswith("Spot. Spot saw the shiny car")  # the partial first story: dropped
    # paragraphs 1..5 of the file, read by eye; k = 4 + (i mod 5) words
    by_hand = ["After playing with the car,",  # i=1, k=5
               "Once upon a time, in a",  # i=2, k=6
               "Roxy tried to climb the icy hill,",  # i=3, k=7
               "Roxy told Billy about the icy hill and",  # i=4, k=8
               "This time, Roxy didn't"]  # i=5, k=4
    everything = set(data.train) | set(data.eval)
    assert all(p in everything for p in by_hand)
    assert not any(p.startswith("Spot. Spot saw") for p in everything)
    # the whole rule, recomputed from the independent paragraph split
    expected, short = [], 0
    for i, para in enumerate(paras[1:], start=1):
        w = para.split()
        k = 4 + i % 5
        if len(w) > k:
            expected.append(" ".join(w[:k]))
        else:
            short += 1
    unique = list(dict.fromkeys(expected))
    assert expected[:5] == by_hand
    assert len(paras) == 4302 and short == 80 and len(expected) == 4221 and len(unique) == 3516
    assert data.info["stories"] == 4301 and data.info["dropped"] == {"too_short": 80}
    assert data.info["duplicates_dropped"] == 4221 - 3516 and data.info["prompts"] == 3516
    assert everything == set(unique)
    assert all(4 <= len(p.split()) <= 8 for p in everything)
    # both parts keep file order
    pos = {p: j for j, p in enumerate(unique)}
    assert [pos[p] for p in data.train] == sorted(pos[p] for p in data.train)
    assert len(data.eval) == DEFAULT_EVAL_PROMPTS == 64 and len(data.train) == 3516 - 64
    assert "4 + (i mod 5)" in data.info["rule"] and data.info["license"] == "CDLA-Sharing-1.0"
    assert data.describe().startswith("tinystories: 3452 train / 64 eval prompts (rule: ")


def test_tinystories_eval_is_disjoint_from_train_and_fixed_by_the_seed():
    needs("tinystories-val-subset")
    a, b = load_prompts("tinystories", seed=3), load_prompts("tinystories", seed=3)
    c = load_prompts("tinystories", seed=4, eval_prompts=10)
    assert not set(a.eval) & set(a.train)
    assert (a.train, a.eval) == (b.train, b.eval)
    assert len(c.eval) == 10 and not set(c.eval) <= set(a.eval)
    assert set(c.train) | set(c.eval) == set(a.train) | set(a.eval)
    assert a.info["split"]["seed"] == 3 and c.info["split"]["seed"] == 4


# ---------------------------------------------------------------------------- built-in preference prompts


def test_hh_rlhf_prompts_are_the_dialogue_prompts_of_the_preference_splits():
    needs("hh-rlhf")
    data = load_prompts("hh-rlhf", seed=5, eval_prompts=20)
    assert len(data.eval) == 20 and len(data.train) > 6000
    assert all(p.startswith("\n\nHuman:") and p.endswith("\n\nAssistant:") for p in data.train + data.eval)
    assert len(set(data.train)) == len(data.train) and not set(data.train) & set(data.eval)
    pref = D.load_preference_data("hh-rlhf", seed=5)
    assert data.eval == list(dict.fromkeys(p.prompt for p in pref.eval))[:20]
    assert set(data.train) == {p.prompt for p in pref.train} - set(data.eval)
    assert data.info["license"] == "MIT" and data.info["split"]["seed"] == 5


def test_ultrafeedback_prompts_are_rendered_with_the_chat_template_when_the_tokenizer_has_one():
    needs("ultrafeedback-binarized-1200")
    plain = load_prompts("ultrafeedback-1200")
    chat = load_prompts("ultrafeedback-1200", char_tokenizer(), eval_prompts=200)
    with open(D.data_dir() / "ultrafeedback-binarized-1200" / "train.jsonl") as f:
        first = json.loads(f.readline())["prompt"]
    assert first == "how to cook t-bone in the oven"
    assert plain.train[0] == first and chat.train[0] == "[user]how to cook t-bone in the oven\n[assistant]"
    assert all(p.startswith("[user]") and p.endswith("\n[assistant]") for p in chat.train + chat.eval)
    assert len(plain.eval) == 64 and len(chat.eval) == 199  # 200 eval rows, one dropped by the pair loader
    assert not set(chat.train) & set(chat.eval) and all(p.strip() for p in plain.train + plain.eval)


# --------------------------------------------------------------------------------------- row sources


def test_jsonl_with_string_prompts_holds_out_seeded_disjoint_eval_rows_in_file_order(tmp_path):
    rows = [{"prompt": f"Question {i}?", "answer": "ignored", "id": i} for i in range(10)]
    f = write_jsonl(tmp_path / "p.jsonl", rows + [{"prompt": "Question 3?", "id": 99}])  # one duplicate
    data = load_prompts(f, seed=0, eval_prompts=3)
    allp = [f"Question {i}?" for i in range(10)]
    assert len(data.eval) == 3 and len(data.train) == 7
    assert sorted(data.train + data.eval, key=allp.index) == allp and not set(data.train) & set(data.eval)
    assert data.train == [p for p in allp if p not in data.eval] and data.eval == sorted(data.eval, key=allp.index)
    assert data.info["duplicates_dropped"] == 1 and data.info["format"] == "plain" and data.info["rows"] == 11
    again = load_prompts(f, seed=0, eval_prompts=3)
    assert (again.train, again.eval) == (data.train, data.eval)
    assert any(load_prompts(f, seed=s, eval_prompts=3).eval != data.eval for s in (1, 2))
    gz = tmp_path / "p.jsonl.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    assert load_prompts(str(gz), seed=0, eval_prompts=3).eval == data.eval


def test_small_sources_hold_out_max_1_or_10_percent_and_say_so(tmp_path):
    five = load_prompts([{"prompt": c} for c in "abcde"])  # 5 < 64 + 1: max(1, 0.5) = 1
    assert (len(five.train), len(five.eval)) == (4, 1) and "held out max(1, 10%) = 1" in five.info["split"]["note"]
    thirty = load_prompts([{"prompt": f"q{i}"} for i in range(30)], eval_prompts=30)  # 30 < 31: 3
    assert (len(thirty.train), len(thirty.eval)) == (27, 3)
    exact = load_prompts([{"prompt": f"q{i}"} for i in range(31)], eval_prompts=30)  # 31 = 30 + 1: as asked
    assert (len(exact.train), len(exact.eval)) == (1, 30) and "note" not in exact.info["split"]
    none = load_prompts([{"prompt": "only"}], eval_prompts=0)
    assert (none.train, none.eval) == (["only"], [])


def test_jsonl_with_message_lists_renders_the_chat_template_with_a_generation_prompt(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]},
            {"prompt": [{"role": "user", "content": "Name a color"}], "completion": "ignored"}]
    tok = char_tokenizer()
    data = load_prompts(write_jsonl(tmp_path / "m.jsonl", rows), tok, eval_prompts=0)
    assert data.train == ["[system]Be brief.\n[user]hi\n[assistant]", "[user]Name a color\n[assistant]"]
    assert data.eval == [] and data.info["format"] == "conversational"
    p_ids, stats = tokenize_prompts(tok, data.train, max_prompt_length=64)
    assert p_ids[1] == ids("[user]Name a color\n[assistant]") and stats.truncated == 0
    with pytest.raises(InputError, match=r"row 0: conversational \(message-list\) data needs a tokenizer with a chat"):
        load_prompts(write_jsonl(tmp_path / "m.jsonl", rows))


def test_datasets_parquet_and_columnar_sources_use_the_prompt_column_and_a_given_eval_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    cols = {"prompt": ["a?", "b?", "c?", "d?"], "score": [1, 2, 3, 4]}
    from_ds = load_prompts(datasets.Dataset.from_dict(cols), eval_prompts=1, seed=9)
    from_dict = load_prompts(cols, eval_prompts=1, seed=9)
    pq.write_table(pa.table(cols), tmp_path / "p.parquet")
    from_pq = load_prompts(str(tmp_path / "p.parquet"), eval_prompts=1, seed=9)
    assert len(from_ds.eval) == 1 and sorted(from_ds.train + from_ds.eval) == cols["prompt"]
    assert (from_dict.train, from_dict.eval) == (from_pq.train, from_pq.eval) == (from_ds.train, from_ds.eval)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["x", "y", "z"]}),
                               "test": datasets.Dataset.from_dict({"prompt": ["t1", "y", "t2", "t3"]})})
    given = load_prompts(dd, eval_prompts=2)
    assert given.eval == ["t1", "y"] and given.train == ["x", "z"]  # 'y' is held out, so it leaves train
    assert given.info["split"]["overlap_dropped_from_train"] == 1


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_names_missing_paths_and_hub_ids_without_allow_hub_are_errors(tmp_path):
    with pytest.raises(InputError) as e:
        load_prompts("tinystorys")
    assert "'tinystorys' not found" in str(e.value) and "tinystories, hh-rlhf, ultrafeedback-1200" in str(e.value)
    with pytest.raises(InputError, match="not found: not a local file or directory"):
        load_prompts(str(tmp_path / "nope.jsonl"))
    with pytest.raises(InputError, match="allow_hub=True"):
        load_prompts("someone/prompts")
    txt = tmp_path / "p.txt"
    txt.write_text("hello\n")
    with pytest.raises(InputError, match=r"must be \.json, \.jsonl, \.jsonl\.gz or \.parquet"):
        load_prompts(str(txt))
    assert set(BUILTIN_PROMPTS) == {"tinystories", "hh-rlhf", "ultrafeedback-1200"}


def test_missing_builtin_folder_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("UDRRA_DATA_DIR", str(tmp_path))
    with pytest.raises(InputError, match=f"'tinystories' not found at {tmp_path}"):
        load_prompts("tinystories")


def test_bad_rows_name_the_problem_and_the_row(tmp_path):
    with pytest.raises(InputError) as e:
        load_prompts([{"question": "q", "answer": "a"}])
    assert "no 'prompt' column" in str(e.value) and "['question', 'answer']" in str(e.value)
    with pytest.raises(InputError, match=r"row 2 of .*: empty or whitespace-only prompt"):
        load_prompts([{"prompt": "a"}, {"prompt": "b"}, {"prompt": " \n\t"}])
    with pytest.raises(InputError, match=r"row 1 of .*: empty or whitespace-only prompt"):
        load_prompts([{"prompt": "a"}, {"prompt": ""}])
    with pytest.raises(InputError, match=r"row 1 of .*: prompt must be a non-empty string or a non-empty message"):
        load_prompts([{"prompt": "a"}, {"prompt": None}])
    with pytest.raises(InputError, match="mixes strings and message lists"):
        load_prompts([{"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}]}], char_tokenizer())
    with pytest.raises(InputError, match="no prompts in 'list'"):
        load_prompts([])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="no prompts in"):
        load_prompts(str(empty))
    with pytest.raises(InputError, match="too few to hold out"):
        load_prompts([{"prompt": "only one"}])
    for bad in (-1, 2.5):
        with pytest.raises(InputError, match=r"eval_prompts must be an integer >= 0"):
            load_prompts([{"prompt": "a"}, {"prompt": "b"}], eval_prompts=bad)


# ------------------------------------------------------------------------------------------ tokenisation


def test_tokenize_prompts_cuts_long_prompts_from_the_left_and_counts_them():
    tok = char_tokenizer()
    rows, stats = tokenize_prompts(tok, ["0123456789", "abc", "wxyz", "Hello, world"], max_prompt_length=4)
    assert rows == [ids("6789"), ids("abc"), ids("wxyz"), ids("orld")]
    assert rows[0] == [26, 27, 28, 29]  # "6" is chr(54): 54 - 32 + 4 = 26
    assert stats.as_dict() == {"max_prompt_length": 4, "rows": 4, "truncated": 2, "tokens_dropped": 6 + 8}
    assert stats.describe() == "2/4 prompts truncated from the left to 4 tokens (14 tokens dropped)"
    assert tokenize_prompts(tok, [], max_prompt_length=3) == ([], PromptTruncation(3))


def test_tokenize_prompts_prepends_bos_when_the_tokenizer_adds_one_and_cuts_it_with_the_left_end():
    tok = char_tokenizer(add_bos=True)
    rows, stats = tokenize_prompts(tok, ["ab", "abcdef", ""], max_prompt_length=4)
    assert rows == [[BOS] + ids("ab"), ids("cdef"), [BOS]]  # bos + 6 chars = 7 tokens -> last 4
    assert (stats.rows, stats.truncated, stats.tokens_dropped) == (3, 1, 3)


def test_tokenize_prompts_errors_name_the_limit_and_the_empty_row():
    tok = char_tokenizer()
    for bad in (0, -3):
        with pytest.raises(InputError, match="max_prompt_length must be an integer >= 1"):
            tokenize_prompts(tok, ["a"], max_prompt_length=bad)
    with pytest.raises(InputError, match="row 1: the prompt tokenizes to 0 tokens and the tokenizer adds no bos"):
        tokenize_prompts(tok, ["a", ""], max_prompt_length=4)


def test_prompt_data_describe_is_one_line_with_the_counts_and_the_rule():
    d = PromptData("x", ["a", "b"], ["c"], {"rule": "by hand"})
    assert d.describe() == "x: 2 train / 1 eval prompts (rule: by hand)"
