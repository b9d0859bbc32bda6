"""Collects benchmark rows and writes them as markdown tables (device, versions, date) in benchmarks/results/."""
import datetime
import os
import platform
from collections import defaultdict

import pytest
import torch

ROWS = defaultdict(list)
HERE = os.path.dirname(__file__)


@pytest.fixture
def record():
    """record(table_name, dict_row): a row for benchmarks/results/<table_name>.md."""
    def add(table, row):
        ROWS[table].append(row)
    return add


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), {gpu}"


def pytest_sessionfinish(session, exitstatus):
    if not ROWS:
        return
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    for table, rows in ROWS.items():
        cols = list(rows[0])
        lines = [f"# {table}", "",
                 f"- date: {datetime.date.today().isoformat()}",
                 f"- machine: {machine()}",
                 f"- versions: python {platform.python_version()}, torch {torch.__version__}", "",
                 "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
        with open(os.path.join(HERE, "results", f"{table}.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
