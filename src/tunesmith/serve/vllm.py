"""`tunesmith serve --engine vllm`: hand the same base and adapters to vLLM's OpenAI server.

vLLM is the engine for teams that outgrow ours (GPUs, paged attention, many concurrent users);
tunesmith resolves what to serve (run folders, adapter folders, NAME=PATH), checks each adapter
with the serving lint, and starts vLLM with the flags that lint computes.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tunesmith.vllm_engine import adapter_rank_flag, require_vllm


def check_vllm_installed() -> None:
    """Refuse in one line, naming the install, when vLLM cannot be imported."""
    require_vllm("--engine vllm", "serve with --engine tunesmith")


def vllm_command(settings: Any) -> list[str]:
    """The argv that starts vLLM's OpenAI server on the settings' base and adapters."""
    from tunesmith.models import resolve_model_dir
    from tunesmith.serve.app import resolve_served

    served = resolve_served(settings.models)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolve_model_dir(served.base_ref))]
    argv += ["--served-model-name", served.base_id, "--host", settings.host, "--port", str(settings.port)]
    argv += ["--max-num-seqs", str(settings.max_batch_size), "--dtype", {"auto": "auto", "fp32": "float32", "bf16": "bfloat16"}[settings.precision]]
    if settings.prefix_cache:
        argv.append("--enable-prefix-caching")
    if settings.api_key:
        argv += ["--api-key", settings.api_key]
    adapters = [m for m in served.models.values() if m.adapter_path is not None]
    if adapters:
        rank = adapter_rank_flag({m.id: m.adapter_path for m in adapters})
        argv += ["--enable-lora", "--max-loras", str(min(settings.max_adapters, len(adapters)))]
        argv += ["--lora-modules", *[f"{m.id}={m.adapter_path}" for m in adapters]]
        if rank:
            argv += ["--max-lora-rank", str(rank)]
    return argv


def serve_vllm(settings: Any) -> None:
    """Replace this process with vLLM's server (the `tunesmith serve --engine vllm` command)."""
    check_vllm_installed()
    argv = vllm_command(settings)
    print("starting vLLM:", " ".join(argv[1:]), flush=True)
    os.execv(argv[0], argv)
