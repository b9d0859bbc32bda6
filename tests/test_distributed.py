"""Multi-process training, checkpoints and faults (udrra.lm.parallel, udrra.lm.runner).

- 2 CPU processes (gloo, ``accelerate launch --multi_gpu --num_processes 2``) with ``--batch-size 4`` and one
  process with ``--batch-size 8`` see the same rows and end with the same parameters, offline (DPO) and online
  (REINFORCE with a batch-normalised baseline and ``token_mean``: batch-wide statistics and global token counts);
- a 6-step run interrupted by SIGTERM after step 3 and resumed from its checkpoint ends bit-identical (weights and
  training metrics) to an uninterrupted 6-step run, offline and online;
- a non-finite loss stops the run naming the step and the component, or is skipped and counted.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from dist_fixtures import write_inputs  # noqa: E402
from lm_fixtures import char_tokenizer, one_torch_thread, tiny_llama  # noqa: E402,F401
from safetensors.torch import load_file  # noqa: E402

import udrra  # noqa: E402
from udrra.errors import InputError, RunInterrupted, TrainingError  # noqa: E402
from udrra.lm.online import OnlineConfig, train_online  # noqa: E402
from udrra.lm.parallel import World, resolve_batch_size  # noqa: E402
from udrra.lm.producers import SeededOrder  # noqa: E402
from udrra.lm.rollout import Sampling  # noqa: E402
from udrra.lm.runner import MARKER, StepRunner, find_checkpoint  # noqa: E402
from udrra.lm.train import train  # noqa: E402

ROWS = [{"prompt": f"Q{i}: {i}+{i}=", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1} or so"} for i in range(30)]
PROMPTS = [{"prompt": f"tale {i}: the"} for i in range(24)]
#: training metrics that measure time, not training (excluded from "the same metrics")
TIMING = ("seconds", "tokens_per_second", "generation_s", "reward_s", "logprob_s")


class _State:
    """A stand-in for accelerate's PartialState: process ``rank`` of ``size``."""

    def __init__(self, rank, size):
        self.process_index, self.num_processes, self.is_main_process = rank, size, rank == 0
        self.device = torch.device("cpu")


def length_reward(prompts, responses):
    return [len(r) + (sum(map(ord, r)) % 10) / 10.0 for r in responses]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(d):
    return load_file(str(Path(d) / "model.safetensors"))


def _max_diff(a, b):
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _training_metrics(res):
    """log_history and eval metrics without timing entries."""
    def clean(d):
        return {k: v for k, v in d.items() if not any(k.endswith(t) for t in TIMING)}
    return ([clean(h) for h in res["log_history"]], [clean(h) for h in res["eval_history"]],
            clean(res["eval_after"]))


# ------------------------------------------------------------------------------------- sharding, batch sizes


def test_process_shards_are_the_one_process_batch_cut_in_rank_order():
    order = SeededOrder(20, 8, seed=3)
    one = [order.next() for _ in range(4)]                       # 8 rows per step, epochs of 16 (2 steps each)
    for size in (2, 4):
        shards = [World(_State(r, size)).shard(b) for b in one for r in range(size)]
        rebuilt = [sum(shards[i * size:(i + 1) * size], []) for i in range(len(one))]
        assert rebuilt == one
    with pytest.raises(InputError, match="does not divide over 3 processes"):
        World(_State(0, 3)).shard(list(range(8)))
    spans = [World(_State(r, 3)).span(7) for r in range(3)]
    assert spans == [(0, 3), (3, 5), (5, 7)]                     # uneven evaluation sets: 3 + 2 + 2


def test_seeded_order_state_round_trip_continues_the_same_order():
    a = SeededOrder(10, 4, seed=1)
    for _ in range(3):
        a.next()
    b = SeededOrder(10, 4, seed=99)
    b.load_state_dict(a.state_dict())
    assert [b.next() for _ in range(5)] == [a.next() for _ in range(5)]


def test_global_batch_size_errors_are_one_line_and_name_the_valid_values():
    two = World(_State(0, 2))
    assert resolve_batch_size(None, 8, two, accumulation=2) == 2
    assert resolve_batch_size(4, None, two) == 4
    with pytest.raises(InputError, match="smaller than the 2 processes"):
        resolve_batch_size(None, 1, two)
    with pytest.raises(InputError, match="a multiple of 4"):
        resolve_batch_size(None, 6, two, accumulation=2)
    with pytest.raises(InputError, match="disagree"):
        resolve_batch_size(3, 8, two)


