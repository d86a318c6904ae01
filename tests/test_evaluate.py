"""`tunesmith eval` on the tiny model: generation, subjects, reports, gates, determinism."""

import json
from pathlib import Path

import pytest
import torch

from tunesmith import artifacts, evaluate, inference, train
from tunesmith.config import load_config
from tunesmith.errors import GateFailed, UserError
from tunesmith.starter import SYSTEM_PROMPT, support_tickets

from conftest import SHARED_DATA


def make_run(root: Path, model_dir: Path, *, task: str = "classification", n_train: int = 40, n_eval: int = 12,
             adapter_seed: int | None = 0, eval_settings: str = "") -> Path:
    """A project folder with config.yaml and a run folder holding the split; with `adapter_seed`,
    the run is trained (train.run, a few LoRA steps on the split) so it has a real adapter."""
    run = root / "runs" / "r"
    (run / "data").mkdir(parents=True)
    records = support_tickets(n_train + n_eval, seed=3)
    if task == "classification":
        for r in records:
            r["messages"][-1]["content"] = json.loads(r["messages"][-1]["content"])["team"]
    for name, part in (("train", records[:n_train]), ("eval", records[n_train:])):
        (run / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (root / "config.yaml").write_text(
        f"model: {{name: {model_dir}}}\ndata: {{train: unused.jsonl, max_length: 256}}\noutput_dir: runs/r\n"
        f"train: {{max_steps: 4, batch_size: 4, learning_rate: 0.01, precision: fp32, compile: 'off', seed: {adapter_seed or 0}}}\n"
        f"eval: {{max_new_tokens: 8, bootstrap_samples: 100, precision: fp32{eval_settings}}}\n"
    )
    if adapter_seed is not None:
        train.run(load_config(root / "config.yaml"))
    return root / "config.yaml"


def test_batched_generation_equals_one_at_a_time_generate(tiny_model_dir):
    from tunesmith.models import load_model

    loaded = load_model(str(tiny_model_dir))
    tok = loaded.tokenizer
    convs = [evaluate.Conversation.from_openai(r) for r in support_tickets(7, seed=5)]
    prompts = [inference.render_ids(tok, evaluate.prompt_messages(c, SYSTEM_PROMPT)) for c in convs]
    prompts[3] = prompts[3][:20]  # a much shorter prompt: lots of padding in its batch
    stop = inference.stop_token_ids(loaded.model, tok)
    expected = []
    for ids in prompts:
        out = loaded.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=10, do_sample=False)
        expected.append(out[0, len(ids):].tolist())
    for share_prefix in (True, False):
        gens = inference.generate_greedy(loaded.model, prompts, max_new_tokens=10, batch_size=3, stop_ids=stop,
                                        pad_id=tok.pad_token_id, decode=tok.decode, share_prefix=share_prefix)
        got = [g.token_ids for g in gens]
        # generate pads finished rows with pad after eos; we stop there.
        assert got == [e[: len(g)] for e, g in zip(expected, got)]
        for g, e in zip(gens, expected):
            assert g.stopped == (g.token_ids[-1] in stop)
            assert len(g.token_ids) == 10 or g.stopped
            assert all(t == tok.pad_token_id for t in e[len(g.token_ids):])
    assert inference.shared_prefix_length(prompts) > inference.MIN_SHARED_PREFIX  # the prefix path ran


