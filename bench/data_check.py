"""Benchmark: `tunesmith data check` on a generated 1,000,000-row chat file, beside a plain script
running the checks of OpenAI's chat fine-tuning data-preparation notebook on the same file; and
`tunesmith data check --model` on CLINC-style data (one long system prompt listing the intents,
short user turns, one-intent answers) built from ../shared/data/clinc150.

    .venv/bin/python bench/data_check.py [--rows 1000000] [--file /tmp/tunesmith-bench/chat_1m.jsonl]
        [--model smollm2-135m-instruct] [--clinc-rows 0 (every example once)] [--baseline-src DIR]

`--baseline-src` names the src/ folder of another checkout (e.g. `git archive main`): both cases
then also run with that code, in the same run, so a speed-up is a measured ratio.

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


def generate_clinc(path: Path, source: Path, rows: int) -> int:
    """CLINC-style chat JSONL: one system prompt listing every intent, the utterance, the intent.
    Every example of every split once (rows=0), or cycled to `rows`. Returns the row count."""
    data = json.loads(source.read_text())
    examples = [e for split in ("train", "val", "test", "oos_train", "oos_val", "oos_test") for e in data[split]]
    intents = sorted({intent for _, intent in examples})
    system = (
        "You classify a request to a banking and personal assistant into one intent. "
        "Answer with the intent name only, one of: " + ", ".join(intents) + "."
    )
    rows = rows or len(examples)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            text, intent = examples[i % len(examples)]
            f.write(json.dumps({"messages": [
                {"role": "system", "content": system}, {"role": "user", "content": text}, {"role": "assistant", "content": intent},
            ]}) + "\n")
    return rows


def tunesmith_check(src: Path, path: Path, *extra: str) -> dict:
    """`tunesmith data check PATH --json` with the code of `src`, measured; its report parsed."""
    result = measure([sys.executable, "-m", "tunesmith", "data", "check", str(path), "--json", *extra], {"PYTHONPATH": str(src)})
    result["report"] = json.loads(result["stdout"]) if result["stdout"].strip() else None
    return result


def measure(command: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `command` as a child; wall seconds, peak RSS bytes (of that child only), exit code, stdout."""
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.DEVNULL, cwd=REPO, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        stdout = out.read().decode("utf-8", "replace")
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "cpu_s": usage.ru_utime + usage.ru_stime, "exit": child.returncode, "stdout": stdout}


