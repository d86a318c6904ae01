"""eval.engine: vllm: the refusal without vLLM, what our code hands vLLM's offline engine, and
scores equal to the torch engine's.

vLLM is not installed here (and needs a GPU), so `FakeVLLM` stands in for the package: it
records every call our code makes and answers greedily with our own torch model (base, or base
plus the requested LoRA adapter), so the scoring through the vllm path is real. The test of the
real vLLM runs where it is installed with a GPU, and says why it is skipped otherwise.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from test_evaluate import make_run
from tunesmith import artifacts, evaluate, inference
from tunesmith.config import load_config
from tunesmith.vllm_engine import vllm_installed

VLLM_PRESENT = vllm_installed()


@dataclass
class FakeSamplingParams:
    temperature: float = 1.0
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


class FakeLLM:
    """vllm.LLM as our code calls it: keyword arguments recorded, answers from our torch model."""

    def __init__(self, engines: list, **kwargs):
        from tunesmith.models import load_model

        self.kwargs, self.calls, self.adapters = kwargs, [], {}
        assert kwargs["dtype"] == "float32"  # the runs below evaluate in fp32
        self.model = load_model(kwargs["model"]).model
        engines.append(self)

    def generate(self, prompts, sampling_params, *, use_tqdm=True, lora_request=None):
        from peft import PeftModel

        self.calls.append({"prompts": [p["prompt_token_ids"] for p in prompts], "params": sampling_params, "lora": lora_request})
        assert sampling_params.temperature == 0.0 and not use_tqdm
        model = self.model
        if lora_request is not None:
            # vLLM refuses a LoRA request on an engine started without LoRA, or past max_loras.
            assert self.kwargs.get("enable_lora") and lora_request.lora_int_id <= self.kwargs["max_loras"]
            if lora_request.lora_int_id not in self.adapters:
                from tunesmith.models import load_model

                base = load_model(self.kwargs["model"]).model
                self.adapters[lora_request.lora_int_id] = PeftModel.from_pretrained(base, lora_request.lora_path).eval()
            model = self.adapters[lora_request.lora_int_id]
        stop = set(sampling_params.stop_token_ids)
        tokens = inference.greedy_tokens(model, [p["prompt_token_ids"] for p in prompts], stop, sampling_params.max_tokens)
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=t, finish_reason="stop" if t and t[-1] in stop else "length")])
                for t in tokens]


@pytest.fixture
def fake_vllm(monkeypatch):
    """A `vllm` package in sys.modules; returns the list of engines our code starts."""
    engines: list[FakeLLM] = []
    package = types.ModuleType("vllm")
    package.LLM = lambda **kwargs: FakeLLM(engines, **kwargs)
    package.SamplingParams = FakeSamplingParams
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = FakeLoRARequest
    for name, module in (("vllm", package), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)
    return engines


def torch_run_with_prompts(config: Path, monkeypatch, overrides=()) -> tuple[dict, dict[str, list[list[int]]], list[dict]]:
    """(results, the prompt ids each subject was generated from, predictions) of the torch engine."""
    seen, real = [], evaluate.generate_greedy
    monkeypatch.setattr(evaluate, "generate_greedy", lambda model, prompts, **kw: seen.append(prompts) or real(model, prompts, **kw))
    cfg = load_config(config, list(overrides))
    results = evaluate.run(cfg)
    monkeypatch.setattr(evaluate, "generate_greedy", real)
    generating = [s for s in results["subjects"] if s != "majority"]
    predictions = [json.loads(line) for line in (cfg.run_dir / "eval/predictions.jsonl").read_text().splitlines()]
    return results, dict(zip(generating, seen)), predictions


def assert_same_scores(torch_results, torch_predictions, vllm_results, run_dir: Path) -> None:
    vllm_predictions = [json.loads(line) for line in (run_dir / "eval/predictions.jsonl").read_text().splitlines()]
    assert list(vllm_results["subjects"]) == list(torch_results["subjects"])
    timings = ("mean_latency_s", "tokens_per_s")  # measured, engine by engine
    for name, entry in torch_results["subjects"].items():
        scores = {k: v for k, v in entry["metrics"].items() if k not in timings}
        assert scores and {k: vllm_results["subjects"][name]["metrics"][k] for k in scores} == scores, name
        assert [p["outputs"][name]["text"] for p in vllm_predictions] == [p["outputs"][name]["text"] for p in torch_predictions]
        assert [p["outputs"][name]["new_tokens"] for p in vllm_predictions] == [p["outputs"][name]["new_tokens"] for p in torch_predictions]
    assert vllm_results["verdict"]["text"] == torch_results["verdict"]["text"]


def test_vllm_engine_gets_our_prompts_stop_ids_and_lora_and_scores_like_torch(tmp_path, tiny_model_dir, fake_vllm, monkeypatch):
    """An adapter run: one engine on the base with LoRA on; each baseline with the torch path's
    exact prompt ids, greedy, our stop ids; `tuned` as a LoRA request on the run's adapter; the
    scores, answers and verdict equal the torch engine's."""
    config = make_run(tmp_path, tiny_model_dir, eval_settings=", max_examples: 8")
    torch_results, torch_prompts, torch_predictions = torch_run_with_prompts(config, monkeypatch)
    cfg = load_config(config, ["eval.engine=vllm"])
    results = evaluate.run(cfg)

    (engine,) = fake_vllm
    assert engine.kwargs == {"model": str(tiny_model_dir), "tokenizer": str(tiny_model_dir), "dtype": "float32", "seed": 0,
                             "trust_remote_code": False, "enable_lora": True, "max_loras": 1}
    assert [c["prompts"] for c in engine.calls] == [torch_prompts[s] for s in ("base", "base-prompted", "base-fewshot", "tuned")]
    for call in engine.calls:
        assert call["params"] == FakeSamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=torch_results["decoding"]["stop_token_ids"])
    assert [c["lora"] for c in engine.calls] == [None, None, None, FakeLoRARequest("tuned", 1, str(cfg.run_dir / artifacts.ADAPTER_DIR))]
    assert results["decoding"]["engine"] == "vllm" and torch_results["decoding"]["engine"] == "torch"
    assert results["subjects"]["tuned"]["kind"] == "adapter" and results["subjects"]["tuned"]["engine"] == "vllm"
    assert not any(e.get("reused_from_previous_report") for e in results["subjects"].values())  # other engine, other key
    assert_same_scores(torch_results, torch_predictions, results, cfg.run_dir)