def test_few_shot_choice_is_stratified_and_stated(tmp_path, tiny_model_dir):
    config = make_run(tmp_path, tiny_model_dir, adapter_seed=None, eval_settings=", few_shot_k: 4, max_examples: 3")
    cfg = load_config(config, ["eval.subjects=[base-fewshot]"])
    metrics_file = cfg.run_dir / artifacts.METRICS_FILE
    metrics_file.parent.mkdir(parents=True)
    metrics_file.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 0, "eval_loss": 3.0}, {"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0, "eval_loss": 2.2}]))
    results = evaluate.run(cfg)
    html = (cfg.run_dir / "eval/report.html").read_text()
    assert "Training loss" in html and '<img alt="loss"' in html and '<img alt="confusion"' in html
    assert "Best eval loss 2.2000 at step 2 (the star); the last, at step 2: 2.2000." in (cfg.run_dir / "eval/report.md").read_text()
    shots = results["few_shot"]
    assert shots["k"] == 4 and sorted(shots["labels"]) == ["account", "billing", "shipping", "technical"]
    train = [json.loads(x) for x in (cfg.run_dir / "data/train.jsonl").read_text().splitlines()]
    eval_inputs = {json.loads(x)["messages"][1]["content"] for x in (cfg.run_dir / "data/eval.jsonl").read_text().splitlines()}
    assert all(train[line - 1]["messages"][1]["content"] not in eval_inputs for line in shots["train_lines"])
    assert "round-robin over labels" in (cfg.run_dir / "eval/report.md").read_text()


def test_eval_cli_reports_gates_and_exit_codes(cli, tmp_path, tiny_model_dir):
    config = make_run(tmp_path, tiny_model_dir)
    junit = tmp_path / "junit.xml"
    result = cli("eval", str(config), "--gate", "accuracy>=0", "--gate", "base.out_of_label_rate<=1", "--junit", str(junit))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "runs/r/eval"
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "report.html", "report.md", "results.json"]
    results = json.loads((out / "results.json").read_text())
    subjects = ["base", "base-prompted", "base-fewshot", "majority", "tuned"]
    assert results["task"] == "classification" and list(results["subjects"]) == subjects
    for name, entry in results["subjects"].items():
        m = entry["metrics"]["accuracy"]
        assert m["ci_low"] <= m["value"] <= m["ci_high"]
        assert {"macro_f1", "out_of_label_rate", "mean_latency_s"} <= set(entry["metrics"])
        assert ("tokens_per_s" in entry["metrics"]) == (name != "majority")  # majority generates nothing
    assert set(results["comparisons"]) == {f"tuned_vs_{s}" for s in subjects[:-1]}
    assert results["verdict"]["best_baseline"] in subjects[:-1]
    predictions = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == results["examples"] == 12
    assert all(set(p["outputs"]) == set(subjects) for p in predictions)
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<script" not in html and "http" not in html.split("<body>")[0]
    assert results["verdict"]["text"] in (out / "report.md").read_text().replace("\n", " ")
    assert 'failures="0"' in junit.read_text()
    assert artifacts.read_manifest(tmp_path / "runs/r")["eval"]["primary"].keys() == set(subjects)
    assert " ".join(results["verdict"]["text"].split()) in " ".join(result.stdout.split())

    # The tiny random model never answers a label: a real threshold fails with exit 3, after
    # the reports are written, and the JUnit file names the failing gate. Run by RUN_DIR.
    (tmp_path / "runs/r/config.yaml").write_text(config.read_text())
    (out / "results.json").unlink()
    result = cli("eval", str(tmp_path / "runs/r"), "--subjects", "base,tuned", "--max-examples", "4",
                 "--gate", "accuracy>=0.5", "--junit", str(junit))
    assert result.returncode == 3, result.stderr
    assert "gate failed" in result.stderr and "accuracy>=0.5" in result.stderr
    assert json.loads((out / "results.json").read_text())["passed"] is False
    assert 'failures="1"' in junit.read_text() and "<failure" in junit.read_text()

    result = cli("eval", str(config), "--gate", "accuracy>>0.5")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_determinism_and_json_task(tmp_path, tiny_model_dir):
    config = make_run(tmp_path, tiny_model_dir, task="json", n_eval=8)
    cfg = load_config(config)
    first = evaluate.run(cfg)
    texts = [{s: o["text"] for s, o in json.loads(x)["outputs"].items()}
             for x in (cfg.run_dir / "eval/predictions.jsonl").read_text().splitlines()]
    assert not any(e.get("reused_from_previous_report") for e in first["subjects"].values())
    # A second run over the previous report reuses the baselines' answers (same model, prompts,
    # decoding) and regenerates the fine-tune's.
    reused = evaluate.run(load_config(config))
    assert list(reused["subjects"]) == ["base", "base-prompted", "base-fewshot", "tuned"]  # no majority class in JSON
    assert "majority" in reused["skipped_subjects"]
    assert [reused["subjects"][s].get("reused_from_previous_report", False) for s in reused["subjects"]] == [True, True, True, False]
    # Determinism: everything generated again from scratch gives identical answers.
    import shutil

    shutil.rmtree(cfg.run_dir / "eval")
    second = evaluate.run(load_config(config))
    assert not any(e.get("reused_from_previous_report") for e in second["subjects"].values())
    again = [{s: o["text"] for s, o in json.loads(x)["outputs"].items()}
             for x in (cfg.run_dir / "eval/predictions.jsonl").read_text().splitlines()]
    assert texts == again
    assert first["task"] == "json" and first["schema_source"] == "inferred from the training answers"
    assert first["schema"]["properties"]["priority"]["enum"] == ["high", "low", "normal", "urgent"]
    prompted = first["subjects"]["base-prompted"]["prompt"]["system_prompts"]
    assert len(prompted) == 1 and prompted[0].endswith("\n" + json.dumps(first["schema"]))
    assert prompted[0].startswith(SYSTEM_PROMPT) and "only a JSON value" in prompted[0]
    for s in first["subjects"]:
        values = {k: v["value"] for k, v in first["subjects"][s]["metrics"].items()}
        assert values.keys() >= {"exact_match", "parse_rate", "schema_valid_rate", "field_f1"}
        assert {k: v["value"] for k, v in second["subjects"][s]["metrics"].items() if "latency" not in k and "per_s" not in k} == {
            k: v for k, v in values.items() if "latency" not in k and "per_s" not in k
        }
    # The adapter changes the model: tuned and base answer differently somewhere.
    assert any(t["tuned"] != t["base"] for t in texts)


