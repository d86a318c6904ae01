"""`tunesmith data estimate`: tokens as training sees them, the FLOP formula, the cached calibration, the bill."""

from __future__ import annotations

import json
import random
from datetime import date

import pytest
import torch

from tunesmith.cli import main
from tunesmith.data import read_conversations
from tunesmith.estimate import (
    CALIBRATION_BATCH,
    DEFAULT_UTILISATION,
    GPUS,
    calibration_key,
    estimate_file,
    hardware_name,
    load_prices,
    model_shape,
    training_flops,
)
from tunesmith.formatting import tokenize_dataset
from tunesmith.models import fingerprint, load_tokenizer

WORDS = "order refund parcel login password screen account billing shipping courier error crash export".split()
MAX_LENGTH = 48


def records(n: int = 14, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        out.append({"messages": [{"role": "user", "content": f"{i} {user}"}, {"role": "assistant", "content": answer}]})
    # One long example: truncation at MAX_LENGTH cuts into its answer.
    out[3] = {"messages": [{"role": "user", "content": "short"}, {"role": "assistant", "content": "refund " * 60}]}
    return out


@pytest.fixture
def data_file(write_jsonl):
    return write_jsonl(records())


def test_tokens_are_those_training_sees(data_file, tiny_model_dir):
    est = estimate_file(data_file, str(tiny_model_dir), 3, max_length=MAX_LENGTH, calibrate_here=False)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    conversations = read_conversations(data_file)
    examples, report = tokenize_dataset(tokenizer, conversations, max_length=MAX_LENGTH, truncate=True)
    per_epoch = est["tokens"]["per_epoch"]
    assert per_epoch["examples"] == len(conversations) == 14
    assert per_epoch["fed_tokens"] == report.tokens and per_epoch["trained_tokens"] == report.trained_tokens
    assert per_epoch["truncated_examples"] == len(report.truncated_lines) >= 1
    assert per_epoch["dropped_trained_tokens"] == sum(e.cut_trained_tokens for e in examples) > 0
    assert per_epoch["sum_squared_lengths"] == sum(len(e) ** 2 for e in examples)
    # total = per epoch x epochs
    assert est["tokens"]["total"] == {"fed_tokens": 3 * report.tokens, "trained_tokens": 3 * report.trained_tokens}
    untruncated, _ = tokenize_dataset(tokenizer, conversations, max_length=10**9)
    assert per_epoch["untruncated_tokens"] == sum(len(e) for e in untruncated) > report.tokens


def test_flops_formula_full_and_lora(data_file, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    config = model.config
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim

    full = estimate_file(data_file, str(tiny_model_dir), 2, max_length=MAX_LENGTH, method="full", calibrate_here=False)
    t = full["tokens"]["per_epoch"]
    computed = full["shared_prompt"]["computed_tokens"]  # a prompt start shared by a batch runs once (train.shared_prefix)
    assert computed <= t["fed_tokens"]
    expected_full = 6 * body * computed + 6 * head.weight.numel() * t["trained_tokens"] + attention * t["sum_squared_lengths"]
    assert full["flops"]["per_epoch"] == expected_full
    assert full["flops"]["total"] == 2 * expected_full
    assert full["model_shape"]["adapter_params"] == 0

    lora = estimate_file(data_file, str(tiny_model_dir), 2, max_length=MAX_LENGTH, method="lora", calibrate_here=False)
    adapters = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    adapter_params = sum(p.numel() for p in adapters.parameters() if p.requires_grad)
    assert lora["model_shape"]["adapter_params"] == adapter_params
    expected_lora = (
        4 * body * computed + 4 * head.weight.numel() * t["trained_tokens"]
        + 6 * adapter_params * computed + attention * t["sum_squared_lengths"]
    )
    assert lora["flops"]["per_epoch"] == expected_lora
    assert "2+2" in lora["flops"]["formula"] and "6*N_body" in full["flops"]["formula"]


def test_calibration_is_measured_once_then_cached(data_file, tiny_model_dir, tunesmith_home):
    first = estimate_file(data_file, str(tiny_model_dir), 3, max_length=MAX_LENGTH)
    calibration = first["this_machine"]["calibration"]
    assert calibration["cached"] is False and calibration["tokens_per_s"] > 0
    cache_file = tunesmith_home / "calibration.json"
    key = calibration_key(fingerprint(tiny_model_dir), "lora", torch.get_num_threads(), hardware_name())
    assert list(json.loads(cache_file.read_text())) == [key]
    written = cache_file.stat().st_mtime_ns

    second = estimate_file(data_file, str(tiny_model_dir), 3, max_length=MAX_LENGTH)
    cached = second["this_machine"]["calibration"]
    assert cached["cached"] is True
    assert {**cached, "cached": False} == calibration  # the same measurement, not a new one
    assert cache_file.stat().st_mtime_ns == written

    # The numbers follow from each other.
    seq = calibration["seq_len"]
    shape = model_shape(tiny_model_dir, "lora", 16, "all-linear")
    step_flops = training_flops(shape, "lora", CALIBRATION_BATCH * seq, CALIBRATION_BATCH * (seq - 1), CALIBRATION_BATCH * seq**2)["total"]
    assert calibration["flops_per_step"] == step_flops
    assert calibration["flops_per_s"] == pytest.approx(step_flops / calibration["seconds_per_step"])
    assert calibration["tokens_per_s"] == pytest.approx(CALIBRATION_BATCH * seq / calibration["seconds_per_step"])
    here = second["this_machine"]
    assert here["seconds"] == pytest.approx(second["flops"]["total"] / calibration["flops_per_s"])
    assert here["seconds"] == pytest.approx(3 * here["seconds_per_epoch"])
    rows = {row["name"]: row for row in second["gpus"]["rows"]}
    assert set(rows) == {g["name"] for g in GPUS} >= {"T4", "L4", "A10G", "A100-40GB", "A100-80GB", "H100 SXM", "H200", "RTX 4090"}
    for gpu in GPUS:
        assert rows[gpu["name"]]["seconds"] == pytest.approx(second["flops"]["total"] / (gpu["peak_flops"] * DEFAULT_UTILISATION))

    # Another method is another calibration; --recalibrate measures again.
    full = estimate_file(data_file, str(tiny_model_dir), 3, max_length=MAX_LENGTH, method="full")
    assert full["this_machine"]["calibration"]["cached"] is False
    assert len(json.loads(cache_file.read_text())) == 2
    again = estimate_file(data_file, str(tiny_model_dir), 3, max_length=MAX_LENGTH, recalibrate=True)
    assert again["this_machine"]["calibration"]["cached"] is False
    assert again["this_machine"]["calibration"]["step_seconds"] != calibration["step_seconds"]


def test_openai_bill_from_the_dated_price_table(data_file, tiny_model_dir):
    prices = load_prices()
    assert prices["source"].startswith("https://") and date.fromisoformat(prices["snapshot_date"])
    assert "snapshot" in prices["note"]
    est = estimate_file(data_file, str(tiny_model_dir), 4, max_length=MAX_LENGTH, calibrate_here=False)
    openai = est["openai"]
    assert openai["billed_tokens"] == 4 * est["tokens"]["per_epoch"]["untruncated_tokens"]
    assert openai["snapshot_date"] == prices["snapshot_date"] and "snapshot" in openai["note"]
    table = prices["usd_per_1m_training_tokens"]
    assert [row["model"] for row in openai["rows"]] == list(table)
    for row in openai["rows"]:
        assert row["usd"] == pytest.approx(openai["billed_tokens"] * table[row["model"]] / 1e6)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_cli(data_file, tiny_model_dir, write_jsonl, capsys):
    args = ["data", "estimate", str(data_file), "--model", str(tiny_model_dir), "--epochs", "2", "--max-length", str(MAX_LENGTH), "--no-calibrate"]
    code, out, _ = run_cli(capsys, *args, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["tokens"]["total"]["trained_tokens"] == 2 * result["tokens"]["per_epoch"]["trained_tokens"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and "tokens / epoch" in out and "H100 SXM" in out and "snapshot" in out
    # A file with errors is refused before the model costs anything: one line, exit 2.
    broken = write_jsonl(records() + ["{oops"], "broken.jsonl")
    code, out, err = run_cli(capsys, "data", "estimate", str(broken), "--model", str(tiny_model_dir), "--epochs", "1")
    assert code == 2 and "line 15" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, *args, "--method", "dora")
    assert code == 2 and "unknown method" in err


# --- memory per method --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "full"])
def test_memory_of_weights_and_optimizer_is_what_training_allocates(tiny_model_dir, method):
    """The estimate's weights + gradients + AdamW state against the real model after one step,
    set up by training's own loader (fp32 here: a bf16-less CPU)."""
    from tunesmith.config import RunConfig
    from tunesmith.estimate import training_memory_bytes
    from tunesmith.modeling import load_for_training

    cfg = RunConfig.model_validate({"model": {"name": str(tiny_model_dir)}, "data": {"train": "-"}, "train": {"method": method}})
    model, _ = load_for_training(cfg, torch.device("cpu"), bf16=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-6)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    allocated = sum(p.numel() * p.element_size() for p in model.parameters())
    allocated += sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    allocated += sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if t.dim() > 0)

    shape = model_shape(tiny_model_dir, method, cfg.train.lora.r, cfg.train.lora.target_modules)
    estimate = training_memory_bytes(shape, method, batch_size=2, seq_len=16, trained_fraction=1.0, bf16=False)
    assert estimate["weights_and_optimizer"] == allocated


def test_memory_table_says_what_fits_where():
    from tunesmith.estimate import memory_table

    # The shape of a 7B Llama: full fine-tuning (16 bytes a parameter) fits no single GPU here;
    # QLoRA fits a 24 GB one.
    shape = {"total_params": 6_738_415_616, "body_params": 6_476_005_376, "head_params": 131_072_000, "adapter_params": 0,
             "layers": 32, "hidden_size": 4096, "attention_width": 4096, "max_positions": 4096, "vocab_size": 32000}
    table = memory_table(shape, batch_size=4, seq_len=512, trained_fraction=0.2, cpu_bf16=False, lora_r=16,
                         adapter_shapes={"lora": 40_000_000, "qlora": 40_000_000, "full": 0})
    rows = {row["method"]: row for row in table["rows"]}
    assert rows["full"]["fits_gpu_gb"] == {"24": False, "40": False, "80": False}
    assert rows["qlora"]["fits_gpu_gb"]["24"] and rows["lora"]["fits_gpu_gb"]["40"]
    assert rows["qlora"]["gpu_bytes"] < rows["lora"]["gpu_bytes"] < rows["full"]["gpu_bytes"]
    assert rows["lora"]["here_bytes"] > rows["lora"]["gpu_bytes"]  # fp32 frozen weights on this CPU


def test_cli_shows_memory_and_human_durations(data_file, tiny_model_dir, capsys):
    args = ["data", "estimate", str(data_file), "--model", str(tiny_model_dir), "--epochs", "2", "--max-length", str(MAX_LENGTH), "--no-calibrate"]
    code, out, _ = run_cli(capsys, *args, "--json")
    memory = json.loads(out)["memory"]
    assert [row["method"] for row in memory["rows"]] == ["lora", "qlora", "full"] and memory["batch_size"] == 8
    code, out, _ = run_cli(capsys, *args, "--batch-size", "2")
    assert code == 0 and "training memory, batch 2 x" in out
    table = out[out.index("training memory"):out.index("memory: weights")]
    for header in ("24 GB", "40 GB", "80 GB", "here needs", "RAM "):
        assert header in table
    assert [line.split()[1] for line in table.splitlines() if line.split()[1:2] in (["lora"], ["qlora"], ["full"])] == ["lora", "qlora", "full"]
    flat = " ".join(out.split())  # titles wrap at the console's width
    assert "fits" in table and "no model load, no evaluation" in flat and "training steps only" in flat


def test_durations_in_human_units():
    from tunesmith.estimate import human_seconds

    assert [human_seconds(s) for s in (0.25, 200, 3900)] == ["250 ms", "3 min 20 s", "1 h 05 min"]


def test_a_shared_system_prompt_is_priced_as_training_shares_it(write_jsonl, tiny_model_dir, capsys):
    """A long system prompt on every row: the estimate names its tokens and what computing it
    once per batch saves, and those are training's own numbers (collate's shared prefix)."""
    from tunesmith.formatting import collate

    labels = [f"label_{i}" for i in range(40)]
    system = "Answer with exactly one of these labels: " + ", ".join(labels)
    rng = random.Random(1)
    rows = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(4))},
                          {"role": "assistant", "content": rng.choice(labels)}]} for _ in range(16)]
    path = write_jsonl(rows)
    est = estimate_file(path, str(tiny_model_dir), 1, max_length=1024, calibrate_here=False, batch_size=16)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples, _ = tokenize_dataset(tokenizer, read_conversations(path), max_length=1024)
    whole = collate(examples, [[i] for i in range(len(examples))], tokenizer.pad_token_id)
    shared = est["shared_prompt"]
    assert shared["tokens"] == whole["shared_prefix_len"] > 64
    assert shared["fed_tokens_per_example"][16] * 16 == pytest.approx(whole["fed_tokens_shared"]) == shared["computed_tokens"]
    body = est["model_shape"]["body_params"]
    assert est["flops"]["terms_per_epoch"]["matmul"] == 4 * body * shared["computed_tokens"] + 4 * est["model_shape"]["head_params"] * est["tokens"]["per_epoch"]["trained_tokens"]
    assert shared["fed_tokens_per_example"][1] * 16 == est["tokens"]["per_epoch"]["fed_tokens"]
    assert shared["share_of_fed_tokens"] > 0.5

    code, out, _ = run_cli(capsys, "data", "estimate", str(path), "--model", str(tiny_model_dir), "--epochs", "1", "--no-calibrate", "--batch-size", "16")
    flat = " ".join(out.split())
    assert code == 0 and f"every example starts with the same {shared['tokens']:,} tokens" in flat and "train.shared_prefix" in flat


def test_no_shared_prompt_note_without_a_shared_prompt(data_file, tiny_model_dir, capsys):
    code, out, _ = run_cli(capsys, "data", "estimate", str(data_file), "--model", str(tiny_model_dir), "--epochs", "1", "--no-calibrate")
    assert code == 0 and "every example starts with the same" not in " ".join(out.split())
