"""The checks of OpenAI's cookbook notebook "Data preparation and analysis for chat model
fine-tuning" (examples/Chat_finetuning_data_prep.ipynb), as one plain script: the peer that
`tunesmith data check` is benchmarked against (bench/data_check.py).

Kept as the notebook does it: the whole file is loaded into a list first, then
  1. format errors: data_type, missing_messages_list, message_missing_key,
     message_unrecognized_key, unrecognized_role, missing_content,
     example_missing_assistant_message;
  2. per-example token counts (3 tokens per message + the tokens of every value + 1 per name
     + 3 for the reply), assistant tokens, missing system/user counts, distributions
     (min/max/mean/median/p5/p95), examples over 16,385 tokens;
  3. the billing estimate (epochs clamped so examples x epochs stays in 100..25,000).

One difference, stated: the notebook counts tokens with tiktoken's cl100k_base. Its encoding
file is downloaded from the internet, which this benchmark machine cannot reach, so tokens are
counted with a regex (`\\w+|[^\\w\\s]`: words and punctuation marks), which costs about what a
fast BPE tokenizer costs per character in pure Python and gives counts of the same order.

    python bench/openai_notebook_checks.py FILE  ->  one JSON object on stdout
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import defaultdict

import numpy as np

TOKEN = re.compile(r"\w+|[^\w\s]")
MAX_TOKENS_PER_EXAMPLE = 16385
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25000
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25


def encode(text) -> list[str]:
    return TOKEN.findall(text if isinstance(text, str) else json.dumps(text))


def num_tokens_from_messages(messages, tokens_per_message=3, tokens_per_name=1):
    num_tokens = 0
    for message in messages:
        num_tokens += tokens_per_message
        for key, value in message.items():
            num_tokens += len(encode(value))
            if key == "name":
                num_tokens += tokens_per_name
    num_tokens += 3
    return num_tokens


def num_assistant_tokens_from_messages(messages):
    return sum(len(encode(m["content"])) for m in messages if m["role"] == "assistant")


def distribution(values):
    return {
        "min": int(min(values)), "max": int(max(values)), "mean": float(np.mean(values)), "median": float(np.median(values)),
        "p5": float(np.quantile(values, 0.05)), "p95": float(np.quantile(values, 0.95)),
    }


def main(path: str) -> dict:
    started = time.perf_counter()
    with open(path, "r", encoding="utf-8") as f:
        dataset = [json.loads(line) for line in f]

    # 1. Format errors.
    format_errors: dict[str, int] = defaultdict(int)
    for ex in dataset:
        if not isinstance(ex, dict):
            format_errors["data_type"] += 1
            continue
        messages = ex.get("messages", None)
        if not messages:
            format_errors["missing_messages_list"] += 1
            continue
        for message in messages:
            if "role" not in message or "content" not in message:
                format_errors["message_missing_key"] += 1
            if any(k not in ("role", "content", "name", "function_call", "weight") for k in message):
                format_errors["message_unrecognized_key"] += 1
            if message.get("role", None) not in ("system", "user", "assistant", "function"):
                format_errors["unrecognized_role"] += 1
            content = message.get("content", None)
            function_call = message.get("function_call", None)
            if (not content and not function_call) or not isinstance(content, str):
                format_errors["missing_content"] += 1
        if not any(message.get("role", None) == "assistant" for message in messages):
            format_errors["example_missing_assistant_message"] += 1

    # 2. Token counts and warnings.
    n_missing_system = n_missing_user = 0
    n_messages, convo_lens, assistant_message_lens = [], [], []
    for ex in dataset:
        messages = ex["messages"]
        if not any(message["role"] == "system" for message in messages):
            n_missing_system += 1
        if not any(message["role"] == "user" for message in messages):
            n_missing_user += 1
        n_messages.append(len(messages))
        convo_lens.append(num_tokens_from_messages(messages))
        assistant_message_lens.append(num_assistant_tokens_from_messages(messages))
    n_too_long = sum(length > MAX_TOKENS_PER_EXAMPLE for length in convo_lens)

    # 3. Billing.
    n_epochs = TARGET_EPOCHS
    n_train_examples = len(dataset)
    if n_train_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        n_epochs = min(MAX_DEFAULT_EPOCHS, MIN_TARGET_EXAMPLES // n_train_examples)
    elif n_train_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        n_epochs = max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_train_examples)
    n_billing_tokens_in_dataset = sum(min(MAX_TOKENS_PER_EXAMPLE, length) for length in convo_lens)

    return {
        "rows": len(dataset),
        "format_errors": dict(format_errors),
        "missing_system": n_missing_system,
        "missing_user": n_missing_user,
        "messages_per_example": distribution(n_messages),
        "total_tokens_per_example": distribution(convo_lens),
        "assistant_tokens_per_example": distribution(assistant_message_lens),
        "over_16385_tokens": int(n_too_long),
        "billing_tokens_in_dataset": int(n_billing_tokens_in_dataset),
        "epochs": n_epochs,
        "billed_tokens": int(n_epochs * n_billing_tokens_in_dataset),
        "tokens": "regex \\w+|[^\\w\\s] (the notebook uses tiktoken cl100k_base)",
        "seconds": round(time.perf_counter() - started, 3),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1]), indent=2))
