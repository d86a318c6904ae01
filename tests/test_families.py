"""Every stage on each model family users bring (tests/families.py: Llama 3 with llama3 RoPE
scaling and Llama 3.2's real tokenizer, Qwen2 with Qwen's, Mistral, Gemma 3, Phi-3, Granite).

Per family, one LoRA run through `train.run` on support tickets whose answer is the team word
(short, so two dozen steps teach the tiny model to answer and stop); then the stages that
read it: evaluation, the adapter and merged exports, the server. The training loss is compared
with the model's own loss for LoRA, QLoRA and full fine-tuning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import copy_without_chat_template, train_tiny_run
from families import FAMILIES

from tunesmith import artifacts, evaluate, export, formatting, inference, modeling, runs, templates
from tunesmith.config import RunConfig, load_config
from tunesmith.models import load_tokenizer
from tunesmith.schema import Conversation

# 48 steps at 1e-2: every family learns to answer, then stop, whichever way the batches fall
# (at 24 steps and 2e-2 a tiny Qwen2 answered with the end of turn alone after a batching change).
STEPS = 48
MAX_NEW_TOKENS = 8
EVAL_EXAMPLES = 6


def team_records(count: int = 40) -> list[dict]:
    """Support tickets answered with the team alone (`billing`): a short answer, then the end of turn.

    Frozen in tests/data (40 tickets of the starter generator as it was when these tests were
    written): a change to `tunesmith init`'s data must not change what the family matrix trains on
    (Qwen2's 24 steps on the new tickets learned to answer with the end of turn alone)."""
    records = json.loads((Path(__file__).parent / "data" / "family_team_records.json").read_text())
    return records[:count]


def conversations(records: list[dict]) -> list[Conversation]:
    return [Conversation.from_openai(r, source_line=i + 1) for i, r in enumerate(records)]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def family_run(family, family_model_dir, tmp_path_factory) -> Path:
    """A LoRA run of the family's tiny model, trained by train.run (treat as read-only)."""
    return train_tiny_run(
        tmp_path_factory.mktemp(f"run-{family.name}"), family_model_dir(family.name), name=family.name, records=team_records(),
        train={"max_steps": STEPS, "learning_rate": 1e-2}, model={"chat_template": family.chat_template},
        eval_settings={"subjects": ["tuned"], "max_new_tokens": MAX_NEW_TOKENS, "max_examples": EVAL_EXAMPLES},
    )


def family_tokenizer(family, model_dir: Path):
    return load_tokenizer(str(model_dir), chat_template=family.chat_template)


# --------------------------------------------------------------------------- formatting


def test_preflight_passes_and_trains_the_end_of_turn(family, family_model_dir):
    tokenizer = family_tokenizer(family, family_model_dir(family.name))
    multi_turn = {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"},
    ]}
    data = RunConfig(data={"train": "x.jsonl", "max_length": 256}).data
    examples, report = formatting.preflight(tokenizer, conversations([*team_records(6), multi_turn]), data, "train.jsonl")
    eot_id, eot = templates.end_of_turn_token(tokenizer)
    assert eot == family.end_of_turn
    for example, turns in zip(examples, [1] * 6 + [2]):
        trained = [t for t in example.labels if t != formatting.IGNORE_INDEX]
        assert trained.count(eot_id) == turns and trained[-1] == eot_id  # every answer ends on a trained end of turn
        if family.eos != family.end_of_turn:  # Gemma, Phi-3: eos closes no turn, so it is never trained
            assert tokenizer.eos_token_id not in trained
    assert tokenizer.decode([t for t in examples[-1].labels if t != formatting.IGNORE_INDEX]) == f"hello{eot}see you{eot}"


