"""On-disk inputs for runs launched as separate processes (``accelerate launch``, the CLI): a tiny random Llama
with its character tokenizer, preference pairs, prompts and a programmatic reward, all local."""

import json
import sys
from pathlib import Path

from lm_fixtures import char_tokenizer, tiny_llama

PAIRS = [{"prompt": f"Q{i}: {i}+{i}=", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1} or so"} for i in range(40)]
PROMPTS = [{"prompt": f"tale {i}: the"} for i in range(40)]
REWARD = '''def reward(prompts, responses):
    """Length plus a character checksum: differs between almost any two responses."""
    return [len(r) + (sum(map(ord, r)) % 10) / 10.0 for r in responses]
'''


def write_inputs(root: Path) -> dict:
    """Write model/, pairs.jsonl, prompts.jsonl and reward.py under ``root``; returns their paths as strings."""
    root = Path(root)
    tok = char_tokenizer()
    model = tiny_llama(seed=0, vocab_size=len(tok), tie=True)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    for name, rows in (("pairs.jsonl", PAIRS), ("prompts.jsonl", PROMPTS)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "reward.py").write_text(REWARD)
    return {"model": str(root / "model"), "pairs": str(root / "pairs.jsonl"), "prompts": str(root / "prompts.jsonl"),
            "reward": f"{root / 'reward.py'}:reward"}


if __name__ == "__main__":
    print(json.dumps(write_inputs(Path(sys.argv[1]))))
