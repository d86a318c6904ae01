"""`tunesmith init DIR`: a commented starter config and a small example dataset.

The dataset is the project's own: a deterministic generator of customer-support tickets,
each routed to a JSON answer `{"team": ..., "priority": ...}`. It is the shape of the work
tunesmith is for (a closed output format a general model gets almost right) and needs no
download.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tunesmith.artifacts import write_text_atomic
from tunesmith.config import starter_yaml
from tunesmith.errors import UserError

SYSTEM_PROMPT = (
    "You route customer support tickets. Answer with JSON only: "
    '{"team": one of billing, technical, account, shipping; '
    '"priority": one of low, normal, high, urgent}.'
)

_TEAM_PROBLEMS = {
    "billing": [
        "I was charged twice for my {plan} subscription",
        "my invoice for {month} shows the wrong amount",
        "the refund for order {order} never arrived",
        "my card was declined but the money left my account",
        "I need a VAT invoice for {month}",
        "you billed me after I cancelled the {plan} plan",
    ],
    "technical": [
        "the app crashes when I open the {feature} page",
        "I get error {code} when I try to sync",
        "the {feature} export produces an empty file",
        "the website is very slow since the last update",
        "notifications stopped working on my {device}",
        "the {feature} button does nothing on my {device}",
    ],
    "account": [
        "I cannot log in, the password reset email never comes",
        "please change the email address on my account",
        "I want to delete my account and all my data",
        "my account was locked after too many attempts",
        "how do I add a second user to my {plan} account",
        "two-factor codes are not accepted on my {device}",
    ],
    "shipping": [
        "my package {order} has not moved for {days} days",
        "the parcel arrived damaged",
        "I received the wrong item in order {order}",
        "can I change the delivery address for order {order}",
        "tracking for {order} says delivered but nothing came",
        "the courier lost my package {order}",
    ],
}
_PRIORITY_CUES = {
    "low": ["No rush, whenever you can.", "Just a question.", "Not urgent at all.", ""],
    "normal": ["Please have a look.", "Thanks for your help.", "Could you check?", ""],
    "high": ["This is blocking my work.", "Please fix this soon.", "I need this today.", "It affects my whole team."],
    "urgent": ["URGENT: we are losing money every hour!", "Production is down, please help now!", "This is an emergency.", "Critical, our customers are affected right now!"],
}
_OPENERS = ["Hi,", "Hello team,", "Hey,", "Good morning,", "Dear support,", ""]
_FILL = {
    "plan": ["Pro", "Basic", "Team", "Enterprise"],
    "month": ["January", "March", "June", "September", "November"],
    "feature": ["reports", "dashboard", "calendar", "invoices", "settings"],
    "code": ["E401", "E503", "0x80070005", "SYNC-17", "E1002"],
    "device": ["iPhone", "Android phone", "iPad", "Windows laptop", "Mac"],
    "days": ["3", "5", "8", "12"],
}


def support_tickets(count: int = 300, seed: int = 0) -> list[dict]:
    """`count` OpenAI-chat records, the same for the same seed."""
    rng = random.Random(seed)
    records = []
    teams = sorted(_TEAM_PROBLEMS)
    priorities = list(_PRIORITY_CUES)
    seen: set[str] = set()
    # Draw until `count` distinct tickets: a repeated text would be a duplicate, or a conflict
    # when its priority cue is empty, and the data check would rightly flag it.
    for _ in range(count * 50):
        if len(records) == count:
            break
        team = rng.choice(teams)
        # Most tickets are normal; urgent ones are rare, as in real queues.
        priority = rng.choices(priorities, weights=[2, 5, 3, 1])[0]
        problem = rng.choice(_TEAM_PROBLEMS[team])
        values = {k: rng.choice(v) for k, v in _FILL.items()}
        values["order"] = f"#{rng.randint(10000, 99999)}"
        text = " ".join(p for p in (rng.choice(_OPENERS), problem.format(**values) + ".", rng.choice(_PRIORITY_CUES[priority])) if p)
        if text in seen:
            continue
        seen.add(text)
        answer = json.dumps({"team": team, "priority": priority})
        records.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return records


def write_starter(folder: Path, count: int = 300, seed: int = 0, model: str | None = None, force: bool = False) -> list[Path]:
    """Write DIR/config.yaml and DIR/data/tickets.jsonl; refuse to overwrite unless `force`."""
    folder = Path(folder)
    config_path = folder / "config.yaml"
    data_path = folder / "data" / "tickets.jsonl"
    if not force:
        existing = [p for p in (config_path, data_path) if p.exists()]
        if existing:
            raise UserError(f"{existing[0]} already exists", "pick an empty folder or pass --force")
    lines = "".join(json.dumps(r) + "\n" for r in support_tickets(count, seed))
    write_text_atomic(data_path, lines)
    values = {
        "name": folder.resolve().name,
        "output_dir": "run",
        "data.train": "data/tickets.jsonl",
        "data.max_length": 256,
        "train.epochs": 2.0,
        "eval.max_new_tokens": 32,
    }
    if model:
        values["model.name"] = model
    write_text_atomic(config_path, "# tunesmith run config: every key with its meaning. Edit, then `tunesmith run config.yaml`.\n" + starter_yaml(values))
    return [config_path, data_path]
