"""CLINC150 (CC BY 3.0, clinc/oos-eval) -> chat JSONL: utterance -> intent, `out_of_scope` for oos.

Reads ../shared/data/clinc150/data_full.json; writes data/train.jsonl and data/eval.jsonl here.
Training uses `--per-intent` examples of each of the 150 intents plus `--oos-train` out-of-scope
utterances (oos_train, then oos_val, then oos_test beyond the part held out); evaluation uses the
official test split (sampled with `--eval-per-intent`) plus the first `--oos-eval` of oos_test.
No utterance is on both sides.
"""

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE.parents[1].parent / "shared" / "data" / "clinc150"
SYSTEM = "Classify the banking, travel, home, work or small-talk request into one intent label. Answer with the label only; answer out_of_scope when no intent fits."


def record(text: str, intent: str) -> dict:
    label = "out_of_scope" if intent == "oos" else intent
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}, {"role": "assistant", "content": label}]}


def sample(items: list, per_label: int, rng: random.Random) -> list:
    by_label: dict[str, list] = {}
    for text, intent in items:
        by_label.setdefault(intent, []).append((text, intent))
    out = []
    for intent in sorted(by_label):
        group = by_label[intent]
        rng.shuffle(group)
        out.extend(group[:per_label])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--per-intent", type=int, default=80)
    parser.add_argument("--eval-per-intent", type=int, default=5)
    parser.add_argument("--oos-train", type=int, default=500)
    parser.add_argument("--oos-eval", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    data = json.loads((args.data_root / "data_full.json").read_text())
    oos_pool = data["oos_train"] + data["oos_val"] + data["oos_test"][args.oos_eval :]
    train = sample(data["train"], args.per_intent, rng) + oos_pool[: args.oos_train]
    test = sample(data["test"], args.eval_per_intent, rng) + data["oos_test"][: args.oos_eval]
    rng.shuffle(train)
    out = HERE / "data"
    out.mkdir(exist_ok=True)
    for name, rows in (("train", train), ("eval", test)):
        with open(out / f"{name}.jsonl", "w") as f:
            for text, intent in rows:
                f.write(json.dumps(record(text, intent)) + "\n")
        print(f"wrote {out / (name + '.jsonl')}: {len(rows)} examples")


if __name__ == "__main__":
    main()
