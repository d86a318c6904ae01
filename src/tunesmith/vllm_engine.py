"""vLLM: whether it is installed, which adapters it can take, and greedy answers from its offline engine.

vLLM is the engine for teams that outgrow ours (GPUs, paged attention, thousands of prompts):
`tunesmith serve --engine vllm` starts its OpenAI server, `eval.engine: vllm` scores through its
offline engine (`vllm.LLM`). Both take their rules from here: the install check, the adapter
lint's vLLM verdict and `max_lora_rank` (runs.py's), and how an answer ends (inference.py's stop
ids). The prompts are ours, as token ids, so vLLM's answers are to exactly the prompts our
torch loop answers and the scores of the two engines compare.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tunesmith.errors import UserError
from tunesmith.inference import Generation
from tunesmith.runs import lint_adapter_config, vllm_max_lora_rank

INSTALL = "pip install vllm (Linux with a CUDA GPU)"


def vllm_installed() -> bool:
    """Whether `import vllm` would find the package (without importing it: that takes seconds)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except ValueError:  # a module put in sys.modules without a spec (an embedding application's, a test's)
        return "vllm" in sys.modules


def require_vllm(setting: str, fallback: str) -> None:
    """Refuse in one line, naming the install and the setting that avoids vLLM, when it is absent."""
    if not vllm_installed():
        raise UserError(f"{setting} needs vLLM, which is not installed in this environment", f"{INSTALL}, or {fallback}")


def adapter_rank_flag(adapters: dict[str, Path]) -> int | None:
    """The max_lora_rank vLLM needs for these adapters (name -> folder; None: its default will
    do), after refusing one it cannot take at all: the serving lint's vLLM problems (DoRA,
    modules_to_save, LoRA on the embeddings)."""
    ranks = []
    for name, folder in adapters.items():
        lora_cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        problems = [p for p in lint_adapter_config(lora_cfg, "") if p.startswith("vLLM:") and "max_lora_rank" not in p]
        if problems:
            raise UserError(f"{name}: {problems[0]}", "use tunesmith's own engine for it, or export it as the lint says")
        ranks.append(vllm_max_lora_rank(lora_cfg) or 0)
    return max(ranks, default=0) or None


def vllm_dtype(dtype: Any) -> str:
    """vLLM's name of a torch dtype (torch.bfloat16 -> "bfloat16")."""
    return str(dtype).replace("torch.", "")


def start_offline_engine(model_dir: Path, tokenizer_dir: Path, dtype: Any, adapters: dict[str, Path], *,
                         seed: int, trust_remote_code: bool) -> Any:
    """vLLM's offline engine on `model_dir`, LoRA enabled when adapters (name -> folder) will be asked for.

    The tokenizer folder is the base's: vLLM only detokenizes with it (we decode ids ourselves).
    """
    from vllm import LLM

    kwargs: dict[str, Any] = {"model": str(model_dir), "tokenizer": str(tokenizer_dir), "dtype": vllm_dtype(dtype), "seed": seed,
                              "trust_remote_code": trust_remote_code}
    if adapters:
        kwargs.update(enable_lora=True, max_loras=len(adapters))
        rank = adapter_rank_flag(adapters)
        if rank:
            kwargs["max_lora_rank"] = rank
    return LLM(**kwargs)


def lora_request(name: str, number: int, adapter_dir: Path) -> Any:
    """vLLM's request for one adapter: `number` (from 1) must differ between adapters of one engine."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=name, lora_int_id=number, lora_path=str(adapter_dir))


def generate_offline(llm: Any, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: set[int],
                     decode: Callable[[list[int]], str], lora: Any = None) -> list[Generation]:
    """Greedy answers of vLLM's offline engine to token-id prompts, in the prompts' order.

    Greedy (temperature 0), ending on our stop ids or at max_new_tokens, as our torch loop does;
    the answer text is our tokenizer's decoding of the ids before the end-of-turn token, as there.
    vLLM schedules all prompts at once, so each answer's latency is the whole call's wall time.
    """
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=sorted(stop_ids))
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False, lora_request=lora)
    wall_s = time.perf_counter() - start
    results = []
    for out in outputs:
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        stopped = completion.finish_reason == "stop"
        answer = tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens
        results.append(Generation(decode(answer).strip(), tokens, wall_s, wall_s / max(len(prompts), 1), stopped))
    return results


def release_gpu_memory() -> None:
    """After the caller dropped its engine: collect it and give its GPU memory back, so the
    next engine (another model) finds the GPU free. One model on the GPU at a time."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
