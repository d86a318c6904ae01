"""SNIPS NLU benchmark (CC0, sonos/nlu-benchmark) -> chat JSONL: utterance -> {"intent", "slots"}.

Reads ../shared/data/snips/train_<Intent>_full.json and validate_<Intent>.json. The utterance is
the concatenation of the pieces; a piece with `entity` is a slot value. The PlayMusic file is
CESU-8 (surrogate pairs for emoji), not UTF-8: it is decoded with surrogatepass and re-encoded.
"""

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE.parents[1].parent / "shared" / "data" / "snips"
INTENTS = ["AddToPlaylist", "BookRestaurant", "GetWeather", "PlayMusic", "RateBook", "SearchCreativeWork", "SearchScreeningEvent"]
SYSTEM = (
    "Parse the request into JSON with keys intent (one of " + ", ".join(INTENTS) + ") and slots "
    "(an object from slot name to the exact words of the request). Answer with JSON only."
)


def read_json(path: Path) -> dict:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # CESU-8: surrogate pairs encoded one by one. Recombine them through UTF-16.
        text = raw.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass").decode("utf-16")
    return json.loads(text)


def record(intent: str, pieces: list) -> dict:
    text = "".join(p["text"] for p in pieces)
    slots: dict[str, str] = {}
    for p in pieces:
        if "entity" in p:
            value = p["text"].strip()
            slots[p["entity"]] = f"{slots[p['entity']]} {value}" if p["entity"] in slots else value
    answer = json.dumps({"intent": intent, "slots": slots}, ensure_ascii=False)
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text.strip()}, {"role": "assistant", "content": answer}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--per-intent", type=int, default=600, help="training examples per intent")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    train, evaluation = [], []
    for intent in INTENTS:
        items = read_json(args.data_root / f"train_{intent}_full.json")[intent]
        rng.shuffle(items)
        train += [record(intent, item["data"]) for item in items[: args.per_intent]]
        evaluation += [record(intent, item["data"]) for item in read_json(args.data_root / f"validate_{intent}.json")[intent]]
    rng.shuffle(train)
    rng.shuffle(evaluation)  # mixed intents, so eval.max_examples takes a fair sample
    out = HERE / "data"
    out.mkdir(exist_ok=True)
    for name, rows in (("train", train), ("eval", evaluation)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {out / (name + '.jsonl')}: {len(rows)} examples")


if __name__ == "__main__":
    main()