def test_vllm_engine_runs_a_full_model_as_its_own_engine(tmp_path, tiny_model_dir, fake_vllm, monkeypatch):
    """A full fine-tune: the baselines on the base engine (no LoRA), then the run's model folder
    as the model path of a second engine, started after the first one is let go."""
    config = make_run(tmp_path, tiny_model_dir, eval_settings=", max_examples: 6, subjects: [base, tuned]", adapter_seed=None)
    cfg = load_config(config, ["train.method=full"])
    from tunesmith import train

    train.run(cfg)
    torch_results, torch_prompts, torch_predictions = torch_run_with_prompts(config, monkeypatch, ["train.method=full"])
    results = evaluate.run(load_config(config, ["train.method=full", "eval.engine=vllm"]))

    base_engine, full_engine = fake_vllm
    assert "enable_lora" not in base_engine.kwargs and base_engine.kwargs["model"] == str(tiny_model_dir)
    assert full_engine.kwargs["model"] == str(cfg.run_dir / artifacts.FULL_MODEL_DIR) and "enable_lora" not in full_engine.kwargs
    assert [c["lora"] for c in base_engine.calls + full_engine.calls] == [None, None]
    assert full_engine.calls[0]["prompts"] == torch_prompts["tuned"]
    assert results["subjects"]["tuned"]["kind"] == "full"
    assert_same_scores(torch_results, torch_predictions, results, cfg.run_dir)


@pytest.mark.skipif(VLLM_PRESENT, reason="vLLM is installed here: the refusal cannot be shown")
def test_eval_engine_vllm_is_refused_in_one_line_without_vllm(cli, tmp_path, tiny_model_dir):
    """config check, eval and run: exit 2, one line naming the install and eval.engine: torch,
    before any model loads (the pipeline: before anything is written)."""
    config = make_run(tmp_path, tiny_model_dir, adapter_seed=None)
    (tmp_path / "unused.jsonl").write_text((tmp_path / "runs/r/data/train.jsonl").read_text())  # config check: vLLM the one problem
    for command in (["config", "check"], ["eval"], ["run"]):
        result = cli(*command, str(config), "--set", "eval.engine=vllm")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "eval.engine: vllm needs vLLM" in lines[0], result.stderr
        assert "pip install vllm" in lines[0] and "eval.engine: torch" in lines[0]
    assert not (tmp_path / "runs/r/eval").exists() and not (tmp_path / "runs/r" / artifacts.CONFIG_FILE).exists()
    # base-constrained is our own constrained loop: refused with vLLM at load, whatever is installed.
    result = cli("config", "check", str(config), "--set", "eval.engine=vllm", "--set", "eval.subjects=[base,base-constrained]")
    assert result.returncode == 2 and "base-constrained decodes through tunesmith's own loop" in result.stderr


