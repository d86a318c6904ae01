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
    '"priority": one of low, normal, high, urgent}. '
    "Priority: urgent for an emergency, high when it blocks work, low when there is no rush, "
    "normal otherwise."
)

# Each team's problems name its subject (charges and invoices, errors and crashes, logins and
# users, parcels and delivery), and no problem borrows another team's words: the team follows
# from the ticket text, as a reader would route it.
_TEAM_PROBLEMS = {
    "billing": [
        "I was charged twice for my {plan} subscription",
        "my invoice for {month} shows the wrong amount",
        "the refund for my {plan} plan never arrived",
        "my card was declined but I was still charged",
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
        "my account was locked after too many login attempts",
        "how do I add a second user to my account",
        "my two-factor login codes are not accepted",
    ],
    "shipping": [
        "my package {order} has not moved for {days} days",
        "the parcel for order {order} arrived damaged",
        "I received the wrong item in order {order}",
        "can I change the delivery address for order {order}",
        "tracking for {order} says delivered but nothing came",
        "the courier lost my package {order}",
    ],
}
# Every ticket ends with one cue of its priority, and the cues of two priorities share no
# telling word (no "not urgent" among the low ones): the priority follows from the text too,
# which is what the system prompt's rule says. A fine-tune can learn the mapping; a base model
# that reads the rule could apply it.
_PRIORITY_CUES = {
    "low": ["No rush, whenever you can.", "Just a question for when you have time.", "Low priority for me.", "Whenever you get a chance."],
    "normal": ["Please have a look.", "Thanks for your help.", "Could you check?", "Let me know what you find."],
    "high": ["This is blocking my work.", "I need this fixed today.", "It stops my whole team from working.", "Please treat this as high priority."],
    "urgent": ["URGENT: everything is down right now!", "This is an emergency, please help now!", "Critical: nobody here can work at all!", "URGENT, we need help immediately!"],
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
    # Draw until `count` distinct tickets: a repeated text would be a duplicate, and the data
    # check would rightly flag it.
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
        # Smaller batches at a higher rate: twice the optimizer steps for about the same compute,
        # so the demo's 2 epochs learn the routing rather than half of it.
        "train.batch_size": 4,
        "train.learning_rate": 5e-4,
        "eval.max_new_tokens": 32,
    }
    if model:
        values["model.name"] = model
    write_text_atomic(config_path, "# tunesmith run config: every key with its meaning. Edit, then `tunesmith run config.yaml`.\n" + starter_yaml(values))
    return [config_path, data_path]
