"""Metrics and statistics against cases checked by hand (pure functions: no model)."""

import math

import numpy as np
import pytest

from tunesmith import metrics as M
from tunesmith.errors import UserError


def test_infer_task():
    assert M.infer_task(['{"team": "a"}', '{"team": "b"}', "```json\n{\"team\": \"a\"}\n```"]) == "json"
    assert M.infer_task(["spam", "ham", "ham", "Spam.", "ham", "spam"]) == "classification"
    # Answers that never repeat are not a label set.
    assert M.infer_task(["Paris is the capital.", "Berlin, I think.", "It is Rome."]) == "text"
    assert M.infer_task(["line one\nline two"] * 4) == "text"


def test_label_normalisation_and_set():
    assert M.normalize_label('  "Spam." ') == "spam"
    assert M.label_set(["ham", "spam", "Ham", "spam."]) == ["ham", "spam"]


def test_classification_hand_checked():
    labels = ["a", "b", "c"]
    golds = ["a", "a", "b", "b", "c"]
    preds = ["a", "B", "b", "something else", "c."]
    cols = M.score("classification", golds, preds, labels=labels)
    out = M.aggregate("classification", cols)
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["out_of_label_rate"] == pytest.approx(1 / 5)
    # a: P 1/1 R 1/2 -> F1 2/3; b: P 1/2 R 1/2 -> 1/2; c: 1.
    assert out["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    pc = M.per_class(cols["gold_idx"], cols["pred_idx"], 3)
    assert pc["confusion"].tolist() == [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]
    assert pc["precision"].tolist() == pytest.approx([1.0, 0.5, 1.0])
    assert pc["recall"].tolist() == pytest.approx([0.5, 0.5, 1.0])
    assert pc["support"].tolist() == [2, 2, 1]


def test_lenient_accuracy_credits_one_named_label():
    labels = ["heart diseases", "diseases", "neoplasms"]
    phrases = [M.word_phrase(lab) for lab in labels]
    assert M.mentioned_label("The abstract is about Neoplasms.", phrases) == 2
    assert M.mentioned_label("Category: heart diseases", phrases) == 0  # "diseases" inside it does not count
    assert M.mentioned_label("neoplasms or diseases", phrases) == -1  # two labels: no answer
    assert M.mentioned_label("neoplasmsx", phrases) == -1  # whole words only
    golds = ["neoplasms", "diseases", "heart diseases"]
    preds = ["I think neoplasms.", "diseases", "neoplasms, heart diseases"]
    out = M.aggregate("classification", M.score("classification", golds, preds, labels=labels))
    assert out["accuracy"] == pytest.approx(1 / 3) and out["lenient_accuracy"] == pytest.approx(2 / 3)


def test_abstain_label_metrics():
    labels = ["a", "b", "oos"]
    golds = ["a", "b", "b", "oos", "oos", "oos"]
    preds = ["a", "oos", "b", "oos", "a", "oos"]
    out = M.aggregate("classification", M.score("classification", golds, preds, labels=labels, abstain_label="oos"))
    assert out["in_scope_accuracy"] == pytest.approx(2 / 3)
    assert out["abstain_recall"] == pytest.approx(2 / 3)
    assert out["abstain_precision"] == pytest.approx(2 / 3)
    with pytest.raises(UserError, match="abstain_label"):
        M.score("classification", golds, preds, labels=labels, abstain_label="none")


def test_json_per_key_metrics():
    golds = [
        '{"intent": "Play", "slots": {"artist": "Adele", "year": "2010"}}',
        '{"intent": "Book", "slots": {"city": "Oslo"}}',
        '{"intent": "Play", "slots": {}}',
    ]
    preds = [
        '{"intent": "Play", "slots": {"artist": "Adele", "year": "2011"}}',  # 1 tp, 1 fp, 1 fn
        '{"intent": "Play", "slots": {"city": "Oslo"}}',  # 1 tp
        "not json",
    ]
    out = M.aggregate("json", M.score("json", golds, preds))
    assert out["key_intent_accuracy"] == pytest.approx(1 / 3)
    assert out["key_slots_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    intervals = M.bootstrap_ci("json", M.score("json", golds, preds), samples=50)
    assert "key_slots_f1" in intervals


def test_macro_f1_ignores_absent_classes():
    cols = M.score("classification", ["a", "a"], ["a", "a"], labels=["a", "b", "c"])
    assert M.aggregate("classification", cols)["macro_f1"] == 1.0


def test_json_schema_inference():
    values = [{"team": "billing", "priority": "high"}, {"team": "shipping", "priority": "high", "n": 2}, {"team": "billing", "priority": "low", "n": 1.5}]
    schema = M.infer_json_schema(values)
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert schema["required"] == ["team", "priority"]
    assert schema["properties"]["team"] == {"type": "string", "enum": ["billing", "shipping"]}
    assert schema["properties"]["n"] == {"type": "number"}
    # Strings that never repeat are free text, not an enum.
    assert M.infer_json_schema(["x", "y"]) == {"type": "string"}
    assert M.infer_json_schema([[1, 2], [3]]) == {"type": "array", "items": {"type": "integer"}}


def test_json_metrics_hand_checked():
    schema = M.infer_json_schema([{"team": t, "priority": p} for t in ("billing", "shipping", "account") for p in ("high", "low")] * 2)
    golds = ['{"team": "billing", "priority": "high"}', '{"team": "shipping", "priority": "low"}', '{"team": "account", "priority": "low"}']
    preds = ['{"team": "billing", "priority": "low"}', "not json", '```json\n{"priority": "low", "team": "account"}\n```']
    out = M.aggregate("json", M.score("json", golds, preds, schema=schema))
    assert out["parse_rate"] == pytest.approx(2 / 3)
    assert out["schema_valid_rate"] == pytest.approx(2 / 3)
    assert out["exact_match"] == pytest.approx(1 / 3)
    # fields: tp 1+0+2 = 3, fp 1, fn 1+2 = 3 -> P 3/4, R 1/2, F1 0.6
    assert out["field_precision"] == pytest.approx(0.75)
    assert out["field_recall"] == pytest.approx(0.5)
    assert out["field_f1"] == pytest.approx(0.6)
    bad_enum = M.score("json", golds[:1], ['{"team": "sales", "priority": "low"}'], schema=schema)
    assert bad_enum["parsed"][0] == 1 and bad_enum["schema_valid"][0] == 0


def test_flatten_fields_nested_and_lists():
    fields = M.flatten_fields({"intent": "play", "slots": {"artist": "x", "tags": ["a", "b"]}})
    assert fields == {("intent", '"play"'): 1, ("slots.artist", '"x"'): 1, ("slots.tags[]", '"a"'): 1, ("slots.tags[]", '"b"'): 1}


def test_text_metrics_hand_checked():
    assert M.token_f1("The cat sat.", "the cat") == pytest.approx(0.8)  # P 1, R 2/3
    assert M.token_f1("a b", "c d") == 0.0
    assert M.token_f1("", "") == 1.0
    assert M.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert M.rouge_l("a b c d", "a c d e") == pytest.approx(0.75)  # LCS a c d: P 3/4, R 3/4
    assert M.rouge_l("a b", "") == 0.0
    out = M.aggregate("text", M.score("text", ["hello  world", "x y"], [" hello world ", "y x"]))
    assert out["exact_match"] == 0.5
    assert out["token_f1"] == 1.0
    assert out["rouge_l"] == pytest.approx((1 + 0.5) / 2)


def test_mcnemar_exact_known_values():
    a = np.array([1] * 8 + [0] * 1 + [1] * 5 + [0] * 6)
    b = np.array([0] * 8 + [1] * 1 + [1] * 5 + [0] * 6)
    test = M.mcnemar_exact(a, b)
    assert (test["only_a"], test["only_b"]) == (8, 1)
    assert test["p_value"] == pytest.approx(2 * (1 + 9) / 2**9)  # 0.0390625
    assert M.mcnemar_exact(b, a)["p_value"] == test["p_value"]
    assert M.mcnemar_exact(a, a)["p_value"] == 1.0
    balanced = M.mcnemar_exact(np.array([1, 0, 1, 0]), np.array([0, 1, 0, 1]))
    assert balanced["p_value"] == 1.0  # 2 * P(X <= 2 | n=4) capped at 1


def test_bootstrap_intervals():
    labels = ["a", "b"]
    golds = ["a", "b"] * 50
    cols = M.score("classification", golds, ["a", "a"] * 50, labels=labels)
    ci = M.bootstrap_ci("classification", cols, samples=300, seed=1)
    assert ci == M.bootstrap_ci("classification", cols, samples=300, seed=1)  # seeded
    low, high = ci["accuracy"]
    assert low < 0.5 < high and high - low < 0.3
    # The normal-approximation half-width is 1.96 * sqrt(.25/100) = 0.098: the percentile
    # interval agrees to within resampling noise.
    assert (high - low) / 2 == pytest.approx(1.96 * math.sqrt(0.25 / 100), abs=0.03)
    constant = M.score("classification", golds, golds, labels=labels)
    assert M.bootstrap_ci("classification", constant, samples=50)["accuracy"] == (1.0, 1.0)


def test_paired_tests():
    golds = ["a", "b"] * 30
    perfect = M.score("classification", golds, golds, labels=["a", "b"])
    half = M.score("classification", golds, ["a"] * 60, labels=["a", "b"])
    same = M.compare("classification", half, half, samples=200)
    assert same["accuracy"]["delta"] == 0 and same["accuracy"]["p_value"] == 1.0
    assert same["macro_f1"]["p_value"] == 1.0 and same["macro_f1"]["test"] == "paired bootstrap"
    diff = M.compare("classification", perfect, half, samples=200)
    assert diff["accuracy"]["delta"] == pytest.approx(0.5)
    assert diff["accuracy"]["test"] == "McNemar exact" and diff["accuracy"]["p_value"] == pytest.approx(2 / 2**30)
    assert diff["macro_f1"]["ci_low"] > 0 and diff["macro_f1"]["p_value"] < 0.05


def test_gates():
    assert M.parse_gate("accuracy>=0.85") == {"gate": "accuracy>=0.85", "subject": None, "metric": "accuracy", "op": ">=", "threshold": 0.85}
    assert M.parse_gate("tuned.macro_f1 > 90%")["threshold"] == pytest.approx(0.9)
    assert M.parse_gate("base-fewshot.accuracy<0.5")["subject"] == "base-fewshot"
    for bad in ("accuracy", "accuracy=>0.5", ">=0.5", "accuracy>=high"):
        with pytest.raises(UserError):
            M.parse_gate(bad)
    metrics = {"tuned": {"accuracy": 0.8, "mean_latency_s": 0.2}, "base": {"accuracy": 0.5}}
    results = M.check_gates(["accuracy>=0.85", "mean_latency_s<0.5", "base.accuracy<0.6"], metrics, "tuned")
    assert [r["passed"] for r in results] == [False, True, True]
    assert results[0]["value"] == 0.8
    with pytest.raises(UserError, match="macro_f1"):
        M.check_gates(["macro_f1>0.1", "nobody.accuracy>0"], metrics, "tuned")


def test_json_scores_agree_on_one_canonical_comparison():
    """Exact match, field F1 and per-key accuracy use one comparison: true is not 1, 1 is 1.0,
    key order is irrelevant (Python's == said True == 1, field F1 compared json.dumps strings)."""
    golds = ['{"a": true, "b": 1}', '{"a": 1, "b": [true]}', '{"a": 2, "b": {"x": 1, "y": 0}}']
    preds = ['{"b": 1, "a": 1}', '{"a": 1.0, "b": [1]}', '{"b": {"y": 0.0, "x": 1}, "a": 2.0}']
    cols = M.score("json", golds, preds)
    out = M.aggregate("json", cols)
    assert cols["exact"].tolist() == [0.0, 0.0, 1.0]
    # fields: (a true/1: miss, b: hit), (a 1/1.0: hit, b[] true/1: miss), (a, b.x, b.y: all hit)
    assert (cols["field_tp"].tolist(), cols["field_fp"].tolist()) == ([1, 1, 3], [1, 1, 0])
    assert out["key_a_accuracy"] == pytest.approx(2 / 3)
    assert M.json_equal(True, 1) is False and M.json_equal(1, 1.0) and M.json_equal({"a": 1, "b": 2}, {"b": 2, "a": 1})
    assert M.canonical_text({"b": 1.5, "a": [False, 3.0]}) == '{"a": [false, 3], "b": 1.5}'
