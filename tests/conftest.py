"""The test world: a tiny random Llama built offline once per session, and a private cache.

The tiny model has the same chat template shape as SmolLM2 (`<|im_start|>role\\n...<|im_end|>`)
and is saved in HF format, so every stage loads it through the real code path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Nothing in the tests may reach a hub; one thread, because the machine is shared and a
# second busy process slows 2-thread steps 10-20x.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# SmolLM2's chat template, verbatim: the tiny model must behave like the real one.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _training_corpus() -> list[str]:
    from tunesmith.starter import support_tickets

    texts = []
    for record in support_tickets(200, seed=1):
        texts.extend(m["content"] for m in record["messages"])
    texts += [
        "What is the capital of France? Paris is the capital of France.",
        "system user assistant You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        '{"label": "spam"} {"label": "ham"} {"intent": "play_music", "slots": {}}',
        "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>",
    ]
    return texts


def build_tiny_model(folder: Path, seed: int = 0, bf16_exact: bool = False) -> Path:
    """A 2-layer, hidden-64 Llama with a 512-token byte-level BPE, saved as an HF folder.

    `seed` draws other weights (same tokenizer and shapes: "the same model, retrained");
    `bf16_exact` rounds the weights to bf16 values, as in a model released in bf16."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if bf16_exact:
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(torch.bfloat16).float())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Path of the tiny model's HF folder (built once per session; treat as read-only)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def family_model_dir(tmp_path_factory):
    """family_model_dir(name) -> the HF folder of family `name`'s tiny model (tests/families.py),
    built on first use, once per session (treat as read-only)."""
    from families import build_family_model

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family_model(name, tmp_path_factory.mktemp(f"family-{name}") / name)
        return built[name]

    return get


@pytest.fixture(autouse=True)
def tunesmith_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own cache folder: nothing leaks between tests or into ~/.cache."""
    home = tmp_path / "tunesmith-home"
    monkeypatch.setenv("TUNESMITH_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted once per session into a shared cache (slow tests)."""
    home = tmp_path_factory.mktemp("smollm2-home")
    old = os.environ.get("TUNESMITH_HOME")
    os.environ["TUNESMITH_HOME"] = str(home)
    try:
        from tunesmith.models import resolve_model_dir

        return resolve_model_dir("smollm2-135m-instruct")
    finally:
        if old is None:
            os.environ.pop("TUNESMITH_HOME", None)
        else:
            os.environ["TUNESMITH_HOME"] = old


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(records, name) -> path; records may be dicts or raw strings (written as-is)."""

    def write(records, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        with open(path, "w", encoding="utf-8") as f:
            for r in records:
                f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
        return path

    return write


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m tunesmith ARGS` in a subprocess: the real entry point, exit code and all."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=900
    )


@pytest.fixture
def cli():
    return run_cli


# A LoRA run on the tiny model, short and with a large learning rate, so the adapter clearly
# changes the model's outputs.
TINY_RUN_TRAIN = {"method": "lora", "max_steps": 8, "batch_size": 4, "learning_rate": 1e-2, "precision": "fp32", "compile": "off", "lora": {"r": 4, "alpha": 8}}


def train_tiny_run(folder: Path, base_dir: Path, *, name: str = "tiny-run", seed: int = 0, records: list | None = None,
                   system_prompt: str | None = None, train: dict | None = None, eval_settings: dict | None = None) -> Path:
    """Train a real run through `train.run` (the code path users take) in `folder`; return the run folder.

    `folder` gets train.jsonl / eval.jsonl (support tickets unless `records` is given) and
    config.yaml; the run is `folder/run`.
    """
    from tunesmith import train as train_stage
    from tunesmith.config import load_config
    from tunesmith.starter import support_tickets

    folder.mkdir(parents=True, exist_ok=True)
    records = records if records is not None else support_tickets(40, seed=3)
    cut = len(records) * 3 // 4
    for file_name, part in (("train.jsonl", records[:cut]), ("eval.jsonl", records[cut:])):
        (folder / file_name).write_text("".join(json.dumps(r) + "\n" for r in part))
    config = {
        "name": name,
        "output_dir": "run",
        "model": {"name": str(base_dir)},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 256, "system_prompt": system_prompt},
        "train": {**TINY_RUN_TRAIN, "seed": seed, **(train or {})},
        "eval": {"max_new_tokens": 8, "bootstrap_samples": 100, "precision": "fp32", **(eval_settings or {})},
    }
    (folder / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    train_stage.run(load_config(folder / "config.yaml"))
    return folder / "run"


@pytest.fixture(scope="session")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA run on the tiny model, trained once per session by train.run (treat as read-only;
    copy it with `copy_run` to change it)."""
    return train_tiny_run(tmp_path_factory.mktemp("tiny-run"), tiny_model_dir)


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A copy of a trained run folder (with its project folder's files) for a test to change."""
    import shutil

    shutil.copytree(run_dir, dest)
    return dest


def copy_without_chat_template(model_dir: Path, dest: Path) -> Path:
    """A copy of a model folder whose tokenizer has no chat template (a base model)."""
    import shutil

    shutil.copytree(model_dir, dest)
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((dest / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return dest
