"""Medical Abstracts TC corpus (CC BY-SA 3.0, sebischair) -> chat JSONL: abstract -> condition.

Reads ../shared/data/medical_abstracts/medical_tc_test.csv and medical_tc_labels.csv; writes
data/all.jsonl here (the pipeline holds out a stratified share).
"""

import argparse
import csv
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE.parents[1].parent / "shared" / "data" / "medical_abstracts"
SYSTEM = (
    "Classify the medical abstract by condition. Answer with one of: neoplasms, digestive system diseases, "
    "nervous system diseases, cardiovascular diseases, general pathological conditions."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    args = parser.parse_args()
    with open(args.data_root / "medical_tc_labels.csv", encoding="utf-8") as f:
        names = {row["condition_label"]: row["condition_name"] for row in csv.DictReader(f)}
    out = HERE / "data"
    out.mkdir(exist_ok=True)
    count = 0
    with open(args.data_root / "medical_tc_test.csv", encoding="utf-8", newline="") as f, open(out / "all.jsonl", "w") as w:
        for row in csv.DictReader(f):
            messages = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": row["medical_abstract"]},
                {"role": "assistant", "content": names[row["condition_label"]]},
            ]
            w.write(json.dumps({"messages": messages}) + "\n")
            count += 1
    print(f"wrote {out / 'all.jsonl'}: {count} examples")


if __name__ == "__main__":
    main()