def test_accelerates_silent_single_process_cpu_launch_is_refused(monkeypatch):
    """`accelerate launch --cpu --num_processes 2` starts one process; training it would silently not scale."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for k in ("WORLD_SIZE", "RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(InputError, match="started ONE process"):
        World()


# ------------------------------------------------------------------------------------- 2 processes = 1 process


def _launch(args, n, cwd, tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), "-m", "udrra.cli", *args] if n > 1 else [sys.executable, "-m", "udrra.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(udrra.__file__).parents[1])}
    env.pop("ACCELERATE_USE_CPU", None)
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.mark.parametrize("kind", ["offline", "online"])
def test_two_processes_with_half_the_batch_equal_one_process(kind, inputs, tmp_path):
    if kind == "offline":
        args = ["train", "dpo", "--model", inputs["model"], "--dataset", inputs["pairs"], "--max-length", "48",
                "--eval-pairs", "3", "--kl-prompts", "3", "--kl-max-new-tokens", "4"]
    else:
        args = ["train", "reinforce", "--set", "reward.baseline=batch_norm", "--set", "source.aggregation=token_mean",
                "--set", "source.n=2", "--model", inputs["model"], "--prompts", inputs["prompts"], "--reward",
                inputs["reward"], "--max-new-tokens", "8", "--eval-prompts", "5", "--sample-steps", "1"]
    args += ["--max-steps", "3", "--lr", "1e-3", "--threads", "1", "--no-progress"]
    _launch(args + ["--batch-size", "8", "--output-dir", str(tmp_path / "one")], 1, tmp_path, tmp_path)
    _launch(args + ["--batch-size", "4", "--output-dir", str(tmp_path / "two")], 2, tmp_path, tmp_path)
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert one["parallel"]["world_size"] == 1 and two["parallel"]["world_size"] == 2
    assert one["parallel"]["global_batch_size"] == two["parallel"]["global_batch_size"] == 8
    # the same rows, counted once: pairs / prompts seen, and the per-step training losses and rewards
    seen = "pairs_seen" if kind == "offline" else "prompts_seen"
    assert one[seen] == two[seen] == 24
    for h1, h2 in zip(one["log_history"], two["log_history"]):
        assert h1["train/loss"] == pytest.approx(h2["train/loss"], abs=1e-5)   # Σ of ±A (≈ 0 with batch_norm)
        if kind == "online":
            assert h1["train/reward"] == pytest.approx(h2["train/reward"], abs=1e-9)    # the same rollouts
    # one writer: the samples of both processes once, in the 1-process order
    if kind == "online":
        s1 = (tmp_path / "one" / "samples.jsonl").read_text().splitlines()
        assert s1 == (tmp_path / "two" / "samples.jsonl").read_text().splitlines() and len(s1) == 3 * 8 * 2
    # held-out rows split unevenly (2 + 1, 3 + 2) over the processes, each counted once
    assert one["eval_after"]["eval/n_prompts" if kind == "online" else "eval/n_pairs"] == (5 if kind == "online" else 3)
    untimed = [{k: v for k, v in r["eval_after"].items() if not k.endswith("seconds")} for r in (one, two)]
    assert untimed[1] == pytest.approx(untimed[0], abs=1e-5)       # each held-out row evaluated once
    # float32 reductions differ (DDP's all-reduce vs one batch), AdamW normalises each coordinate: lr·1e-3 bound
    assert _max_diff(_weights(tmp_path / "one"), _weights(tmp_path / "two")) < 1e-6
    assert not (tmp_path / "two" / "checkpoints").exists() and len(list(tmp_path.glob(".two*"))) == 0


# ------------------------------------------------------------------------------------------ checkpoints


def _interrupt_after(monkeypatch, at_step):
    """SIGTERM to this process once step ``at_step`` is done (as a scheduler's preemption would send it)."""
    orig = StepRunner._after

    def after(self, step, out):
        r = orig(self, step, out)
        if step == at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return r

    monkeypatch.setattr(StepRunner, "_after", after)


def _offline(out, **kw):
    algo = udrra.load("dpo", overrides={"reference.update": "ema", "reference.decay": 0.5})
    return train(algo, tiny_llama(), ROWS, tokenizer=char_tokenizer(), output_dir=out, max_steps=6, batch_size=2,
                 learning_rate=1e-2, max_length=48, eval_pairs=3, kl_prompts=2, kl_max_new_tokens=4, eval_steps=2,
                 logging_steps=2, progress=False, verbose=False, **kw)


def _online(out, **kw):
    tok = char_tokenizer()
    cfg = OnlineConfig(max_steps=6, batch_size=2, learning_rate=1e-3, sampling=Sampling(max_new_tokens=6),
                       eval_prompts=3, eval_steps=2, sample_steps=1, logging_steps=2, **kw)
    algo = udrra.load("ppo", overrides={"source.n": 2, "source.epochs": 2})
    return train_online(algo, tiny_llama(vocab_size=len(tok)), PROMPTS, length_reward, tokenizer=tok,
                        output_dir=out, config=cfg, progress=False, verbose=False)


@pytest.mark.parametrize("kind", ["offline", "online"])
def test_a_run_stopped_after_step_3_and_resumed_equals_the_uninterrupted_run(kind, tmp_path, monkeypatch):
    """Offline DPO with an EMA reference (its state is in the checkpoint); online PPO with a critic, 2 epochs and
    a sampling seed per row: weights and training metrics bit-identical."""
    run = _offline if kind == "offline" else _online
    full = run(tmp_path / "full")
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(RunInterrupted) as stop:
            run(tmp_path / "cut")
    assert stop.value.step == 3 and stop.value.signum == signal.SIGTERM
    ckpt = Path(stop.value.checkpoint)
    assert ckpt == tmp_path / "cut" / "checkpoints" / "checkpoint-3" and (ckpt / MARKER).is_file()
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["checkpoints"]   # no half-written output
    resumed = run(tmp_path / "cut", resume=str(ckpt))
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _training_metrics(resumed) == _training_metrics(full)
    assert resumed["resumed_from"] == str(ckpt)
    if kind == "online":
        assert (tmp_path / "cut" / "samples.jsonl").read_text() == (tmp_path / "full" / "samples.jsonl").read_text()


def test_save_steps_keeps_the_newest_checkpoints_and_resume_refuses_another_run(tmp_path):
    res = _offline(tmp_path / "r", save_steps=2, save_total_limit=2)
    names = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert names == ["checkpoint-4", "checkpoint-6"] and res["eval_after"]
    # a half-written checkpoint (no marker) is never picked
    (tmp_path / "r" / "checkpoints" / "checkpoint-9").mkdir()
    assert find_checkpoint(tmp_path / "r") == tmp_path / "r" / "checkpoints" / "checkpoint-6"
    with pytest.raises(InputError, match="different run.*batch_size: 2 -> 3"):
        train("dpo", tiny_llama(), ROWS, tokenizer=char_tokenizer(), output_dir=tmp_path / "r", max_steps=8,
              batch_size=3, learning_rate=1e-2, max_length=48, eval_pairs=3, kl_prompts=2, kl_max_new_tokens=4,
              eval_steps=2, logging_steps=2, progress=False, verbose=False, resume=str(tmp_path / "r"))
    with pytest.raises(InputError, match="does not exceed"):
        _offline(tmp_path / "r", resume=str(tmp_path / "r"))        # already at step 6 of 6


# ----------------------------------------------------------------------------------------------- faults


def _poison_loss_at(monkeypatch, at_step):
    """Multiply step ``at_step``'s loss by NaN (as an overflowing log-ratio would)."""
    orig, state = StepRunner._backward, {"step": 0}
    orig_before = StepRunner._before

    def before(self, step):
        state["step"] = step
        return orig_before(self, step)

    def backward(self, loss):
        return orig(self, loss * float("nan") if state["step"] == at_step else loss)

    monkeypatch.setattr(StepRunner, "_before", before)
    monkeypatch.setattr(StepRunner, "_backward", backward)


def test_a_nan_loss_stops_with_the_step_and_leaves_the_last_checkpoint(tmp_path, monkeypatch):
    _poison_loss_at(monkeypatch, 3)
    with pytest.raises(TrainingError, match=r"step 3: the loss was not finite .* the gradient of [\w.]+ is not "
                                            r"finite.*checkpoint-2"):
        _offline(tmp_path / "nan", save_steps=2)
    ckpt = tmp_path / "nan" / "checkpoints" / "checkpoint-2"
    assert (ckpt / MARKER).is_file() and not (tmp_path / "nan" / "checkpoints" / "checkpoint-4").exists()
    monkeypatch.undo()
    res = _offline(tmp_path / "nan", save_steps=2, resume=str(ckpt))    # the last good checkpoint resumes
    assert res["log_history"][-1]["step"] == 6


def test_on_nonfinite_skip_skips_the_update_and_counts_it(tmp_path, monkeypatch):
    _poison_loss_at(monkeypatch, 2)
    res = _offline(tmp_path / "skip", on_nonfinite="skip")
    assert res["skipped_steps"] == [2]
    assert res["log_history"][-1]["train/skipped_steps"] == 1.0
    assert all(torch.isfinite(w).all() for w in _weights(tmp_path / "skip").values())


def test_checkpoint_and_fault_options_are_checked_before_anything_loads(tmp_path):
    with pytest.raises(InputError, match="on_nonfinite must be one of stop, skip, got 'ignore'"):
        _offline(tmp_path / "a", on_nonfinite="ignore")
    with pytest.raises(InputError, match="save_steps must be an integer >= 0"):
        _online(tmp_path / "b", save_steps=-1)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
