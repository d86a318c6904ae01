"""`tunesmith advise`: when to fine-tune, and when not, from the data's measured statistics.

No model is called: the data check's statistics (size, answer shape, labels, conflicts) go
through a few documented rules (docs/data.md, "advise"), first match wins, so the advice is
reproducible and its reasons can be read back against the numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tunesmith.check import FEW_EXAMPLES, IMBALANCE_RATIO, CheckReport, check_file
from tunesmith.errors import UserError
from tunesmith.humanize import plural

# A system prompt this long, on nearly every example, is worth a word: it is paid at every step.
LONG_SYSTEM_PROMPT_CHARS = 300  # ~75 tokens; a label list (`card_declined, ...`) has few words for its tokens

RAG_WORDS = ("document", "docs", "knowledge base", "manual", "faq", "wiki", "pdf", "policy", "policies", "retriev", "search our")


@dataclass
class Advice:
    recommendation: str  # "fine-tune with LoRA", "prompt engineering first", "RAG", "fix the data first"
    task_kind: str  # "classification", "structured JSON", "free-form generation", "document QA"
    reasons: list[str]
    stats: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def task_kind(stats: dict[str, Any], task: str | None = None) -> tuple[str, list[str]]:
    """The kind of task from measured statistics (and the user's description), with the evidence."""
    shape = stats.get("shape") or {}
    text = (task or "").lower()
    reasons = []
    input_words = (shape.get("input_words") or {}).get("median", 0)
    overlap = shape.get("answer_overlap_with_prompt_median") or 0.0
    questions = shape.get("question_share", 0.0)
    if input_words >= 150 and questions >= 0.5 and overlap >= 0.5:
        reasons.append(
            f"prompts are long (median {input_words:.0f} words), {questions:.0%} ask a question and answers "
            f"copy {overlap:.0%} of their words from the prompt: questions about documents"
        )
        return "document QA", reasons
    if any(w in text for w in RAG_WORDS) and questions >= 0.3:
        reasons.append(f"the task mentions documents/knowledge and {questions:.0%} of prompts are questions")
        return "document QA", reasons
    # Past document QA, the kind is the data's, by the rule eval uses (metrics.task_kind).
    data_task = stats.get("task")
    if data_task == "json":
        reasons.append("every answer is a JSON object or array")
        return "structured JSON", reasons
    if data_task == "classification":
        labels = stats.get("labels") or {}
        reasons.append(f"answers form a closed set of {labels.get('distinct')} labels")
        return "classification", reasons
    answer_words = (shape.get("answer_words") or {}).get("median", 0)
    reasons.append(f"answers are open text (median {answer_words:.0f} words)")
    return "free-form generation", reasons


def advise_report(report: CheckReport, task: str | None = None) -> Advice:
    """The guide's "when to fine-tune, and when not" applied to a check report. Rules in docs/data.md."""
    stats = report.stats
    n = report.examples
    kind, reasons = task_kind(stats, task)
    reasons.append(stats.get("size_advice", f"{n} examples"))
    shape = stats.get("shape") or {}

    # Output-format consistency.
    consistent = True
    json_share = shape.get("json_answer_share") or 0.0
    if kind == "structured JSON":
        parse = shape.get("json_parse_share") or 0.0
        keys = shape.get("json_top_keys_share")
        if json_share < 0.95 or parse < 0.95:
            consistent = False
            reasons.append(f"only {json_share * parse:.0%} of answers are valid JSON: make the format uniform first")
        elif keys is not None and keys < 0.8:
            consistent = False
            reasons.append(f"only {keys:.0%} of JSON answers share the same keys: make the schema uniform first")
        else:
            reasons.append("answers are valid JSON with consistent keys: a format a small tuned model learns well")
    elif json_share >= 0.2:
        consistent = False
        reasons.append(f"{json_share:.0%} of answers are JSON and the rest are not: the output format is inconsistent")
    conflicts = stats.get("conflicting_inputs", 0)
    if n and conflicts / n > 0.05:
        consistent = False
        reasons.append(f"{conflicts} prompts have conflicting answers ({conflicts / n:.0%}): the labels disagree with themselves")
    if kind == "classification" and stats.get("labels"):
        ratio = stats["labels"]["imbalance_ratio"]
        reasons.append(f"label imbalance {ratio}x" + (" (report per-label scores, not only accuracy)" if ratio >= IMBALANCE_RATIO else ""))
    system = shape.get("system_prompt")
    input_words = (shape.get("input_words") or {}).get("median", 0)
    if system and system["share"] >= 0.9 and system["chars"] >= LONG_SYSTEM_PROMPT_CHARS and system["words"] >= 2 * input_words:
        reasons.append(
            f"{system['share']:.0%} of examples open with the same {system['chars']:,}-character system prompt, most of what the model reads: "
            "training computes it once per batch (train.shared_prefix; `tunesmith data estimate` prices it by batch size), "
            "and a fine-tune learns the label set or format from the answers, so a short prompt, or none, trains and serves "
            "for a fraction of the tokens"
        )

    if report.errors:
        recommendation = "fix the data first"
        reasons.insert(0, f"the data check found {plural(report.error_count, 'error')}: `tunesmith data check` lists them")
    elif kind == "document QA":
        recommendation = "RAG"
        reasons.append(
            "answers come from the documents in the prompt: retrieve the right passages at question time "
            "(RAG) instead of teaching facts into weights; fine-tune later only for tone or format"
        )
    elif n < FEW_EXAMPLES:
        recommendation = "prompt engineering first"
        reasons.append("use these examples as few-shot prompts and measure; fine-tune once you have 500+ reviewed examples")
    elif not consistent:
        recommendation = "fix the data first"
        reasons.append("a model learns the inconsistency too: clean the answers, then fine-tune")
    else:
        recommendation = "fine-tune with LoRA"
        if kind in ("classification", "structured JSON"):
            reasons.append("a closed output format with enough examples: LoRA on a small model usually beats prompting it")
        else:
            reasons.append("free-form answers benefit less: compare against the base model with few-shot prompts (tunesmith eval does)")
    return Advice(recommendation, kind, reasons, stats)


def advise_file(
    path: str | Path,
    task: str | None = None,
    *,
    format: str = "auto",
    input_col: str | None = None,
    output_col: str | None = None,
    system_prompt: str | None = None,
) -> Advice:
    """`tunesmith advise`: check the file (without a model) and turn its statistics into advice."""
    report = check_file(path, format=format, input_col=input_col, output_col=output_col, system_prompt=system_prompt)
    unreadable = [f for f in report.errors if f.code == "unreadable"]
    if unreadable and not report.examples:
        # Nothing was read (a missing or binary file, a typo in the path): advice about "0
        # examples of free-form generation" would be made up, so this is the user's error.
        raise UserError(unreadable[0].message, unreadable[0].fix)
    return advise_report(report, task)