def test_against_another_run(tmp_path, tiny_model_dir):
    config = make_run(tmp_path / "new", tiny_model_dir, eval_settings=", max_examples: 6")
    make_run(tmp_path / "old", tiny_model_dir, adapter_seed=1)
    other_run = tmp_path / "old/runs/r"
    cfg = load_config(config, ["eval.subjects=[tuned]"])
    try:
        results = evaluate.run(cfg, against=other_run)
    except GateFailed:
        results = json.loads((cfg.run_dir / "eval/results.json").read_text())
    assert list(results["subjects"]) == ["tuned", "against"]
    assert results["subjects"]["against"]["path"] == str(other_run.resolve() / artifacts.ADAPTER_DIR)
    gate = results["gates"][-1]
    assert gate["op"] == "not worse" and gate["passed"] == (not (gate["value"] < gate["against_value"] and gate["p_value"] < 0.05))
    assert "tuned_vs_against" in results["comparisons"]


def test_missing_trained_model_is_a_user_error(tmp_path, tiny_model_dir):
    config = make_run(tmp_path, tiny_model_dir, adapter_seed=None, eval_settings=", max_examples: 2")
    with pytest.raises(UserError, match="no trained model") as err:
        evaluate.run(load_config(config, ["eval.subjects=[base,tuned]"]))
    assert "--subjects base" in err.value.hint  # eval's own hint, from the one check in runs.locate_run_model
    (tmp_path / "eval.jsonl").write_text((tmp_path / "runs/r/data/eval.jsonl").read_text())
    (tmp_path / "train.jsonl").write_text((tmp_path / "runs/r/data/train.jsonl").read_text())
    (tmp_path / "runs/r/data/eval.jsonl").unlink()
    with pytest.raises(UserError, match="no held-out split") as err:
        evaluate.run(load_config(config))
    # train writes no split (the hint once said it did); the pipeline's split stage does.
    assert "tunesmith run CONFIG --until split" in err.value.hint and "data.eval" in err.value.hint
    # Without a run split, the config's own files are the split.
    results = evaluate.run(load_config(config, ["data.train=train.jsonl", "data.eval=eval.jsonl", "eval.subjects=[base]"]))
    assert results["sources"]["eval"] == str(tmp_path / "eval.jsonl") and results["examples"] == 2


