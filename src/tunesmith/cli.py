"""The `tunesmith` command: parse, load config, call the stage, print. Nothing else lives here.

User errors (`UserError`) print one line with the fix and exit 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tunesmith.errors import GateFailed, UserError
from tunesmith.humanize import number_text

app = typer.Typer(
    name="tunesmith",
    help="Local-first LLM fine-tuning: check data, train, evaluate against baselines, export, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
config_app = typer.Typer(help="Inspect run configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

console = Console()
err_console = Console(stderr=True)

# Typer >= 0.16 vendors click under typer._click; accept both, so usage errors exit 2 either way.
_USAGE_ERRORS = tuple({click.exceptions.ClickException, getattr(typer.exceptions, "TyperException", click.exceptions.ClickException)})
_ABORTS = tuple({click.exceptions.Abort, typer.Abort, KeyboardInterrupt})

def _print_version(value: bool) -> None:
    if value:
        from tunesmith import __version__

        console.print(f"tunesmith {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
) -> None:
    """Local-first LLM fine-tuning: check data, train, evaluate against baselines, export, serve."""


SetOption = typer.Option([], "--set", help="Override a config key: --set train.lora.r=8 (repeatable).")
AllowPiiOption = typer.Option(False, "--allow-pii", help="train.backend openai: upload data in which the check found personal data.")
AllowFloatingOption = typer.Option(False, "--allow-floating-model", help="train.backend openai: accept an undated model alias.")


def provider_overrides(overrides: list[str], backend: str | None, allow_pii: bool, allow_floating_model: bool) -> list[str]:
    """The provider flags as the config overrides they are (so the manifest records them)."""
    extra = [f"train.backend={backend}"] if backend is not None else []
    extra += ["train.openai.allow_pii=true"] if allow_pii else []
    extra += ["train.openai.allow_floating_model=true"] if allow_floating_model else []
    return [*overrides, *extra]


@app.command()
def init(
    folder: Path = typer.Argument(..., help="Folder for config.yaml and data/tickets.jsonl."),
    count: int = typer.Option(300, min=10, help="Examples in the generated support-ticket dataset."),
    seed: int = typer.Option(0, help="Seed of the generator (same seed, same data)."),
    model: Optional[str] = typer.Option(None, help="Base model to put in the config."),
    force: bool = typer.Option(False, help="Overwrite existing files."),
) -> None:
    """Write a commented starter config and a small example dataset."""
    from tunesmith.starter import write_starter

    for path in write_starter(folder, count=count, seed=seed, model=model, force=force):
        console.print(f"wrote {path}")
    console.print(f"next: tunesmith data check {folder / 'data' / 'tickets.jsonl'}")


def short_fingerprint(value: str | None) -> str:
    """The table's shortened form; the ellipsis says it is not the whole (pinnable) value."""
    return f"{value[:16]}…" if value else "-"


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List builtin and cached models with fingerprint and size."""
    from tunesmith.models import list_models

    rows = list_models()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("name", "kind", "status", "fingerprint", "size")
    for row in rows:
        size = f"{row['size_bytes'] / 1e6:.0f} MB" if row["size_bytes"] else "-"
        table.add_row(row["name"], row["kind"], row["status"], short_fingerprint(row["fingerprint"]), size)
    console.print(table)
    # The pin needs all 64 characters: print them whole, one line per model, never wrapped,
    # in the form a config takes (the table above would cut or fold them).
    pinned = [row for row in rows if row["fingerprint"]]
    if pinned:
        console.print("\nto pin a base model, copy its line into the config's model section:", markup=False, highlight=False)
    for row in pinned:
        console.print(f"  expected_fingerprint: {row['fingerprint']}  # {row['name']}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The user message."),
    model: str = typer.Option("smollm2-135m-instruct", help="Model reference."),
    system: Optional[str] = typer.Option(None, help="System prompt."),
    chat_template: Optional[str] = typer.Option(
        None, "--chat-template", help="The model's own template (default), chatml, llama3, gemma, mistral, phi3, or a .jinja file."
    ),
    max_new_tokens: int = typer.Option(64, min=1),
    trust_remote_code: bool = typer.Option(False, help="Run code shipped with the model."),
    allow_pickle: bool = typer.Option(False, help="Allow .bin/.pt weights (they unpickle)."),
) -> None:
    """Greedy answer of a model to one prompt, through its chat template."""
    from tunesmith import inference
    from tunesmith.models import load_model

    loaded = load_model(
        model, dtype=inference.inference_dtype("auto"), trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, chat_template=chat_template
    )
    tokenizer = loaded.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"model {model!r} has no chat template, so it cannot answer a chat message", "pass --chat-template NAME (chatml, llama3, gemma, mistral, phi3) or use an instruct model")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = inference.render_ids(tokenizer, messages)
    stop_ids = inference.stop_token_ids(loaded.model, tokenizer)
    (answer,) = inference.generate_greedy(
        loaded.model, [ids], max_new_tokens=max_new_tokens, batch_size=1, stop_ids=stop_ids,
        pad_id=inference.pad_token_id(tokenizer, stop_ids),
        decode=lambda t: tokenizer.decode(t, skip_special_tokens=True),
    )
    console.print(answer.text, markup=False, highlight=False)


@app.command()
def train(
    config: Path = typer.Argument(..., help="Run config YAML."),
    overrides: list[str] = SetOption,
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in the run folder."),
    show_mask: int = typer.Option(0, "--show-mask", min=0, help="Print N examples with trained tokens highlighted (between [[ and ]] in a file or pipe), then stop."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes on this machine (launches torchrun; DDP, or FSDP with train.parallel fsdp)."),
    force: bool = typer.Option(False, "--force", help="Train again from step 0 over a finished run (replaces its adapter or model and checkpoints)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="local or openai (a job through the OpenAI fine-tuning API); default: train.backend."),
    allow_pii: bool = AllowPiiOption,
    allow_floating_model: bool = AllowFloatingOption,
) -> None:
    """Fine-tune (LoRA, QLoRA or full) per the config; writes the adapter or model to the run folder."""
    from tunesmith import train as train_stage
    from tunesmith.checkpoints import check_resumable
    from tunesmith.config import load_config

    cfg = load_config(config, provider_overrides(overrides, backend, allow_pii, allow_floating_model))
    if cfg.train.backend == "openai":
        from tunesmith import provider

        provider.run(cfg, resume=resume, force=force, console=err_console)
        return
    if show_mask:
        train_stage.show_mask(cfg, show_mask, console)
        return
    if resume:
        check_resumable(cfg, max(nproc, int(os.environ.get("WORLD_SIZE", "1"))))
    train_stage.refuse_replacing_finished_run(cfg, resume=resume, force=force)
    if nproc > 1:
        import subprocess

        from tunesmith.distributed import check_processes_fit_devices

        check_processes_fit_devices(nproc)  # before torchrun starts processes that would crash on a missing GPU

        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "tunesmith", "train", str(config)]
        command += [arg for o in overrides for arg in ("--set", o)] + (["--resume"] if resume else []) + (["--force"] if force else [])
        sys.exit(subprocess.call(command))
    train_stage.run(cfg, resume=resume, force=force, console=err_console)


@app.command("eval")
def eval_command(
    target: Path = typer.Argument(..., help="Run config YAML, or a run folder (reads RUN/config.yaml)."),
    overrides: list[str] = SetOption,
    against: Optional[Path] = typer.Option(None, "--against", help="Another run folder to compare with (e.g. the one in production)."),
    gate: list[str] = typer.Option([], "--gate", help='Fail (exit 3) unless this holds, e.g. "accuracy>=0.85" (repeatable).'),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write the gates as JUnit XML here."),
    subjects: Optional[str] = typer.Option(None, "--subjects", help="Comma-separated: base, base-prompted, base-constrained, base-fewshot, majority, tuned."),
    max_examples: Optional[int] = typer.Option(None, "--max-examples", min=1, help="Evaluate the first N held-out examples."),
    allow_base_mismatch: bool = typer.Option(False, "--allow-base-mismatch", help="Evaluate an adapter on a base whose fingerprint differs from the run's (warns)."),
) -> None:
    """Evaluate the fine-tune against the base model (zero- and few-shot) and the ground truth."""
    from tunesmith import evaluate
    from tunesmith.config import load_config

    overrides = list(overrides)
    if target.is_dir():
        # A run folder: its own config, with the run folder as output_dir wherever it now lives.
        overrides.append(f"output_dir={target.resolve()}")
        target = target / "config.yaml"
    if subjects is not None:
        overrides.append("eval.subjects=[" + ",".join(s.strip() for s in subjects.split(",") if s.strip()) + "]")
    if max_examples is not None:
        overrides.append(f"eval.max_examples={max_examples}")
    cfg = load_config(target, overrides)
    try:
        results = evaluate.run(cfg, against=against, gates=gate, junit=junit, allow_base_mismatch=allow_base_mismatch)
    except GateFailed:
        err_console.print(f"report: {cfg.run_dir / 'eval' / 'report.html'}", markup=False, highlight=False)
        raise
    primary = results["primary_metric"]
    table = Table("subject", primary, "95% interval")
    for name, entry in results["subjects"].items():
        m = entry["metrics"][primary]
        table.add_row(name, f"{m['value']:.3f}", f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]")
    console.print(table)
    console.print(f"verdict: {results['verdict']['text']}", markup=False, highlight=False)
    console.print(f"report: {cfg.run_dir / 'eval' / 'report.html'}", markup=False, highlight=False)


@app.command("run")
def run_pipeline(
    config: Path = typer.Argument(..., help="Run config YAML."),
    overrides: list[str] = SetOption,
    from_stage: Optional[str] = typer.Option(None, "--from", help="First stage: check, split, baseline, train, eval, export."),
    until_stage: Optional[str] = typer.Option(None, "--until", help="Last stage."),
    force: bool = typer.Option(False, help="Redo stages even when their inputs are unchanged."),
    allow_pii: bool = AllowPiiOption,
    allow_floating_model: bool = AllowFloatingOption,
) -> None:
    """The whole pipeline: check, split, baseline, train, eval, export; unchanged stages are skipped."""
    from tunesmith import pipeline
    from tunesmith.config import load_config

    cfg = load_config(config, provider_overrides(overrides, None, allow_pii, allow_floating_model))
    summary = pipeline.run(cfg, from_stage=from_stage, until_stage=until_stage, force=force)
    verdict = (summary.get("eval") or {}).get("verdict")
    if verdict:
        console.print(f"[bold]verdict:[/bold] {verdict}")
    report = cfg.run_dir / "eval" / "report.html"
    if report.exists():
        console.print(f"report: {report}")
    console.print(f"run folder: {cfg.run_dir}")


@app.command("export")
def export_command(
    run_dir: Path = typer.Argument(..., help="Run folder (the config's output_dir)."),
    fmt: str = typer.Option(..., "--format", help="merged, adapter, gguf, ollama, or hub (a folder for the Hugging Face Hub: adapter or merged model, GGUF files if exported, card)."),
    gguf_type: list[str] = typer.Option([], "--gguf-type", help="GGUF tensor type: f16, q8_0, bf16, f32, q4_k_m, q4_0 (repeatable; default from the config; q4 types need llama-cpp-python)."),
    min_parity: Optional[float] = typer.Option(None, "--min-parity", min=0.0, max=1.0, help="Exit 3 when an exported file keeps the greedy answer on fewer than this share of probe prompts (default: export.min_parity)."),
    allow_base_mismatch: bool = typer.Option(False, "--allow-base-mismatch", help="Load the adapter on a base whose fingerprint differs from the run's."),
    force: bool = typer.Option(False, "--force", help="Replace RUN/export/FORMAT even when it holds files tunesmith did not write."),
) -> None:
    """Export the trained model (RUN/export/FORMAT/) and check it against the trained model."""
    from tunesmith import export

    try:
        report = export.run(run_dir, fmt, gguf_types=gguf_type or None, min_parity=min_parity, allow_base_mismatch=allow_base_mismatch, force=force)
    except GateFailed:
        err_console.print(f"report: {Path(run_dir) / 'manifest.json'} (export.{fmt})", markup=False, highlight=False)
        raise
    console.print(f"exported {fmt}: {report['path']}", markup=False, highlight=False)
    if report.get("warning"):
        err_console.print(f"warning: {report['warning']}", markup=False, highlight=False)
    for line in report.get("lint", []):
        err_console.print(f"lint: {line}", markup=False, highlight=False)
    for line in report.get("skipped", []):
        err_console.print(f"skipped: {line}", markup=False, highlight=False)
    for where in export.parity_shares(report):
        console.print(f"parity: {where} probe prompts with an unchanged greedy answer", markup=False, highlight=False)
    problems = export.parity_problems(report)
    for line in problems:
        err_console.print(f"parity mismatch: {line}", markup=False, highlight=False)
    if not problems:
        console.print("parity: exported artifact matches the trained model on every probe prompt")
    if report.get("ollama_create"):
        console.print(f"next: {report['ollama_create']}", markup=False, highlight=False)


@app.command("push")
def push_command(
    run_dir: Path = typer.Argument(..., help="Run folder with an export from `tunesmith export RUN --format hub`."),
    repo: str = typer.Argument(..., help="Hub repository, OWNER/NAME (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
) -> None:
    """Upload RUN/export/hub/ (model, GGUF, card) to the Hugging Face Hub; needs a token and network."""
    from tunesmith.hub import push

    url = push(run_dir, repo, private=private)
    console.print(f"pushed {run_dir}/export/hub to {repo}: {url}", markup=False, highlight=False)


@app.command("serve")
def serve_command(
    models: list[str] = typer.Argument(None, help="Run folders, adapter folders (NAME=PATH to rename) and/or one base model reference."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TUNESMITH_API_KEY", help="Require Authorization: Bearer KEY on every route but a bare /health."),
    max_adapters: int = typer.Option(4, "--max-adapters", min=1, help="Adapters kept loaded (LRU)."),
    max_batch_size: int = typer.Option(16, "--max-batch-size", min=1, help="Sequences decoded together."),
    max_tokens_limit: int = typer.Option(1024, "--max-tokens-limit", min=1, help="Largest max_tokens a request may ask for."),
    max_n: int = typer.Option(4, "--max-n", min=1, help="Largest n per request."),
    max_sequences_per_request: int = typer.Option(16, "--max-sequences-per-request", min=1, help="Largest prompts x n one request may start."),
    max_prompt_tokens: Optional[int] = typer.Option(None, "--max-prompt-tokens", min=1, help="Longest prompt in tokens."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", min=1024, help="Largest request body."),
    allow_base_mismatch: bool = typer.Option(False, "--allow-base-mismatch", help="Serve adapters trained on a base with another fingerprint."),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Folder of the fine-tuning API's files and jobs (default: one per base model under TUNESMITH_HOME/serve)."),
    max_upload_bytes: int = typer.Option(100 << 20, "--max-upload-bytes", min=1024, help="Largest file uploaded to /v1/files."),
    finetune_set: list[str] = typer.Option([], "--finetune-set", help="Run-config override for every fine-tuning job, e.g. train.lora.r=8 (repeatable)."),
    precision: str = typer.Option("auto", "--precision", help="Weights' dtype: auto (bf16 where the hardware runs it fast, else fp32), fp32 or bf16."),
    prefix_cache: bool = typer.Option(True, "--prefix-cache/--no-prefix-cache", help="Compute a shared system prompt's KV once and reuse it across requests."),
    engine: str = typer.Option("tunesmith", "--engine", help="tunesmith (this server, fine-tuning API included) or vllm (vLLM's OpenAI server on the same base and adapters; needs vLLM installed)."),
) -> None:
    """OpenAI-compatible API (chat, completions, models, fine-tuning, health, metrics) over one base and its adapters."""
    from tunesmith.serve import ServeSettings, serve

    if engine not in ("tunesmith", "vllm"):
        raise UserError(f"--engine {engine!r} is not one of tunesmith, vllm", "pass --engine tunesmith (the default) or --engine vllm")
    if engine == "vllm":
        from tunesmith.serve.vllm import check_vllm_installed

        check_vllm_installed()  # before anything is resolved: the one-line refusal comes first
    if precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"--precision {precision!r} is not one of auto, fp32, bf16", "pass --precision auto (bf16 where the hardware runs it fast)")
    if api_key is None:  # click reads an empty TUNESMITH_API_KEY as unset: pass it on to be refused
        api_key = os.environ.get("TUNESMITH_API_KEY")
    settings = ServeSettings(
        models=models or ["smollm2-135m-instruct"],
        host=host,
        port=port,
        api_key=api_key,
        max_adapters=max_adapters,
        max_batch_size=max_batch_size,
        max_tokens_limit=max_tokens_limit,
        max_n=max_n,
        max_sequences_per_request=max_sequences_per_request,
        max_prompt_tokens=max_prompt_tokens,
        max_body_bytes=max_body_bytes,
        allow_base_mismatch=allow_base_mismatch,
        state_dir=str(state_dir) if state_dir else None,
        max_upload_bytes=max_upload_bytes,
        finetune_overrides=finetune_set,
        precision=precision,
        prefix_cache=prefix_cache,
    )
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err_console.print(f"warning: serving on {host} without --api-key: anyone who reaches this port can use the model")
    if engine == "vllm":
        from tunesmith.serve.vllm import serve_vllm

        serve_vllm(settings)
        return
    serve(settings)


runs_app = typer.Typer(help="List and compare runs.", invoke_without_command=True)
app.add_typer(runs_app, name="runs")


@runs_app.callback()
def runs_list(
    ctx: typer.Context,
    root: list[Path] = typer.Option([], help="Also look for runs in this folder (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List runs: model, method, data, status, primary metric, time."""
    if ctx.invoked_subcommand is not None:
        return
    from tunesmith.runs import list_runs

    rows = list_runs([*root, Path("runs")])
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("name", "model", "method", "data", "status", "primary metric", "time", "path")
    for row in rows:
        metric = row["primary_metric"]
        shown = f"{metric['name']}={metric['value']:.3f}" if metric and isinstance(metric.get("value"), (int, float)) else "-"
        table.add_row(row["name"], str(row["model"]), str(row["method"]), str(row["data"]), row["status"], shown, f"{row['seconds']:.0f}s", row["path"])
    console.print(table)