def _why_no_real_vllm() -> str | None:
    import torch

    if not VLLM_PRESENT:
        return "vLLM is not installed here (pip install vllm, Linux with a CUDA GPU)"
    return None if torch.cuda.is_available() else "vLLM's offline engine needs a CUDA GPU; this machine has none"


@pytest.mark.skipif(_why_no_real_vllm() is not None, reason=_why_no_real_vllm() or "")
def test_real_vllm_answers_like_the_torch_engine(tmp_path, tiny_model_dir, monkeypatch):
    """The real vLLM on the tiny model, fp32: every subject evaluated, with the torch engine's
    prompts, and (other kernels, same maths) at least 90% of answers identical to torch's."""
    config = make_run(tmp_path, tiny_model_dir, eval_settings=", max_examples: 8")
    torch_results, _, torch_predictions = torch_run_with_prompts(config, monkeypatch)
    cfg = load_config(config, ["eval.engine=vllm"])
    results = evaluate.run(cfg)
    predictions = [json.loads(line) for line in (cfg.run_dir / "eval/predictions.jsonl").read_text().splitlines()]
    assert list(results["subjects"]) == list(torch_results["subjects"])
    for name in results["subjects"]:
        same = sum(a["outputs"][name]["text"] == b["outputs"][name]["text"] for a, b in zip(predictions, torch_predictions))
        assert same >= 0.9 * len(predictions), name


def test_offline_engine_takes_the_lint_rank_and_refuses_what_vllm_cannot_load(tiny_run, tmp_path, fake_vllm):
    """The adapter rules serve --engine vllm uses: max_lora_rank from the serving lint (a rank 24
    adapter needs 32), and an adapter vLLM cannot take refused in one line with its fix."""
    import torch

    from conftest import copy_run
    from tunesmith.errors import UserError
    from tunesmith.vllm_engine import start_offline_engine

    run = copy_run(tiny_run, tmp_path / "run")
    adapter = run / artifacts.ADAPTER_DIR
    lora_cfg = json.loads((adapter / "adapter_config.json").read_text())
    base_dir = Path(lora_cfg["base_model_name_or_path"])
    engine = start_offline_engine(base_dir, base_dir, torch.float32, {"tuned": adapter}, seed=0, trust_remote_code=False)
    assert "max_lora_rank" not in engine.kwargs and engine.kwargs["max_loras"] == 1  # r=4: vLLM's default 16 will do
    (adapter / "adapter_config.json").write_text(json.dumps({**lora_cfg, "r": 24}))
    engine = start_offline_engine(base_dir, base_dir, torch.float32, {"tuned": adapter}, seed=0, trust_remote_code=False)
    assert engine.kwargs["max_lora_rank"] == 32
    (adapter / "adapter_config.json").write_text(json.dumps({**lora_cfg, "use_dora": True}))
    with pytest.raises(UserError, match="tuned: vLLM: DoRA adapters are not supported") as err:
        start_offline_engine(base_dir, base_dir, torch.float32, {"tuned": adapter}, seed=0, trust_remote_code=False)
    assert "export" in err.value.hint


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gemma3", "phi3"])
def test_weightless_description_gives_the_stop_ids_of_the_loaded_model(family, family_model_dir):
    """With vLLM the base's weights stay out of this process: its description (tokenizer and
    configs only) must give the loaded model's stop ids, pad id, context and fingerprint."""
    from tunesmith.models import load_model, load_model_description

    folder = str(family_model_dir(family))
    loaded, described = load_model(folder), load_model_description(folder)
    stop_ids = inference.stop_token_ids(loaded.model, loaded.tokenizer)
    assert inference.stop_token_ids(described.model, described.tokenizer) == stop_ids and len(stop_ids) >= 1
    assert inference.pad_token_id(described.tokenizer, stop_ids) == inference.pad_token_id(loaded.tokenizer, stop_ids)
    assert described.model.config.max_position_embeddings == loaded.model.config.max_position_embeddings
    assert (described.fingerprint, described.path) == (loaded.fingerprint, loaded.path)