def _side(result: dict, rows: int) -> dict:
    report = result["report"] or {"stats": {}, "counts": {}}
    return {
        "wall_s": round(result["wall_s"], 1), "cpu_s": round(result["cpu_s"], 1), "rows_per_s": round(rows / result["wall_s"]),
        "rows_per_s_in_check": report["stats"].get("rows_per_s"), "peak_rss_mib": round(result["peak_rss_bytes"] / 2**20),
        "exit": result["exit"], "counts": report.get("counts"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--file", type=Path, default=Path(tempfile.gettempdir()) / "tunesmith-bench" / "chat_1m.jsonl")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the tokenizer of the --model case ('' skips it)")
    parser.add_argument("--clinc", type=Path, default=REPO.parent / "shared" / "data" / "clinc150" / "data_full.json")
    parser.add_argument("--clinc-rows", type=int, default=0, help="rows of the CLINC-style file (0: every example once)")
    parser.add_argument("--baseline-src", type=Path, default=None, help="src/ of another checkout, measured side by side")
    args = parser.parse_args()

    meta = args.file.with_suffix(".meta")
    if not (args.file.exists() and meta.exists() and json.loads(meta.read_text()).get("rows") == args.rows):
        started = time.perf_counter()
        generate(args.file, args.rows)
        print(f"generated {args.file} ({args.rows:,} rows) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    size = args.file.stat().st_size

    src = REPO / "src"
    ours = tunesmith_check(src, args.file)
    peer = measure([sys.executable, str(REPO / "bench" / "openai_notebook_checks.py"), str(args.file)])
    peer_report = json.loads(peer["stdout"]) if peer["exit"] == 0 else None
    rows = ours["report"]["rows"]
    result = {
        "file": str(args.file), "rows": rows, "bytes": size, "cpu": os.cpu_count(),
        "tunesmith": {**_side(ours, rows), "exact_duplicates": ours["report"]["stats"]["exact_duplicates"],
                      "near_duplicates": ours["report"]["stats"]["near_duplicates"]["count"]},
        "openai_notebook": {
            "wall_s": round(peer["wall_s"], 1), "cpu_s": round(peer["cpu_s"], 1), "rows_per_s": round(rows / peer["wall_s"]),
            "peak_rss_mib": round(peer["peak_rss_bytes"] / 2**20), "exit": peer["exit"],
            "format_errors": peer_report["format_errors"] if peer_report else None,
        },
    }
    result["ratio_tunesmith_to_notebook_rows_per_s"] = round(result["tunesmith"]["rows_per_s"] / result["openai_notebook"]["rows_per_s"], 3)
    if args.baseline_src:
        result["baseline"] = _side(tunesmith_check(args.baseline_src, args.file), rows)
        result["ratio_tunesmith_to_baseline_rows_per_s"] = round(result["tunesmith"]["rows_per_s"] / result["baseline"]["rows_per_s"], 3)
    if args.model:
        clinc_path = args.file.parent / "clinc_chat.jsonl"
        clinc_rows = generate_clinc(clinc_path, args.clinc, args.clinc_rows)
        model_case = {"file": str(clinc_path), "rows": clinc_rows, "model": args.model,
                      "tunesmith": _side(tunesmith_check(src, clinc_path, "--model", args.model), clinc_rows)}
        if args.baseline_src:
            model_case["baseline"] = _side(tunesmith_check(args.baseline_src, clinc_path, "--model", args.model), clinc_rows)
            model_case["ratio_in_check_rows_per_s"] = round(
                model_case["tunesmith"]["rows_per_s_in_check"] / model_case["baseline"]["rows_per_s_in_check"], 2
            )
        result["model_case"] = model_case
    print(json.dumps(result, indent=2))
    _print_tables(result)
    return _verdict(result, ours)


def _print_tables(result: dict) -> None:
    rows, t, p = result["rows"], result["tunesmith"], result["openai_notebook"]
    print("\n| tool | rows | wall | rows/s | CPU time | peak RSS |\n|---|---|---|---|---|---|")
    print(f"| tunesmith data check | {rows:,} | {t['wall_s']} s | {t['rows_per_s']:,} | {t['cpu_s']} s | {t['peak_rss_mib']} MiB |")
    if "baseline" in result:
        b = result["baseline"]
        print(f"| tunesmith data check, baseline code | {rows:,} | {b['wall_s']} s | {b['rows_per_s']:,} | {b['cpu_s']} s | {b['peak_rss_mib']} MiB |")
    print(f"| OpenAI notebook checks | {rows:,} | {p['wall_s']} s | {p['rows_per_s']:,} | {p['cpu_s']} s | {p['peak_rss_mib']} MiB |")
    print(f"\nratio (tunesmith / notebook rows/s): {result['ratio_tunesmith_to_notebook_rows_per_s']}")
    model_case = result.get("model_case")
    if model_case:
        print(f"\n--model {model_case['model']} on {model_case['rows']:,} CLINC-style rows")
        print("| code | wall (with tokenizer load) | rows/s in the check | peak RSS |\n|---|---|---|---|")
        for name in ("tunesmith", "baseline"):
            if name in model_case:
                side = model_case[name]
                print(f"| {name} | {side['wall_s']} s | {side['rows_per_s_in_check']:,} | {side['peak_rss_mib']} MiB |")


def _verdict(result: dict, ours: dict) -> int:
    if ours["peak_rss_bytes"] >= GIB:
        print(f"FAIL: tunesmith peak RSS {result['tunesmith']['peak_rss_mib']} MiB >= 1 GiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
