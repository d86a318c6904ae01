"""The data check (every problem with its line), PII and redaction, token counts, advise, exit codes."""

import json
import random

import pytest

from tunesmith.advise import advise_file
from tunesmith.check import check_file
from tunesmith.data import read_conversations
from tunesmith.minhash import minhash_signatures
from tunesmith.pii import find_pii, iban_valid, luhn_valid, redact_text

WORDS = (
    "order invoice refund parcel login password screen update account billing shipping courier error "
    "crash export sync device plan card bank address email delivery tracking damaged wrong missing slow "
    "button page report chart number letter window table chair garden river mountain coffee music"
).split()


def sentence(rng, n=9):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def chat(user, answer, system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages}


def valid_records(n, seed=0, answers=None):
    rng = random.Random(seed)
    return [chat(f"{i}: {sentence(rng)}", answers[i % len(answers)] if answers else sentence(rng, 5)) for i in range(n)]


def codes_at(report, line):
    return {f.code for f in report.errors + report.warnings if f.line == line}


# ---------------------------------------------------------------- the malformed corpus

M = {"role": "user", "content": "question"}
A = {"role": "assistant", "content": "answer"}
MALFORMED = [
    ("{not json", "invalid_json"),
    ('{"messages": [], }', "invalid_json"),
    ("[" * 100_000, "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "invalid_utf8"),
    (b'{"messages": "\xed\xa0\xbd\xed\xb8\x80"}', "invalid_utf8"),
    ("[1, 2]", "not_object"),
    ('"just a string"', "not_object"),
    ("42", "not_object"),
    ("null", "not_object"),
    ({"msgs": [M, A]}, "missing_messages"),
    ({"msgs": [M, A]}, "unknown_key"),
    ({"messages": "hi"}, "messages_not_list"),
    ({"messages": []}, "empty_messages"),
    ({"messages": [M, A], "label": "x"}, "unknown_key"),
    ({"messages": [{"role": "user", "text": "hi"}, A]}, "unknown_key"),
    ({"messages": [{"role": "user", "text": "hi"}, A]}, "missing_content"),
    ({"messages": ["hi", A]}, "message_not_object"),
    ({"messages": [{"content": "hi"}, A]}, "missing_role"),
    ({"messages": [{"role": "bot", "content": "hi"}, A]}, "unknown_role"),
    ({"messages": [{"role": "user"}, A]}, "missing_content"),
    ({"messages": [{"role": "user", "content": None}, A]}, "missing_content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, A]}, "unsupported_content_part"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}, A]}, "bad_content_part"),
    ({"messages": [{"role": "user", "content": {"text": "hi"}}, A]}, "non_string_content"),
    ({"messages": [M, {"role": "assistant", "content": 7}]}, "non_string_content"),
    ({"messages": [{"role": "user", "content": "hi", "name": 5}, A]}, "bad_name"),
    ({"messages": [M, {**A, "weight": 2}]}, "bad_weight"),
    ({"messages": [M, {**A, "weight": "1"}]}, "bad_weight"),
    ({"messages": [M, {**A, "weight": True}]}, "bad_weight"),
    ({"messages": [{**M, "weight": 1}, A]}, "weight_not_assistant"),
    ({"messages": [M]}, "no_assistant"),
    ({"messages": [{"role": "system", "content": "s"}, M]}, "no_assistant"),
    ({"messages": [M, {**A, "weight": 0}]}, "no_trained_assistant"),
    ({"messages": [M, {"role": "system", "content": "s"}, A]}, "system_not_first"),
    ({"messages": [A, M, A]}, "assistant_before_user"),
    ({"messages": [M, M, A]}, "consecutive_user"),
    ({"messages": [M, A, A]}, "consecutive_assistant"),
    ({"messages": [M, {"role": "tool", "content": "{}"}, A]}, "tool_without_call"),
    ({"messages": [M, {"role": "assistant", "content": ""}]}, "empty_assistant"),
    ({"messages": [M, {"role": "assistant", "content": "  \n"}]}, "empty_assistant"),
]


def write_with_bad_line(tmp_path, bad, at=5, n=12):
    """n valid examples with `bad` (a record, a string or raw bytes) as line `at`."""
    lines = [json.dumps(r).encode() for r in valid_records(n)]
    raw = bad if isinstance(bad, bytes) else (bad if isinstance(bad, str) else json.dumps(bad)).encode()
    lines.insert(at - 1, raw)
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("bad, code", MALFORMED, ids=[f"{i}-{c}" for i, (_, c) in enumerate(MALFORMED)])
def test_each_error_at_its_line(tmp_path, bad, code):
    report = check_file(write_with_bad_line(tmp_path, bad, at=5))
    assert code in {f.code for f in report.errors if f.line == 5}, report.to_dict()["errors"]
    assert all(f.line == 5 for f in report.errors)  # nothing else is blamed
    assert report.exit_code() == 2
    assert report.examples == 12 and report.rows == 13
    assert all(f.fix for f in report.errors)


def test_every_problem_reported_at_once_through_the_cli(cli, tmp_path):
    lines = [json.dumps(r) for r in valid_records(12)]
    expected = {}
    for i, (bad, code) in enumerate(MALFORMED):
        if isinstance(bad, bytes):
            continue
        lines.append(bad if isinstance(bad, str) else json.dumps(bad))
        expected.setdefault(len(lines), set()).add(code)
    path = tmp_path / "all.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = cli("data", "check", str(path), "--json")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    found = {}
    for f in report["errors"]:
        found.setdefault(f["line"], set()).add(f["code"])
    for line, codes in expected.items():
        assert codes <= found.get(line, set()), (line, codes, found.get(line))
    # The terminal report names lines and fixes, too.
    result = cli("data", "check", str(path))
    assert result.returncode == 2 and "line 13:" in result.stdout and "fix:" in result.stdout


def test_other_formats_report_their_errors(tmp_path, write_jsonl):
    alpaca = write_jsonl([{"instruction": "i", "input": "", "output": "o"}] * 3 + [{"instruction": "i"}], "alpaca.jsonl")
    assert codes_at(check_file(alpaca), 4) == {"missing_field"}
    pc = write_jsonl([{"prompt": "p", "completion": "c"}, {"prompt": 3, "completion": "c"}], "pc.jsonl")
    assert codes_at(check_file(pc), 2) == {"bad_field"}
    share = write_jsonl(
        [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
         {"conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]}], "sg.jsonl"
    )
    assert codes_at(check_file(share), 2) == {"unknown_role"}
    table = tmp_path / "t.csv"
    table.write_text("text,label\nhello,a\nextra,field,here\n,b\nfine,\n")
    report = check_file(table)
    assert codes_at(report, 3) == {"bad_row"} and codes_at(report, 4) == {"empty_input"} and codes_at(report, 5) == {"empty_output"}


def test_garbage_file_is_a_report_not_a_crash(tmp_path, cli):
    rng = random.Random(0)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(rng.randrange(1, 256) for _ in range(4096)))
    report = check_file(garbage)
    assert report.exit_code() == 2 and report.errors[0].code == "unreadable"
    for name in ("garbage.bin", "garbage.jsonl"):
        (tmp_path / name).write_bytes(garbage.read_bytes())
        result = cli("data", "check", str(tmp_path / name))
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr + result.stdout
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert check_file(empty).exit_code() == 2


# ---------------------------------------------------------------- dataset-level checks


def test_size_rules(write_jsonl):
    assert {f.code for f in check_file(write_jsonl(valid_records(5))).errors} == {"too_few_examples"}
    report = check_file(write_jsonl(valid_records(12)))
    assert not report.errors and [f.code for f in report.warnings] == ["small_dataset"]
    clean = check_file(write_jsonl(valid_records(300)))
    assert not clean.errors and not clean.warnings and clean.exit_code(strict=True) == 0
    assert "sweet spot" in clean.stats["size_advice"]


def test_duplicates_and_conflicting_outputs(write_jsonl):
    records = valid_records(20)
    records[5] = records[0]  # line 6 repeats line 1
    records[9] = records[0]  # line 10 too
    records[12] = chat(records[3]["messages"][0]["content"], "a different answer")  # line 13 conflicts with line 4
    report = check_file(write_jsonl(records))
    dups = sorted((f.line, f.related_lines) for f in report.warnings if f.code == "duplicate")
    assert dups == [(6, [1]), (10, [1])]
    assert report.stats["exact_duplicates"] == 2
    (conflict,) = [f for f in report.warnings if f.code == "conflicting_outputs"]
    assert conflict.line == 4 and conflict.related_lines == [13]
    assert report.stats["conflicting_inputs"] == 1


def shingles(text):
    import re

    words = re.findall(r"\w+", text.casefold())
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def test_near_duplicates_and_threshold(write_jsonl):
    rng = random.Random(5)
    base = sentence(rng, 60)
    words = base.split()
    close = " ".join(words[:-1] + ["zebra"])  # one word changed at the end
    medium = " ".join(words[:45] + [sentence(rng, 15)])  # a quarter of the text changed
    records = valid_records(12, seed=9)
    records[2] = chat(base, "ok")
    records[7] = chat(close, "ok")
    records[10] = chat(medium, "ok")
    path = write_jsonl(records)
    report = check_file(path)
    near = {f.line: f.related_lines for f in report.warnings if f.code == "near_duplicate"}
    assert near == {8: [3]}
    # The estimate is close to the true Jaccard similarity of the word 3-gram shingles.
    true = len(shingles(base + "\nok") & shingles(close + "\nok")) / len(shingles(base + "\nok") | shingles(close + "\nok"))
    sig = minhash_signatures([base + "\nok", close + "\nok"])
    assert abs((sig[0] == sig[1]).mean() - true) < 0.15
    loose = check_file(path, near_dup_threshold=0.4)
    assert {f.line for f in loose.warnings if f.code == "near_duplicate"} == {8, 11}


def test_eval_leakage_exact_and_near(write_jsonl):
    rng = random.Random(2)
    train = valid_records(30)
    long_input = sentence(rng, 40)
    train[4] = chat(long_input, "x")
    held = [
        chat(train[0]["messages"][0]["content"].upper(), "other"),  # exact (normalized) input of line 1
        chat(" ".join(long_input.split()[:-1] + ["zebra"]), "x"),  # near line 5
        chat("something never seen before in training at all", "y"),
    ]
    report = check_file(write_jsonl(train, "train.jsonl"), eval_path=write_jsonl(held, "eval.jsonl"))
    assert report.stats["leakage"] == {"eval_examples": 3, "exact": 1, "near": 1}
    leaks = sorted((f.line, f.related_lines) for f in report.warnings if f.code == "eval_leakage")
    assert leaks == [(1, [1]), (5, [2])]


def test_labels_imbalance_and_invalid_json_answers(write_jsonl):
    records = valid_records(105, answers=["a"] * 20 + ["b"])
    report = check_file(write_jsonl(records))
    labels = report.stats["labels"]
    assert labels["counts"] == {"a": 100, "b": 5} and labels["imbalance_ratio"] == 20.0
    assert "label_imbalance" in {f.code for f in report.warnings}
    records = valid_records(12, answers=['{"team": "billing"}', '{"team": "shipping"'])
    report = check_file(write_jsonl(records, "json.jsonl"))
    bad = [f.line for f in report.warnings if f.code == "invalid_json_output"]
    assert bad == [2, 4, 6, 8, 10, 12]
    assert report.stats["shape"]["json_parse_share"] == 0.5


# ---------------------------------------------------------------- PII


PII_SAMPLES = {
    "email": "write to jane.doe+work@example.co.uk today",
    "phone": "call +1 (415) 555-0132 or 020 7946 0958",
    "credit_card": "card 4111 1111 1111 1111 expires soon",
    "iban": "pay to GB82 WEST 1234 5698 7654 32 please",
    "ipv4": "the server 192.168.10.42 is down",
    "ipv6": "ping 2001:db8:85a3::8a2e:370:7334 now",
    "ssn": "my ssn is 123-45-6789",
    "api_key": "key sk-proj-abcdefghijklmnopqrstuvwx0123 and AKIAIOSFODNN7EXAMPLE",
    "bearer_token": "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig",
}


@pytest.mark.parametrize("kind", sorted(PII_SAMPLES))
def test_pii_kinds_found(kind):
    assert kind in {k for _, _, k in find_pii(PII_SAMPLES[kind])}


def test_pii_validators_reject_lookalikes():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and not iban_valid("GB83 WEST 1234 5698 7654 32")
    assert find_pii("order 4111 1111 1111 1112 shipped") == []  # 16 digits failing Luhn
    assert find_pii("ref GB83 WEST 1234 5698 7654 32") == []  # IBAN failing mod-97
    assert find_pii("at 12:30:45 on 2023-01-15, version 1.2.3, 999.1.1.1, std::vector, 123456") == []


def test_pii_report_and_redacted_copy(write_jsonl, tmp_path):
    records = valid_records(12)
    records[2] = chat(PII_SAMPLES["email"], "noted " + PII_SAMPLES["phone"])
    records[6] = chat(PII_SAMPLES["credit_card"] + " " + PII_SAMPLES["api_key"], "ok")
    out = tmp_path / "redacted.jsonl"
    report = check_file(write_jsonl(records), redact_path=out)
    assert report.stats["pii"] == {"email": 1, "phone": 2, "credit_card": 1, "api_key": 2}
    pii = {f.message.split(" ", 1)[1]: f.line for f in report.warnings if f.code == "pii"}
    assert pii == {"email match(es)": 3, "phone match(es)": 3, "credit card match(es)": 7, "api key match(es)": 7}
    redacted = read_conversations(out)
    assert len(redacted) == 12
    assert redacted[2].messages[0].content == "write to [EMAIL] today"
    assert redacted[2].messages[1].content == "noted call [PHONE] or [PHONE]"
    assert redacted[6].messages[0].content == "card [CREDIT_CARD] expires soon key [API_KEY] and [API_KEY]"
    assert redacted[0].to_openai() == records[0]
    assert not check_file(out).stats["pii"]
    assert redact_text(PII_SAMPLES["bearer_token"]) == "Authorization: Bearer [TOKEN]"


# ---------------------------------------------------------------- tokens


def test_token_counts_with_the_chat_template(write_jsonl, tiny_model_dir):
    from tunesmith.models import load_tokenizer

    records = valid_records(12)
    records[3] = chat("long " * 80, "answer " * 30)
    tok = load_tokenizer(str(tiny_model_dir))
    totals, prompts = [], []
    for r in records:
        totals.append(len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]))
        prompts.append(len(tok.apply_chat_template(r["messages"][:-1], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]))
    max_length = max(t for i, t in enumerate(totals) if i != 3)  # only the long example is over
    report = check_file(write_jsonl(records), model=str(tiny_model_dir), max_length=max_length)
    tokens = report.stats["tokens"]
    assert tokens["total"]["min"] == min(totals) and tokens["total"]["max"] == max(totals)
    assert tokens["prompt"]["max"] == max(prompts)
    assert tokens["assistant_tokens"] == sum(t - p for t, p in zip(totals, prompts))
    over = [i for i, t in enumerate(totals) if t > max_length]
    assert tokens["over_max_length"] == len(over) and over == [3]
    assert tokens["dropped_assistant_tokens"] == min(totals[3] - max_length, totals[3] - prompts[3]) > 0
    assert tokens["examples_losing_whole_answer"] == int(prompts[3] >= max_length)
    (finding,) = [f for f in report.warnings if f.code == "over_max_length"]
    assert finding.line == 4


def test_check_says_what_training_truncation_does_by_training_s_own_rule(write_jsonl, tiny_model_dir):
    """Over max_length, check asks formatting.truncate_example (the one rule): a long first
    exchange is dropped and the answer kept; a final answer longer than max_length cannot be kept,
    so the row is refused, as training refuses it."""
    from tunesmith.config import DataConfig
    from tunesmith.data import read_conversations
    from tunesmith.errors import UserError
    from tunesmith.formatting import preflight
    from tunesmith.models import load_tokenizer

    long_first = {"messages": [
        {"role": "user", "content": "first " * 60}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"}, {"role": "assistant", "content": "done"}]}
    long_answer = chat("hi", "answer " * 60, system="You answer.")
    records = valid_records(4) + [long_first, long_answer]
    path = write_jsonl(records)
    tok = load_tokenizer(str(tiny_model_dir))
    max_length = 40
    report = check_file(path, model=str(tiny_model_dir), max_length=max_length)
    messages = {f.line: f.message for f in report.warnings if f.code == "over_max_length"}
    assert "keeps the answer" in messages[5] and "refuses this row" in messages[6]
    assert report.stats["tokens"]["answer_kept_by_prompt_truncation"] == sum("keeps the answer" in m for m in messages.values())
    # Training agrees: only the long-answer row is refused.
    with pytest.raises(UserError) as err:
        preflight(tok, read_conversations(path), DataConfig(train="x", max_length=max_length, truncate=True), str(path))
    assert "(line 6)" in err.value.message and "line 5" not in err.value.message


# ---------------------------------------------------------------- exit codes and JSON


def test_cli_exit_codes(cli, write_jsonl):
    small = write_jsonl(valid_records(12), "small.jsonl")
    assert cli("data", "check", str(small)).returncode == 0
    assert cli("data", "check", str(small), "--strict").returncode == 1
    broken = write_jsonl(valid_records(12) + ["{oops"], "broken.jsonl")
    result = cli("data", "check", str(broken), "--json")
    assert result.returncode == 2
    report = json.loads(result.stdout)
    assert report["error_count"] == 1 and report["errors"][0]["line"] == 13


# ---------------------------------------------------------------- advise


def test_advise_classification_set(write_jsonl):
    records = valid_records(400, answers=["billing", "technical", "account", "shipping"])
    advice = advise_file(write_jsonl(records))
    assert advice.task_kind == "classification" and advice.recommendation == "fine-tune with LoRA"
    assert any("closed set of 4 labels" in r for r in advice.reasons)


def test_advise_names_a_long_shared_system_prompt(write_jsonl):
    """A label-listing system prompt on every row is most of what the model reads: advise says
    what it costs and that the label set can be learned without it; a short one is not named."""
    labels = [f"intent_{i}" for i in range(60)]
    system = "Classify the request into exactly one of these intents: " + ", ".join(f"{label} (when the user asks about {label})" for label in labels)
    rng = random.Random(0)
    rows = [chat(f"{i}: {sentence(rng)}", labels[i % len(labels)], system=system) for i in range(600)]
    advice = advise_file(write_jsonl(rows))
    shared = advice.stats["shape"]["system_prompt"]
    assert shared["share"] == 1.0 and shared["words"] == len(system.split()) and shared["distinct"] == 1
    assert any(f"100% of examples open with the same {len(system):,}-character system prompt" in r and "train.shared_prefix" in r for r in advice.reasons)

    short = [chat(f"{i}: {sentence(rng)}", labels[i % len(labels)], system="You route support requests.") for i in range(600)]
    assert not any("system prompt" in r for r in advise_file(write_jsonl(short, "short.jsonl")).reasons)


def test_advise_tiny_set(write_jsonl):
    advice = advise_file(write_jsonl(valid_records(40)), task="write friendly replies")
    assert advice.recommendation == "prompt engineering first"


def test_advise_document_qa_set(write_jsonl):
    rng = random.Random(4)
    records = []
    for i in range(320):
        document = " ".join(sentence(rng, 20) + "." for _ in range(10))
        answer = " ".join(document.split()[40:52])
        records.append(chat(f"Document:\n{document}\n\nQuestion {i}: what does the second sentence say?", answer))
    advice = advise_file(write_jsonl(records))
    assert advice.task_kind == "document QA" and advice.recommendation == "RAG"


def test_advise_json_set_and_cli(write_jsonl, cli):
    rng = random.Random(1)
    records = [chat(sentence(rng), json.dumps({"team": rng.choice(WORDS), "priority": rng.choice(WORDS), "n": i})) for i in range(320)]
    path = write_jsonl(records)
    advice = advise_file(path)
    assert advice.task_kind == "structured JSON" and advice.recommendation == "fine-tune with LoRA"
    result = cli("advise", str(path), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["recommendation"] == "fine-tune with LoRA"


@pytest.mark.parametrize("content", [None, b"\x00\x9f\x92\x96" * 80], ids=["missing", "binary"])
def test_advise_on_an_unreadable_file_is_an_error_not_advice(tmp_path, cli, content):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_bytes(content)
    result = cli("advise", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert "recommendation" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.jsonl" in lines[0] and "fix:" in lines[0], result.stderr


def test_pipeline_run_writes_the_report(write_jsonl, tiny_model_dir, tmp_path):
    from tunesmith.artifacts import CHECK_REPORT_FILE
    from tunesmith.check import run
    from tunesmith.config import RunConfig

    train = write_jsonl(valid_records(12))
    cfg = RunConfig.model_validate(
        {"model": {"name": str(tiny_model_dir)}, "data": {"train": str(train), "max_length": 512}, "output_dir": str(tmp_path / "run")}
    )
    report = run(cfg)
    saved = json.loads((tmp_path / "run" / CHECK_REPORT_FILE).read_text())
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert saved["examples"] == 12 and saved["stats"]["tokens"]["over_max_length"] == 0


# ---------------------------------------------------------------- one rule for the task kind


def _label_records(distinct: int, rows: int) -> list[dict]:
    rng = random.Random(distinct)
    labels = [f"intent_{i}" for i in range(distinct)]
    return [chat(f"{i}: {sentence(rng)}", labels[i % distinct]) for i in range(rows)]


@pytest.mark.parametrize("distinct", [2, 5, 20, 77, 151, 200])
def test_check_advise_and_eval_agree_on_a_label_set(write_jsonl, distinct):
    """Regression: 77 one-word answers over 10,003 rows were "free-form generation" to advise
    (check capped label sets at 50) and classification to eval; now one function decides."""
    from tunesmith import metrics as M

    records = _label_records(distinct, max(500, distinct * 3))
    path = write_jsonl(records)
    report = check_file(path)
    assert report.stats["task"] == "classification" and report.stats["labels"]["distinct"] == distinct
    assert advise_file(path).task_kind == "classification"
    assert M.infer_task([r["messages"][-1]["content"] for r in records]) == "classification"


@pytest.mark.parametrize(
    ("answers", "task", "advised"),
    [
        (lambda i, rng: sentence(rng, 12), "text", "free-form generation"),
        (lambda i, rng: json.dumps({"team": rng.choice(WORDS), "n": i}), "json", "structured JSON"),
        # More distinct answers than the rule allows: not a label set, even though each repeats.
        (lambda i, rng: f"intent_{i % 250}", "text", "free-form generation"),
    ],
)
def test_check_advise_and_eval_agree_off_label_sets(write_jsonl, answers, task, advised):
    from tunesmith import metrics as M

    rng = random.Random(0)
    records = [chat(f"{i}: {sentence(rng)}", answers(i, rng)) for i in range(750)]
    path = write_jsonl(records)
    assert check_file(path).stats["task"] == task
    assert advise_file(path).task_kind == advised
    assert M.infer_task([r["messages"][-1]["content"] for r in records]) == task
