"""Scores against ground truth, and the statistics that say whether a difference is real.

Pure functions on strings and numpy arrays: no model, no torch, so every number here can be
checked by hand. The shape is always the same: `score()` turns (golds, predictions) into
per-example columns, `aggregate()` turns columns (or a resample of their rows) into the
headline metrics. Bootstrap intervals and paired tests resample rows and call `aggregate()`
again, so every metric gets an interval without a formula of its own.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from fractions import Fraction
from typing import Any

import numpy as np

from tunesmith.errors import UserError

TASKS = ("classification", "json", "text")
PRIMARY_METRIC = {"classification": "accuracy", "json": "exact_match", "text": "rouge_l"}
# Metrics that are a mean of a 0/1 column: their paired test is McNemar's exact test.
BINARY_COLUMN = {"accuracy": "correct", "lenient_accuracy": "lenient_correct", "exact_match": "exact"}
LOWER_IS_BETTER = {"out_of_label_rate", "mean_latency_s"}
# Metrics that describe the output rather than grade it: no winner, no verdict.
NEUTRAL = {"mean_output_tokens", "mean_output_chars"}

# A training answer set is a closed label set when answers are short (one line, a few words),
# at most LABEL_MAX_COUNT distinct ones, and each repeats (LABEL_MIN_REPEAT rows a label on
# average). The one rule for the task kind: data check, advise and eval all call `task_kind`.
LABEL_MAX_CHARS = 64
LABEL_MAX_WORDS = 6
LABEL_MAX_COUNT = 200
LABEL_MIN_REPEAT = 2
# A JSON string field becomes an enum when it takes at most this many values, each repeated.
ENUM_MAX_VALUES = 20
# JSON answers: per-key metrics for at most this many top-level keys (the most frequent).
MAX_KEY_METRICS = 12


# --------------------------------------------------------------------------- task inference


def parse_json(text: str) -> tuple[bool, Any]:
    """(parsed, value): the answer read as JSON, also when wrapped in a ``` fence."""
    text = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None


def normalize_label(text: str) -> str:
    """Case, surrounding whitespace and quotes, a trailing period: what a label match ignores."""
    text = " ".join(text.split()).strip().strip("\"'`").strip()
    return text.rstrip(".").strip().casefold()


def word_phrase(text: str) -> str:
    """Casefolded words between single spaces, padded with one space each side, so that
    `phrase in text` matches whole words only."""
    return " " + " ".join(re.sub(r"[^\w]+", " ", text.casefold()).split()) + " "


def mentioned_label(text: str, label_phrases: list[str]) -> int:
    """Index of the one label the answer names as a whole phrase (anywhere in it), else -1.

    `label_phrases`: the labels through `word_phrase`. A label inside a longer named label
    ("diseases" in "heart diseases") does not count on its own; two distinct labels named is
    no answer. This is how a chatty base model is given credit for "The abstract is about
    neoplasms." when the exact-match accuracy gives it none.
    """
    words = word_phrase(text)
    found = [(i, phrase) for i, phrase in enumerate(label_phrases) if phrase.strip() and phrase in words]
    found = [(i, p) for i, p in found if not any(p != q and p in q for _, q in found)]
    return found[0][0] if len(found) == 1 else -1


def is_label(text: str) -> bool:
    """A short one-line answer: what a class label looks like."""
    text = text.strip()
    return bool(text) and "\n" not in text and len(text) <= LABEL_MAX_CHARS and len(text.split()) <= LABEL_MAX_WORDS


def is_json_answer(text: str) -> bool:
    ok, value = parse_json(text)
    return ok and isinstance(value, (dict, list))