@pytest.mark.slow
def test_smollm2_base_vs_fewshot_on_sms_spam(tmp_path, smollm2_dir):
    """SmolLM2 on a handful of real SMS: the few-shot prompt holds real examples and the report
    shows both baselines with intervals."""
    path = SHARED_DATA / "sms_spam" / "SMSSpamCollection"
    if not path.exists():
        pytest.skip(f"{path} is absent (shared datasets not installed)")
    import csv

    with open(path, encoding="utf-8") as f:
        rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][1:]
    system = "Classify the SMS as spam or ham. Answer with one word: spam or ham."
    records = [{"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": label}]} for label, text in rows]
    spam = [r for r in records if r["messages"][1]["content"] == "spam"]
    ham = [r for r in records if r["messages"][1]["content"] == "ham"]
    run = tmp_path / "runs/r"
    (run / "data").mkdir(parents=True)
    (run / "data/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in spam[:10] + ham[:10]))
    (run / "data/eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in spam[10:14] + ham[10:14]))
    (tmp_path / "config.yaml").write_text(json.dumps({
        "model": {"name": str(smollm2_dir)}, "data": {"train": "unused", "system_prompt": system}, "output_dir": "runs/r",
        "eval": {"subjects": ["base", "base-fewshot"], "max_new_tokens": 4, "few_shot_k": 4, "bootstrap_samples": 200},
    }))
    results = evaluate.run(load_config(tmp_path / "config.yaml"))
    assert results["task"] == "classification" and results["labels"] == ["ham", "spam"]
    assert results["few_shot"]["k"] == 4 and sorted(set(results["few_shot"]["labels"])) == ["ham", "spam"]
    for entry in results["subjects"].values():
        assert entry["ended_on_end_of_turn"] > 0  # the real model stops at <|im_end|>
    assert "No comparison with a fine-tune" in results["verdict"]["text"]


def test_eval_truncates_prompts_like_training_and_says_so(tmp_path, tiny_model_dir):
    config = make_run(tmp_path, tiny_model_dir, adapter_seed=None, eval_settings=", max_examples: 3")
    text = config.read_text().replace("max_length: 256", "max_length: 48, truncate: true")
    config.write_text(text)
    results = evaluate.run(load_config(config, ["eval.subjects=[base]"]))
    pt = results["prompt_truncation"]
    assert pt["data_truncate"] and pt["max_length"] == 48 and pt["truncated_examples"] == pt["over_max_length"] == 3
    assert pt["cut_tokens"] > 0
    assert "Prompt truncation as in training (data.truncate, max length 48): 3 prompts" in (tmp_path / "runs/r/eval/report.md").read_text()
    assert artifacts.read_manifest(tmp_path / "runs/r")["eval"]["prompt_truncation"] == pt
    # Off: prompts stay whole, and the report counts the ones over the length.
    config.write_text(text.replace("truncate: true", "truncate: false"))
    results = evaluate.run(load_config(config, ["eval.subjects=[base]"]))
    assert results["prompt_truncation"]["truncated_examples"] == 0 and results["prompt_truncation"]["over_max_length"] == 3


def _label_sequence(cfg, tokenizer, seed: int) -> list[str]:
    cfg.eval.seed = seed
    data = evaluate.read_eval_data(cfg)
    chosen, info = evaluate.select_shots(tokenizer, data, SYSTEM_PROMPT, cfg.eval, budget_tokens=100_000)
    assert info["train_lines"] == [data.train[i].source_line for i in chosen]
    return info["labels"]


def test_few_shot_order_is_a_seeded_shuffle_not_an_alternation(tmp_path, tiny_model_dir):
    """The shots cover the labels round-robin, but their prompt order is shuffled: the same for
    one seed, different across seeds, never the strict label cycle (a, b, c, d, a, b, ...)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = make_run(tmp_path, tiny_model_dir, adapter_seed=None, eval_settings=", few_shot_k: 8")
    cfg = load_config(config)
    orders = {seed: _label_sequence(cfg, tokenizer, seed) for seed in (0, 1, 2)}
    assert _label_sequence(cfg, tokenizer, 1) == orders[1]  # deterministic for one seed
    assert len({tuple(o) for o in orders.values()}) > 1  # the seed decides the order
    for order in orders.values():
        labels = sorted(set(order))
        assert sorted(order) == sorted(labels * 2)  # still two of each of the four labels
        assert order != [labels[i % len(labels)] for i in range(len(order))]  # not the strict cycle


def test_baselines_without_a_fine_tune_majority_and_prompted(cli, tmp_path, tiny_model_dir):
    """`--subjects base-prompted,base-fewshot,majority` runs without a trained model; majority
    scores the held-out share of the most frequent training label; base-prompted's system prompt
    lists every label; the report shows each subject's prompt."""
    config = make_run(tmp_path, tiny_model_dir, adapter_seed=None, eval_settings=", few_shot_k: 4")
    result = cli("eval", str(config), "--subjects", "base-prompted,base-fewshot,majority")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "runs/r/eval"
    results = json.loads((out / "results.json").read_text())
    assert list(results["subjects"]) == ["base-prompted", "base-fewshot", "majority"]
    train = [json.loads(x)["messages"][-1]["content"] for x in (tmp_path / "runs/r/data/train.jsonl").read_text().splitlines()]
    golds = [json.loads(x)["messages"][-1]["content"] for x in (tmp_path / "runs/r/data/eval.jsonl").read_text().splitlines()]
    top = max(sorted(set(train)), key=train.count)
    majority = results["subjects"]["majority"]
    assert majority["label"] == top and majority["train_share"] == train.count(top) / len(train)
    assert majority["metrics"]["accuracy"]["value"] == golds.count(top) / len(golds)
    assert results["verdict"]["best_baseline"] is None and "best subject" in results["verdict"]["text"]
    prompted = results["subjects"]["base-prompted"]["prompt"]
    assert prompted["shots"] == 0 and len(prompted["system_prompts"]) == 1
    assert prompted["system_prompts"][0].startswith(SYSTEM_PROMPT)
    assert all(f"\n{label}" in prompted["system_prompts"][0] for label in results["labels"])
    fewshot = results["subjects"]["base-fewshot"]["prompt"]
    assert fewshot["system_prompts"] == [SYSTEM_PROMPT] and fewshot["shot_train_lines"] == results["few_shot"]["train_lines"]
    assert fewshot["shots"] == 4
    report_md = (out / "report.md").read_text()
    assert "## Prompts" in report_md and prompted["system_prompts"][0] in report_md
    assert f"`base-fewshot`: 4 shots (training lines {', '.join(map(str, fewshot['shot_train_lines']))})" in report_md
    assert f"`majority`: no model and no prompt: always answers '{top}'" in report_md
    assert "## Confusion matrix (base-fewshot)" in report_md  # not the constant majority's
    predictions = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert {p["outputs"]["majority"]["text"] for p in predictions} == {top}


def test_constrained_baseline_answers_only_labels_or_schema(tmp_path, tiny_model_dir):
    """base-constrained: base-prompted's prompt, decoding held by xgrammar to the labels or the
    JSON Schema, so even the tiny random model answers in the format, and ends its turn."""
    for task, new_tokens in (("classification", 8), ("json", 64)):
        config = make_run(tmp_path / task, tiny_model_dir, task=task, adapter_seed=None, eval_settings=", max_examples: 4")
        cfg = load_config(config, ["eval.subjects=[base-prompted,base-constrained]", f"eval.max_new_tokens={new_tokens}"])
        results = evaluate.run(cfg)
        constrained = results["subjects"]["base-constrained"]
        prompted = results["subjects"]["base-prompted"]
        assert constrained["prompt"]["system_prompts"] == prompted["prompt"]["system_prompts"]
        assert constrained["generation_key"] != prompted["generation_key"]
        assert constrained["ended_on_end_of_turn"] == 1.0
        metrics = {k: v["value"] for k, v in constrained["metrics"].items()}
        if task == "classification":
            assert metrics["out_of_label_rate"] == 0.0
        else:
            assert metrics["parse_rate"] == 1.0 and metrics["schema_valid_rate"] == 1.0
        assert "`base-constrained`" in (cfg.run_dir / "eval/report.md").read_text()
