"""SMS Spam Collection (CC BY 4.0, UCI) -> chat JSONL: message -> `spam` or `ham`.

Reads ../shared/data/sms_spam/SMSSpamCollection (TSV with a `Label<TAB>SMS` header); writes
data/all.jsonl here. The pipeline holds out `data.eval_fraction` of it, stratified by label.
The same conversion with the generic reader:
  tunesmith data convert ../../../shared/data/sms_spam/SMSSpamCollection data/all.jsonl \
      --format tsv --input-col SMS --output-col Label --system "..."
"""

import argparse
import csv
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_FILE = HERE.parents[1].parent / "shared" / "data" / "sms_spam" / "SMSSpamCollection"
SYSTEM = "You moderate SMS messages. Answer spam or ham."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    args = parser.parse_args()
    out = HERE / "data"
    out.mkdir(exist_ok=True)
    count = 0
    with open(args.file, encoding="utf-8", newline="") as f, open(out / "all.jsonl", "w") as w:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        assert header == ["Label", "SMS"], header
        for label, text in reader:
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}, {"role": "assistant", "content": label}]
            w.write(json.dumps({"messages": messages}) + "\n")
            count += 1
    print(f"wrote {out / 'all.jsonl'}: {count} examples")


if __name__ == "__main__":
    main()