# --------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_records_the_template(family, family_run):
    rows = [json.loads(line) for line in (family_run / artifacts.METRICS_FILE).read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    record = runs.read_train_record(family_run).chat_template
    tokenizer = runs.load_run_model(family_run).tokenizer
    assert record.source == (family.chat_template or "model")
    assert record.text == tokenizer.chat_template and record.sha256 == templates.ChatTemplate("x", record.text).sha256


def _loss_config(family, model_dir: Path, method: str) -> RunConfig:
    train = {"method": method, "precision": "fp32", "compile": "off", "lora": {"r": 4, "alpha": 8}}
    return RunConfig(base_dir=str(model_dir.parent), output_dir="loss-run", model={"name": str(model_dir), "chat_template": family.chat_template},
                     data={"train": "x.jsonl", "max_length": 256}, train=train)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_training_loss_equals_the_models_own_loss_and_falls(family, family_model_dir, method, monkeypatch):
    """Our loss (the head on trained positions only, the shared prompt prefix run once) is the
    model's own `labels=` loss on the same batch: soft-capping, logit scaling, biases, sliding
    window and tied or untied heads included. Then three steps on the batch lower it."""
    model_dir = family_model_dir(family.name)
    cfg = _loss_config(family, model_dir, method)
    tokenizer = load_tokenizer(str(model_dir), **runs.tokenizer_options(cfg, recorded=False))
    examples, _ = formatting.tokenize_dataset(tokenizer, conversations(team_records(4)), max_length=256)
    batch = formatting.collate(examples, [[0], [1], [2], [3]], tokenizer.pad_token_id)
    ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    assert batch["shared_prefix_len"] > 20  # the system prompt: the prefix path runs
    device = torch.device("cpu")
    torch.manual_seed(0)
    model, _ = modeling.load_for_training(cfg, device, bf16=False)
    lm = modeling.causal_lm(model)
    assert (lm.get_input_embeddings().weight is lm.get_output_embeddings().weight) == family.tied
    if family.name == "mistral":
        assert lm.config.sliding_window < ids.shape[1]  # the window masks these rows
    if family.name == "qwen2":  # the q/k/v biases are there, and not zero
        q_proj = lm.model.layers[0].self_attn.q_proj
        assert float(getattr(q_proj, "base_layer", q_proj).bias.detach().abs().sum()) > 0

    def losses() -> tuple[float, float, float]:
        model.eval()
        with torch.no_grad():
            theirs = float(model(input_ids=ids, position_ids=positions, labels=labels, use_cache=False).loss)
            plain = float(modeling.loss_at_trained_positions(model, ids, labels, positions)) / batch["trained_tokens"]
            shared = float(modeling.loss_at_trained_positions(model, ids, labels, positions, batch["shared_prefix_len"])) / batch["trained_tokens"]
        return theirs, plain, shared

    theirs, plain, shared = losses()
    assert plain == pytest.approx(theirs, rel=1e-5) and shared == pytest.approx(theirs, rel=1e-4)
    if family.name in ("gemma3", "granite"):
        # The family's logit transform matters here: without it the loss is another number.
        monkeypatch.setattr(modeling, "model_logits", lambda lm, logits: logits)
        assert abs(losses()[1] - theirs) > 1e-3  # 30x the tolerance above
        monkeypatch.undo()

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2 if method != "full" else 1e-3)
    model.train()
    for _ in range(3):
        loss = modeling.loss_at_trained_positions(model, ids, labels, positions, batch["shared_prefix_len"]) / batch["trained_tokens"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after, after_plain, _ = losses()
    assert after < theirs and after_plain == pytest.approx(after, rel=1e-5)


# --------------------------------------------------------------------------- evaluation, export, serving


def test_evaluation_generation_stops_at_the_end_of_turn(family, family_run):
    evaluate.run(load_config(family_run.parent / "config.yaml"))
    trained = runs.load_run_model(family_run)
    eot_id = trained.tokenizer.convert_tokens_to_ids(family.end_of_turn)
    assert eot_id in inference.stop_token_ids(trained.model, trained.tokenizer)
    if family.eos != family.end_of_turn:  # the stop comes from the template, not from the eos ids
        assert eot_id not in {trained.tokenizer.eos_token_id, trained.model.generation_config.eos_token_id}
    predictions = [json.loads(line)["outputs"]["tuned"] for line in (family_run / artifacts.EVAL_DIR / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == EVAL_EXAMPLES
    assert all(p["stopped"] and p["new_tokens"] < MAX_NEW_TOKENS and p["text"] for p in predictions)


def test_merged_and_adapter_exports_reload_with_equal_logits_and_template(family, family_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reports = {fmt: export.run(family_run, fmt) for fmt in ("adapter", "merged")}
    trained = runs.load_run_model(family_run)
    messages = [{"role": "system", "content": "Route tickets."}, {"role": "user", "content": "my invoice is wrong"}]
    expected_prompt = trained.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([inference.render_ids(trained.tokenizer, messages)])
    with torch.no_grad():
        reference = trained.model(input_ids=ids).logits
    merged_dir, adapter_dir = (family_run / artifacts.EXPORT_DIR / fmt for fmt in ("merged", "adapter"))
    base = AutoModelForCausalLM.from_pretrained(trained.base_path)
    reloaded = {"merged": AutoModelForCausalLM.from_pretrained(merged_dir), "adapter": PeftModel.from_pretrained(base, str(adapter_dir))}
    for fmt, folder in (("merged", merged_dir), ("adapter", adapter_dir)):
        assert reports[fmt]["parity"]["mismatches"] == []
        tokenizer = AutoTokenizer.from_pretrained(folder)  # the export alone, as another tool opens it
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected_prompt
        with torch.no_grad():
            logits = reloaded[fmt].eval()(input_ids=ids).logits
        assert float((logits - reference).abs().max()) < 1e-4
    assert reloaded["merged"].generation_config.eos_token_id is not None
    stops = reloaded["merged"].generation_config.eos_token_id
    assert trained.tokenizer.convert_tokens_to_ids(family.end_of_turn) in (stops if isinstance(stops, list) else [stops])


def test_the_server_answers_a_request(family, family_run):
    import openai

    from tunesmith.serve import ServeSettings, create_app
    from tunesmith.serve.app import run_in_thread

    messages = [{"role": "user", "content": "Hey, my invoice for November shows the wrong amount."}]
    trained = runs.load_run_model(family_run)
    stop_ids = inference.stop_token_ids(trained.model, trained.tokenizer)
    direct = inference.greedy_tokens(trained.model, [inference.render_ids(trained.tokenizer, messages)], stop_ids, MAX_NEW_TOKENS)[0]
    handle = run_in_thread(create_app(ServeSettings(models=[str(family_run)], port=0)))
    try:
        client = openai.OpenAI(base_url=f"{handle.url}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model=family.name, messages=messages, max_tokens=MAX_NEW_TOKENS, temperature=0)
    finally:
        handle.stop()
    # The adapter, through the run's template, stopping at the end of turn as generation does.
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == trained.tokenizer.decode(direct, skip_special_tokens=True).strip()


# --------------------------------------------------------------------------- base models


def test_a_base_model_needs_model_chat_template(family_model_dir, tmp_path, cli):
    base = copy_without_chat_template(family_model_dir("gemma3"), tmp_path / "gemma-base")
    project = tmp_path / "project"
    project.mkdir()
    records = team_records(8)
    (project / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {"name": "base", "output_dir": "run", "model": {"name": str(base)}, "data": {"train": "train.jsonl", "max_length": 256},
              "train": {"method": "lora", "max_steps": 2, "batch_size": 4, "precision": "fp32", "compile": "off", "lora": {"r": 4, "alpha": 8}}}
    (project / "config.yaml").write_text(json.dumps(config))
    refused = cli("train", str(project / "config.yaml"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    lines = [line for line in refused.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "no chat template" in lines[0] and "model.chat_template" in lines[0], refused.stderr
    # `tunesmith run` refuses before its first stage (no check, no baselines spent on it).
    refused = cli("run", str(project / "config.yaml"))
    assert refused.returncode == 2 and "model.chat_template" in refused.stderr and "Traceback" not in refused.stderr
    assert runs.read_stage_records(project / "run") == {}

    from tunesmith import train

    config["model"]["chat_template"] = "gemma"
    (project / "config.yaml").write_text(json.dumps(config))
    summary = train.run(load_config(project / "config.yaml"))
    assert summary["steps"] == 2
    record = runs.read_train_record(project / "run").chat_template
    assert record.source == "gemma" and record.text == templates.GEMMA