def task_kind(examples: int, json_answers: int, all_labels: bool, distinct_labels: int) -> str:
    """The task kind from answer statistics: `json` when every answer is a JSON object or array;
    `classification` when every answer is a label (`is_label`), 2..LABEL_MAX_COUNT distinct
    (after `normalize_label`), each repeating; `text` otherwise.

    Counts, not the answers themselves, so the data check can stream a file and still apply
    exactly the rule eval applies to a list.
    """
    if examples and json_answers == examples:
        return "json"
    if all_labels and 2 <= distinct_labels <= LABEL_MAX_COUNT and distinct_labels * LABEL_MIN_REPEAT <= examples:
        return "classification"
    return "text"


def infer_task(targets: list[str]) -> str:
    """`task_kind` of a list of answers."""
    targets = [t.strip() for t in targets]
    distinct = {normalize_label(t) for t in targets}
    return task_kind(len(targets), sum(map(is_json_answer, targets)), all(map(is_label, targets)), len(distinct))


def label_set(train_targets: list[str]) -> list[str]:
    """The closed label set of the training answers, sorted (first spelling of each label)."""
    seen: dict[str, str] = {}
    for t in train_targets:
        seen.setdefault(normalize_label(t), t.strip())
    return [seen[k] for k in sorted(seen)]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def infer_json_schema(values: list[Any]) -> dict[str, Any]:
    """A JSON Schema every training answer satisfies: keys (required when always present),
    types, and enums for string fields with a small set of repeated values."""
    types = {_json_type(v) for v in values}
    if types == {"integer", "number"}:
        types = {"number"}
    if types == {"object"}:
        keys: list[str] = []
        for v in values:
            keys.extend(k for k in v if k not in keys)
        return {
            "type": "object",
            "properties": {k: infer_json_schema([v[k] for v in values if k in v]) for k in keys},
            "required": [k for k in keys if all(k in v for v in values)],
            "additionalProperties": False,
        }
    if types == {"array"}:
        items = [x for v in values for x in v]
        return {"type": "array", "items": infer_json_schema(items)} if items else {"type": "array"}
    if types == {"string"}:
        distinct = sorted(set(values))
        if len(distinct) <= ENUM_MAX_VALUES and len(distinct) < len(values):
            return {"type": "string", "enum": distinct}
        return {"type": "string"}
    if len(types) == 1:
        return {"type": types.pop()}
    return {"type": sorted(types)} if types else {}


def canonical_json(value: Any) -> Any:
    """The value JSON answers are compared by: booleans stay booleans, and a float with an
    integral value becomes that integer.

    Python's `==` says `True == 1 == 1.0`; JSON says `true` is not a number, and `1` and `1.0`
    are one number (JSON Schema calls both integers). Object key order never matters.
    """
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {str(k): canonical_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical_json(v) for v in value]
    return value


def canonical_text(value: Any) -> str:
    """`canonical_json` as one string (sorted keys): the unit every JSON comparison uses."""
    return json.dumps(canonical_json(value), sort_keys=True, ensure_ascii=False)


def json_equal(a: Any, b: Any) -> bool:
    """Equal as JSON values: exact match and per-key accuracy both use this (see canonical_json)."""
    return canonical_text(a) == canonical_text(b)


