"""The `tunesmith` command: parse, load config, call the stage, print. Nothing else lives here.

User errors (`UserError`) print one line with the fix and exit 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from tunesmith.errors import GateFailed, UserError

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

SetOption = typer.Option([], "--set", help="Override a config key: --set train.lora.r=8 (repeatable).")


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
        table.add_row(row["name"], row["kind"], row["status"], (row["fingerprint"] or "-")[:16], size)
    console.print(table)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The user message."),
    model: str = typer.Option("smollm2-135m-instruct", help="Model reference."),
    system: Optional[str] = typer.Option(None, help="System prompt."),
    max_new_tokens: int = typer.Option(64, min=1),
    trust_remote_code: bool = typer.Option(False, help="Run code shipped with the model."),
    allow_pickle: bool = typer.Option(False, help="Allow .bin/.pt weights (they unpickle)."),
) -> None:
    """Greedy answer of a model to one prompt, through its chat template."""
    import torch

    from tunesmith.models import load_model

    loaded = load_model(model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = loaded.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    console.print(loaded.tokenizer.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True))


@config_app.command("check")
def config_check(
    config: Path = typer.Argument(..., help="Run config YAML."),
    overrides: list[str] = SetOption,
) -> None:
    """Validate a config (every error at once) and print it resolved."""
    from tunesmith.config import config_to_yaml, load_config

    cfg = load_config(config, overrides)
    console.print(config_to_yaml(cfg), markup=False, highlight=False)


@config_app.command("reference")
def config_reference() -> None:
    """Print the configuration reference (Markdown), generated from the field docs."""
    from tunesmith.config import config_reference_markdown

    print(config_reference_markdown())


def main(argv: list[str] | None = None) -> None:
    """Entry point: turn user errors into one line and exit code 2."""
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