@runs_app.command("compare")
def runs_compare(a: Path = typer.Argument(..., help="Run folder A."), b: Path = typer.Argument(..., help="Run folder B.")) -> None:
    """Config and metric differences between two runs."""
    from tunesmith.runs import compare_runs

    diff = compare_runs(a, b)
    table = Table("config key", str(a), str(b))
    for key, (left, right) in diff["config"].items():
        table.add_row(key, _config_value_text(left), _config_value_text(right))
    console.print(table)
    table = Table("metric", str(a), str(b), "delta")
    for key, (left, right) in diff["metrics"].items():
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right))
        delta = number_text(float(right - left)) if numbers else ""
        table.add_row(key, number_text(left), number_text(right), ("+" if numbers and right - left > 0 else "") + delta)
    console.print(table)


def _config_value_text(value: object) -> str:
    """A config value as YAML would show it: strings bare, None as null, floats as written."""
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


data_app = typer.Typer(help="Read, check, convert and split training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

FormatOption = typer.Option("auto", "--format", help="Input format: auto, openai, prompt_completion, alpaca, sharegpt, csv, tsv, parquet, hf_disk.")
InputColOption = typer.Option(None, "--input-col", help="Tabular data: the column holding the user input.")
OutputColOption = typer.Option(None, "--output-col", help="Tabular data: the column holding the expected answer.")
SystemOption = typer.Option(None, "--system", help="System prompt added to every example without one.")
ChatTemplateOption = typer.Option(
    None, "--chat-template", help="With --model: its own template (default), chatml, llama3, gemma, mistral, phi3, or a .jinja file."
)
ForceOption = typer.Option(False, "--force", help="Replace an output that tunesmith did not write (a user's file or folder).")


@data_app.command("check")
def data_check(
    file: Path = typer.Argument(..., help="Data file (any supported format)."),
    model: Optional[str] = typer.Option(None, help="Count tokens with this model's tokenizer and chat template."),
    chat_template: Optional[str] = ChatTemplateOption,
    max_length: Optional[int] = typer.Option(None, "--max-length", min=1, help="Report examples longer than this (tokens)."),
    eval_file: Optional[Path] = typer.Option(None, "--eval", help="Held-out file: report inputs leaking into it."),
    near_dup_threshold: float = typer.Option(0.9, "--near-dup-threshold", min=0.01, max=1.0, help="Estimated Jaccard similarity from which two examples are near-duplicates."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable report."),
    strict: bool = typer.Option(False, help="Exit 1 on warnings."),
    redact: Optional[Path] = typer.Option(None, "--redact", help="Write a copy with PII replaced by [EMAIL], [PHONE], ..."),
    force: bool = ForceOption,
    format: str = FormatOption,
    input_col: Optional[str] = InputColOption,
    output_col: Optional[str] = OutputColOption,
    system: Optional[str] = SystemOption,
) -> int:
    """Report every problem of a data file with its line and fix (exit 2 on errors)."""
    from tunesmith.check import check_file, render_report

    report = check_file(
        file, format=format, input_col=input_col, output_col=output_col, system_prompt=system, model=model,
        chat_template=chat_template, max_length=max_length, eval_path=eval_file, near_dup_threshold=near_dup_threshold, redact_path=redact, force=force,
    )
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        render_report(report, console)
    return report.exit_code(strict)


@data_app.command("convert")
def data_convert(
    src: Path = typer.Argument(..., help="Input data file (any supported format)."),
    dst: Path = typer.Argument(..., help="Output: canonical OpenAI chat JSONL."),
    format: str = FormatOption,
    input_col: Optional[str] = InputColOption,
    output_col: Optional[str] = OutputColOption,
    system: Optional[str] = SystemOption,
    force: bool = ForceOption,
) -> None:
    """Convert any supported format to OpenAI chat JSONL."""
    from tunesmith.data import convert

    count = convert(src, dst, format, input_col, output_col, system, force=force)
    console.print(f"wrote {count} conversations to {dst}")


@data_app.command("split")
def data_split(
    file: Path = typer.Argument(..., help="Data file (any supported format)."),
    out: Path = typer.Option(..., "--out", help="Folder for train.jsonl and eval.jsonl."),
    eval_fraction: float = typer.Option(0.15, "--eval-fraction", min=0.0, max=0.99, help="Share held out (0.1-0.2 advised)."),
    seed: int = typer.Option(0, help="Seed of the split (same seed, same split)."),
    format: str = FormatOption,
    input_col: Optional[str] = InputColOption,
    output_col: Optional[str] = OutputColOption,
    system: Optional[str] = SystemOption,
    force: bool = ForceOption,
) -> None:
    """Deterministic train/eval split, stratified by label, no input on both sides."""
    from tunesmith.data import split_file

    train_path, eval_path, n_train, n_eval = split_file(file, out, eval_fraction, seed, format, input_col, output_col, system, force=force)
    console.print(f"wrote {n_train} examples to {train_path} and {n_eval} to {eval_path}")


@data_app.command("estimate")
def data_estimate(
    file: Path = typer.Argument(..., help="Data file (any supported format)."),
    model: str = typer.Option(..., help="Model reference: its tokenizer, chat template and shape."),
    epochs: float = typer.Option(..., min=0.01, help="Passes over the data."),
    max_length: int = typer.Option(1024, "--max-length", min=8, help="Longest example in tokens; longer ones are counted truncated."),
    method: str = typer.Option("lora", help="lora, qlora or full."),
    utilisation: float = typer.Option(0.35, min=0.01, max=1.0, help="Share of a GPU's peak FLOP/s assumed in the GPU table."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Examples per step, for the memory table and the shared prompt's cost (train.batch_size)."),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", help="Measure this machine (a few training steps, cached)."),
    recalibrate: bool = typer.Option(False, "--recalibrate", help="Measure again even when a calibration is cached."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    format: str = FormatOption,
    input_col: Optional[str] = InputColOption,
    output_col: Optional[str] = OutputColOption,
    system: Optional[str] = SystemOption,
) -> None:
    """Trained tokens, FLOPs, memory per method (fits / doesn't), time here and on common GPUs, and the OpenAI bill of a fine-tune."""
    from tunesmith.estimate import estimate_file, render_estimate

    result = estimate_file(
        file, model, epochs, max_length=max_length, method=method, format=format, input_col=input_col, output_col=output_col,
        system_prompt=system, calibrate_here=calibrate, recalibrate=recalibrate, utilisation=utilisation, batch_size=batch_size,
    )
    if as_json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        render_estimate(result, console)


@app.command()
def advise(
    file: Path = typer.Argument(..., help="Data file (any supported format)."),
    task: Optional[str] = typer.Option(None, help='What the model should do, e.g. "route support tickets".'),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    format: str = FormatOption,
    input_col: Optional[str] = InputColOption,
    output_col: Optional[str] = OutputColOption,
    system: Optional[str] = SystemOption,
) -> None:
    """When to fine-tune, and when not: a recommendation from the data's measured statistics."""
    from tunesmith.advise import advise_file

    advice = advise_file(file, task, format=format, input_col=input_col, output_col=output_col, system_prompt=system)
    if as_json:
        print(json.dumps(advice.to_dict(), indent=2, ensure_ascii=False))
        return
    console.print(f"[bold]recommendation:[/] {advice.recommendation}", soft_wrap=True)
    console.print(f"[bold]task:[/] {advice.task_kind}", soft_wrap=True)
    if not console.is_terminal:
        # A file or a pipe: one reason per line, whole (rich would cut them at 80 columns).
        for reason in advice.reasons:
            console.print(f"  - {reason}", markup=False, highlight=False, soft_wrap=True)
        return
    # A terminal: wrapped lines align under the reason's text, not under the bullet.
    reasons = Table.grid(padding=(0, 1))
    reasons.add_column(no_wrap=True)
    reasons.add_column()
    for reason in advice.reasons:
        reasons.add_row("  -", Text(reason))
    console.print(reasons)


@config_app.command("check")
def config_check(
    config: Path = typer.Argument(..., help="Run config YAML."),
    overrides: list[str] = SetOption,
) -> None:
    """Validate a config (every error at once), check that its model, data and schema exist, and print it resolved."""
    from tunesmith.config import check_inputs, config_to_yaml, load_config

    cfg = load_config(config, overrides)
    check_inputs(cfg, str(config))
    console.print(config_to_yaml(cfg), markup=False, highlight=False)


@config_app.command("reference")
def config_reference() -> None:
    """Print the configuration reference (Markdown), generated from the field docs."""
    from tunesmith.config import config_reference_markdown

    print(config_reference_markdown())


def cli_reference_markdown() -> str:
    """The CLI reference (docs/cli.md), generated from the commands' own help."""
    root = typer.main.get_command(app)
    lines = ["# CLI reference", "", "Generated from the commands' help (`make docs`); do not edit by hand.", ""]

    def walk(command, path: list[str], parent) -> None:
        # The context's name is this command's own: click prefixes the parents' names itself.
        ctx = command.make_context(path[-1], [], resilient_parsing=True, parent=parent, terminal_width=100, max_content_width=100)
        subcommands = getattr(command, "commands", None)
        if len(path) > 1:
            lines.extend([f"## `{' '.join(path)}`", "", "```", command.get_help(ctx), "```", ""])
        for name in sorted(subcommands or {}):
            walk(subcommands[name], [*path, name], ctx)

    walk(root, ["tunesmith"], None)
    return "\n".join(lines)


def _quiet_libraries() -> None:
    """Our own progress bars say what happens; the libraries' per-load bars and deprecation
    notices about their internals are noise to a user (real warnings still show)."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and "transformers" not in sys.modules:
        return  # transformers reads the variable when imported: no 2 s import for `data check`
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> None:
    """Entry point: turn user errors into one line and exit code 2."""
    _quiet_libraries()
    try:
        result = app(args=argv, prog_name="tunesmith", standalone_mode=False)
    except UserError as e:
        err_console.print(f"error: {e.one_line()}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except GateFailed as e:
        err_console.print(f"gate failed: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except _USAGE_ERRORS as e:
        e.show()
        sys.exit(getattr(e, "exit_code", 2))
    except _ABORTS:
        err_console.print("interrupted")
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