def flatten_fields(value: Any, prefix: str = "") -> Counter:
    """(path, canonical_text of the value) pairs of a JSON value: the unit of field-level P/R/F1.

    Nested objects give dotted paths; list elements are matched as a multiset under `path[]`.
    """
    out: Counter = Counter()
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(flatten_fields(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list):
        for v in value:
            out.update(flatten_fields(v, f"{prefix}[]"))
    else:
        out[(prefix, canonical_text(value))] += 1
    return out


# --------------------------------------------------------------------------- text similarity


_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def text_tokens(text: str) -> list[str]:
    """Lowercased words with punctuation removed (SQuAD-style, without English article removal)."""
    return text.lower().translate(_PUNCT).split()


def token_f1(gold: str, pred: str) -> float:
    """F1 of the bag-of-words overlap between the answer and the reference."""
    g, p = text_tokens(gold), text_tokens(pred)
    if not g and not p:
        return 1.0
    common = sum((Counter(g) & Counter(p)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence, by the classic dynamic programme over one row."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(gold: str, pred: str) -> float:
    """ROUGE-L F1 (beta = 1) on `text_tokens`."""
    g, p = text_tokens(gold), text_tokens(pred)
    if not g and not p:
        return 1.0
    lcs = lcs_length(g, p)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(g)
    return 2 * precision * recall / (precision + recall)


def exact_text(gold: str, pred: str) -> bool:
    return " ".join(gold.split()) == " ".join(pred.split())


# --------------------------------------------------------------------------- scoring


def score(
    task: str,
    golds: list[str],
    preds: list[str],
    *,
    labels: list[str] | None = None,
    schema: dict[str, Any] | None = None,
    abstain_label: str | None = None,
) -> dict[str, np.ndarray]:
    """Per-example columns for `task` (see `aggregate` for what they add up to).

    `abstain_label` (classification): the label meaning "none of the others" (CLINC's
    out_of_scope), whose recall and precision, and the accuracy on the other examples, are
    reported on their own.
    """
    n = len(golds)
    cols: dict[str, np.ndarray] = {"output_chars": np.array([len(p) for p in preds], dtype=float)}
    if task == "classification":
        labels = labels or []
        index = {normalize_label(lab): i for i, lab in enumerate(labels)}
        gold_idx = np.array([index.get(normalize_label(g), -1) for g in golds], dtype=int)
        if (gold_idx < 0).any():
            raise ValueError("every reference answer must be in the label set")
        pred_idx = np.array([index.get(normalize_label(p), -1) for p in preds], dtype=int)
        phrases = [word_phrase(lab) for lab in labels]
        lenient = np.array([i if i >= 0 else mentioned_label(p, phrases) for i, p in zip(pred_idx, preds)], dtype=int)
        cols.update(
            gold_idx=gold_idx,
            pred_idx=pred_idx,
            correct=(pred_idx == gold_idx).astype(float),
            lenient_correct=(lenient == gold_idx).astype(float),
            in_label_set=(pred_idx >= 0).astype(float),
        )
        if abstain_label is not None:
            if normalize_label(abstain_label) not in index:
                raise UserError(f"eval.abstain_label {abstain_label!r} is not one of the training answers", "set it to the label that means no intent applies, or null")
            a = index[normalize_label(abstain_label)]
            cols.update(abstain_gold=(gold_idx == a).astype(float), abstain_pred=(pred_idx == a).astype(float))
        return cols
    if task == "json":
        from jsonschema import Draft202012Validator

        validator = Draft202012Validator(schema or {})
        parsed, valid, exact, tp, fp, fn = (np.zeros(n) for _ in range(6))
        gold_values, pred_values = [], []
        for i, (g, p) in enumerate(zip(golds, preds)):
            _, gold_value = parse_json(g)
            ok, value = parse_json(p)
            gold_values.append(gold_value)
            pred_values.append(value if ok else None)
            parsed[i] = ok
            valid[i] = ok and validator.is_valid(value)
            exact[i] = ok and json_equal(value, gold_value)
            tp[i], fp[i], fn[i] = field_counts(flatten_fields(gold_value), flatten_fields(value) if ok else Counter())
        cols.update(parsed=parsed, schema_valid=valid, exact=exact, field_tp=tp, field_fp=fp, field_fn=fn)
        cols.update(key_columns(gold_values, pred_values))
        return cols
    if task == "text":
        cols.update(
            exact=np.array([exact_text(g, p) for g, p in zip(golds, preds)], dtype=float),
            token_f1=np.array([token_f1(g, p) for g, p in zip(golds, preds)]),
            rouge_l=np.array([rouge_l(g, p) for g, p in zip(golds, preds)]),
        )
        return cols
    raise ValueError(f"unknown task {task!r}")


def field_counts(gold_fields: Counter, pred_fields: Counter) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of predicted (path, value) pairs."""
    hit = sum((gold_fields & pred_fields).values())
    return hit, sum(pred_fields.values()) - hit, sum(gold_fields.values()) - hit


def key_columns(gold_values: list[Any], pred_values: list[Any]) -> dict[str, np.ndarray]:
    """Per top-level key of parsed JSON answers (a prediction that did not parse is None):
    `key_<k>_accuracy` for a key whose answers are scalars (e.g. an intent), `key_<k>_f1` over
    its (path, value) pairs for a key holding an object or a list (e.g. slots). Columns:
    `keyacc:<k>`/`keyhas:<k>`, or `keytp:<k>`/`keyfp:<k>`/`keyfn:<k>`."""
    pred_values = [v if isinstance(v, dict) else {} for v in pred_values]
    counts = Counter(k for v in gold_values if isinstance(v, dict) for k in v)
    cols: dict[str, np.ndarray] = {}
    for key, _ in counts.most_common(MAX_KEY_METRICS):
        present = [isinstance(v, dict) and key in v for v in gold_values]
        composite = any(p and isinstance(v[key], (dict, list)) for p, v in zip(present, gold_values))
        if composite:
            tp, fp, fn = (np.zeros(len(gold_values)) for _ in range(3))
            for i, (g, p) in enumerate(zip(gold_values, pred_values)):
                gold_fields = flatten_fields(g[key]) if isinstance(g, dict) and key in g else Counter()
                pred_fields = flatten_fields(p[key]) if key in p else Counter()
                tp[i], fp[i], fn[i] = field_counts(gold_fields, pred_fields)
            cols.update({f"keytp:{key}": tp, f"keyfp:{key}": fp, f"keyfn:{key}": fn})
        else:
            cols[f"keyhas:{key}"] = np.array(present, dtype=float)
            cols[f"keyacc:{key}"] = np.array([h and key in p and json_equal(p[key], g[key]) for h, g, p in zip(present, gold_values, pred_values)], dtype=float)
    return cols


def key_metric_name(key: str, kind: str) -> str:
    """A gate-friendly name (`[a-z][a-z0-9_]*`) for a per-key metric."""
    return f"key_{re.sub(r'[^a-z0-9]+', '_', key.casefold()).strip('_') or 'x'}_{kind}"


def _safe_div(num: np.ndarray | float, den: np.ndarray | float) -> Any:
    return np.divide(num, den, out=np.zeros_like(np.asarray(num, dtype=float)), where=np.asarray(den) > 0)


def per_class(gold_idx: np.ndarray, pred_idx: np.ndarray, n_labels: int) -> dict[str, np.ndarray]:
    """Confusion matrix (gold rows, predicted columns, last column = outside the label set) and
    per-class precision, recall, F1 and support."""
    pred_col = np.where(pred_idx < 0, n_labels, pred_idx)
    confusion = np.bincount(gold_idx * (n_labels + 1) + pred_col, minlength=n_labels * (n_labels + 1))
    confusion = confusion.reshape(n_labels, n_labels + 1)
    tp = np.diag(confusion[:, :n_labels]).astype(float)
    predicted = confusion[:, :n_labels].sum(axis=0).astype(float)
    support = confusion.sum(axis=1).astype(float)
    precision, recall = _safe_div(tp, predicted), _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {"confusion": confusion, "precision": precision, "recall": recall, "f1": f1, "support": support, "predicted": predicted}


def aggregate(task: str, cols: dict[str, np.ndarray], idx: np.ndarray | None = None) -> dict[str, float]:
    """Headline metrics from per-example columns (rows `idx` when given: a bootstrap resample)."""
    c = cols if idx is None else {k: v[idx] for k, v in cols.items()}
    out: dict[str, float] = {}
    if task == "classification":
        # Classes absent from a resample add nothing to macro-F1, so the largest index seen suffices.
        n_labels = int(max(c["gold_idx"].max(initial=-1), c["pred_idx"].max(initial=-1)) + 1)
        pc = per_class(c["gold_idx"], c["pred_idx"], n_labels)
        # Macro-F1 over the classes that occur (as reference or as in-set answer), as sklearn does;
        # answers outside the label set are not a class, they only cost recall.
        present = (pc["support"] > 0) | (pc["predicted"] > 0)
        out["accuracy"] = float(c["correct"].mean())
        out["macro_f1"] = float(pc["f1"][present].mean()) if present.any() else 0.0
        out["out_of_label_rate"] = float(1 - c["in_label_set"].mean())
        if "lenient_correct" in c:
            out["lenient_accuracy"] = float(c["lenient_correct"].mean())
        if "abstain_gold" in c:
            gold, pred, correct = c["abstain_gold"], c["abstain_pred"], c["correct"]
            out["in_scope_accuracy"] = float(_safe_div(((1 - gold) * correct).sum(), (1 - gold).sum()))
            out["abstain_recall"] = float(_safe_div((gold * pred).sum(), gold.sum()))
            out["abstain_precision"] = float(_safe_div((gold * pred).sum(), pred.sum()))
    elif task == "json":
        tp, fp, fn = c["field_tp"].sum(), c["field_fp"].sum(), c["field_fn"].sum()
        precision = float(tp / (tp + fp)) if tp + fp else 0.0
        recall = float(tp / (tp + fn)) if tp + fn else 0.0
        out["exact_match"] = float(c["exact"].mean())
        out["parse_rate"] = float(c["parsed"].mean())
        out["schema_valid_rate"] = float(c["schema_valid"].mean())
        out["field_precision"] = precision
        out["field_recall"] = recall
        out["field_f1"] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        for column in c:
            kind, _, key = column.partition(":")
            if kind == "keyacc":
                out[key_metric_name(key, "accuracy")] = float(_safe_div(c[column].sum(), c[f"keyhas:{key}"].sum()))
            elif kind == "keytp":
                tp, fp, fn = c[column].sum(), c[f"keyfp:{key}"].sum(), c[f"keyfn:{key}"].sum()
                out[key_metric_name(key, "f1")] = float(_safe_div(2 * tp, 2 * tp + fp + fn))
    elif task == "text":
        out["exact_match"] = float(c["exact"].mean())
        out["token_f1"] = float(c["token_f1"].mean())
        out["rouge_l"] = float(c["rouge_l"].mean())
    out["mean_output_chars"] = float(c["output_chars"].mean())
    if "output_tokens" in c:
        out["mean_output_tokens"] = float(c["output_tokens"].mean())
    if "latency_s" in c:
        out["mean_latency_s"] = float(c["latency_s"].mean())
    if "compute_s" in c and c["compute_s"].sum() > 0:
        out["tokens_per_s"] = float(c["output_tokens"].sum() / c["compute_s"].sum())
    return out


# --------------------------------------------------------------------------- statistics


def bootstrap_ci(
    task: str, cols: dict[str, np.ndarray], *, samples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every headline metric (rows resampled with replacement)."""
    n = len(cols["output_chars"])
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(samples):
        for k, v in aggregate(task, cols, rng.integers(0, n, n)).items():
            draws.setdefault(k, []).append(v)
    tail = (1 - confidence) / 2 * 100
    return {k: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for k, v in draws.items()}


def paired_bootstrap(
    task: str,
    cols_a: dict[str, np.ndarray],
    cols_b: dict[str, np.ndarray],
    *,
    samples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Difference a - b of every metric on the same examples: observed delta, interval, and a
    two-sided p-value (share of resamples on the far side of zero, doubled)."""
    n = len(cols_a["output_chars"])
    observed_a, observed_b = aggregate(task, cols_a), aggregate(task, cols_b)
    rng = np.random.default_rng(seed)
    deltas: dict[str, list[float]] = {k: [] for k in observed_a if k in observed_b}
    for _ in range(samples):
        idx = rng.integers(0, n, n)
        a, b = aggregate(task, cols_a, idx), aggregate(task, cols_b, idx)
        for k in deltas:
            deltas[k].append(a[k] - b[k])
    tail = (1 - confidence) / 2 * 100
    out = {}
    for k, d in deltas.items():
        d_arr = np.array(d)
        below, above = int((d_arr <= 0).sum()), int((d_arr >= 0).sum())
        p = min(1.0, 2 * (min(below, above) + 1) / (samples + 1))
        out[k] = {
            "delta": observed_a[k] - observed_b[k],
            "ci_low": float(np.percentile(d_arr, tail)),
            "ci_high": float(np.percentile(d_arr, 100 - tail)),
            "p_value": p,
            "test": "paired bootstrap",
        }
    return out


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float]:
    """McNemar's exact test: a binomial test on the examples where exactly one side is right."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    if n == 0:
        p = 1.0
    else:
        k = min(only_a, only_b)
        tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n)
        p = float(min(Fraction(1), 2 * tail))
    return {"only_a": only_a, "only_b": only_b, "p_value": p}


def compare(
    task: str, cols_a: dict[str, np.ndarray], cols_b: dict[str, np.ndarray], *, samples: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Paired comparison a vs b on every metric: McNemar for 0/1 metrics, paired bootstrap else."""
    out = paired_bootstrap(task, cols_a, cols_b, samples=samples, seed=seed)
    for metric, column in BINARY_COLUMN.items():
        if metric in out and column in cols_a:
            test = mcnemar_exact(cols_a[column], cols_b[column])
            out[metric].update(p_value=test["p_value"], test="McNemar exact", only_a=test["only_a"], only_b=test["only_b"])
    return out


def better(metric: str, a: float, b: float) -> bool:
    return a < b if metric in LOWER_IS_BETTER else a > b


# --------------------------------------------------------------------------- gates

_GATE = re.compile(
    r"^\s*(?:(?P<subject>[A-Za-z][\w-]*)\.)?(?P<metric>[a-z][a-z0-9_]*)\s*"
    r"(?P<op>>=|<=|==|>|<)\s*(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<pct>%)?\s*$"
)
_OPS = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: math.isclose(a, b, abs_tol=1e-12),
}


def parse_gate(text: str) -> dict[str, Any]:
    """`"accuracy>=0.85"`, `"tuned.field_f1 > 90%"`, `"base-fewshot.accuracy<0.5"` -> parts."""
    m = _GATE.match(text)
    if not m:
        raise UserError(
            f"cannot read gate {text!r}",
            'write METRIC OP NUMBER, e.g. "accuracy>=0.85" or "tuned.macro_f1>0.8" (OP: >=, <=, >, <, ==)',
        )
    value = float(m.group("value")) / (100 if m.group("pct") else 1)
    return {"gate": text.strip(), "subject": m.group("subject"), "metric": m.group("metric"), "op": m.group("op"), "threshold": value}


def check_gates(gates: list[str], metrics: dict[str, dict[str, float]], default_subject: str) -> list[dict[str, Any]]:
    """Every gate against `metrics[subject][metric]`; unknown subjects or metrics are user errors,
    all reported at once."""
    results, problems = [], []
    for text in gates:
        gate = parse_gate(text)
        subject = gate["subject"] or default_subject
        if subject not in metrics:
            problems.append(f"gate {text!r}: no subject {subject!r} (evaluated: {', '.join(metrics)})")
            continue
        if gate["metric"] not in metrics[subject]:
            problems.append(f"gate {text!r}: no metric {gate['metric']!r} (available: {', '.join(metrics[subject])})")
            continue
        value = metrics[subject][gate["metric"]]
        results.append({**gate, "subject": subject, "value": value, "passed": bool(_OPS[gate["op"]](value, gate["threshold"]))})
    if problems:
        raise UserError("; ".join(problems), "use a metric and subject listed, e.g. \"accuracy>=0.85\"")
    return results
