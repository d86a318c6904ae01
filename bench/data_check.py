"""Benchmark: `tunesmith data check` on a generated 1,000,000-row chat file, beside a plain script
running the checks of OpenAI's chat fine-tuning data-preparation notebook on the same file.

    .venv/bin/python bench/data_check.py [--rows 1000000] [--file /tmp/tunesmith-bench/chat_1m.jsonl]

The file is generated deterministically (seed 0) outside the repository and reused when its
sidecar .meta says it has the requested rows. Each tool runs as a child process; its wall time
and peak RSS come from os.wait4 (the kernel's rusage of that child alone). tunesmith must stay
under 1 GiB RSS; the run fails loudly otherwise. Results go to stdout as Markdown and JSON;
copy them to BENCHMARKS.md ("Data check").

What each side does:
- tunesmith: every per-row check (format, roles, order, weights, UTF-8), exact duplicates,
  MinHash near-duplicates, conflicting answers, label balance, JSON answers, PII; no tokenizer
  (no --model), streaming with bounded memory.
- the notebook's checks (bench/openai_notebook_checks.py): its seven format-error counts, token
  counts per example with a regex tokenizer (the notebook's tiktoken needs the internet), token
  distributions and the billing estimate; it loads the whole file first, as the notebook does.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30
WORDS = (
    "order invoice refund parcel login password screen update account billing shipping courier error crash "
    "export sync device plan card bank address email delivery tracking damaged wrong missing slow button page "
    "report chart number letter window table chair garden river mountain coffee music the a my is not since "
    "yesterday today please help urgent again still cannot why how when where what new old first last"
).split()
TEAMS = ["billing", "shipping", "technical", "account", "returns", "sales"]
SYSTEMS = [
    "You route support tickets to a team. Answer with the team name only.",
    "You are a helpful support agent. Answer briefly and politely.",
]


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """A chat JSONL file of `rows` examples: ticket routing (labels) and short replies, ~1% repeats."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    recent: list[str] = []
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(rows):
            if recent and rng.random() < 0.01:
                f.write(rng.choice(recent))  # an exact duplicate of a recent row
                continue
            user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 40))) + f" #{rng.randrange(10**6)}"
            if rng.random() < 0.6:
                system, answer = SYSTEMS[0], rng.choice(TEAMS)
            else:
                system, answer = SYSTEMS[1], " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))
            line = json.dumps({"messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
                {"role": "assistant", "content": answer},
            ]}) + "\n"
            f.write(line)
            if i % 997 == 0:
                recent = (recent + [line])[-64:]
    os.replace(tmp, path)
    path.with_suffix(".meta").write_text(json.dumps({"rows": rows, "seed": seed}))


def measure(command: list[str]) -> dict:
    """Run `command` as a child; wall seconds, peak RSS bytes (of that child only), exit code, stdout."""
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.DEVNULL, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        stdout = out.read().decode("utf-8", "replace")
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "cpu_s": usage.ru_utime + usage.ru_stime, "exit": child.returncode, "stdout": stdout}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--file", type=Path, default=Path(tempfile.gettempdir()) / "tunesmith-bench" / "chat_1m.jsonl")
    args = parser.parse_args()

    meta = args.file.with_suffix(".meta")
    if not (args.file.exists() and meta.exists() and json.loads(meta.read_text()).get("rows") == args.rows):
        started = time.perf_counter()
        generate(args.file, args.rows)
        print(f"generated {args.file} ({args.rows:,} rows) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    size = args.file.stat().st_size

    env_python = sys.executable
    ours = measure([env_python, "-m", "tunesmith", "data", "check", str(args.file), "--json"])
    report = json.loads(ours["stdout"])
    peer = measure([env_python, str(REPO / "bench" / "openai_notebook_checks.py"), str(args.file)])
    peer_report = json.loads(peer["stdout"]) if peer["exit"] == 0 else None

    rows = report["rows"]
    result = {
        "file": str(args.file),
        "rows": rows,
        "bytes": size,
        "cpu": os.cpu_count(),
        "tunesmith": {
            "wall_s": round(ours["wall_s"], 1), "cpu_s": round(ours["cpu_s"], 1), "rows_per_s": round(rows / ours["wall_s"]),
            "rows_per_s_in_check": report["stats"]["rows_per_s"], "peak_rss_mib": round(ours["peak_rss_bytes"] / 2**20),
            "exit": ours["exit"], "counts": report["counts"], "exact_duplicates": report["stats"]["exact_duplicates"],
            "near_duplicates": report["stats"]["near_duplicates"]["count"],
        },
        "openai_notebook": {
            "wall_s": round(peer["wall_s"], 1), "cpu_s": round(peer["cpu_s"], 1), "rows_per_s": round(rows / peer["wall_s"]),
            "peak_rss_mib": round(peer["peak_rss_bytes"] / 2**20), "exit": peer["exit"],
            "format_errors": peer_report["format_errors"] if peer_report else None,
        },
    }
    result["ratio_tunesmith_to_notebook_rows_per_s"] = round(result["tunesmith"]["rows_per_s"] / result["openai_notebook"]["rows_per_s"], 3)
    print(json.dumps(result, indent=2))
    t, p = result["tunesmith"], result["openai_notebook"]
    print(f"\n| tool | rows | wall | rows/s | peak RSS |\n|---|---|---|---|---|")
    print(f"| tunesmith data check | {rows:,} | {t['wall_s']} s | {t['rows_per_s']:,} | {t['peak_rss_mib']} MiB |")
    print(f"| OpenAI notebook checks | {rows:,} | {p['wall_s']} s | {p['rows_per_s']:,} | {p['peak_rss_mib']} MiB |")
    print(f"\nratio (tunesmith / notebook rows/s): {result['ratio_tunesmith_to_notebook_rows_per_s']}")
    if ours["peak_rss_bytes"] >= GIB:
        print(f"FAIL: tunesmith peak RSS {t['peak_rss_mib']} MiB >= 1 GiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
