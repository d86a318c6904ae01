"""docs/families.md's tables agree with the code and name tests that exist.

Each cell opens with *supported* or *refused* (a refusal quotes its reason) and names its tests
in backticks. For the export columns the word must be what `gguf_export.format_support` (the one
rule config check, run start and export ask) says of that family's model; a refusal's quoted
reason must be part of the rule's own message; every named test id must be collected by pytest.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO

from tunesmith import gguf_export

DOC = REPO / "docs" / "families.md"
ROWS = ["Llama (SmolLM2)", "Llama 3.x", "Qwen2 / 2.5", "Mistral (full attention)", "Mistral (sliding window)", "Gemma 3", "Phi-3", "Granite"]
# column -> the format_support key that decides it (None: no export rule, always supported)
COLUMNS = {
    "LoRA": None, "QLoRA": None, "full": None, "serve": None,
    "merged": "merged", "adapter": "adapter", "GGUF f16 / q8_0": "gguf", "GGUF q4_k_m / q4_0": "gguf",
    "LoRA GGUF": "gguf", "Ollama": "ollama", "llama.cpp parity": "gguf",
}
TEST_ID = re.compile(r"`(tests/[\w/]+\.py::[^`\s]+)`")


def read_tables(text: str) -> dict[tuple[str, str], str]:
    """{(row, column): cell} from every markdown table whose first column is `family`."""
    cells: dict[tuple[str, str], str] = {}
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        parts = [p.strip() for p in line.strip().strip("|").split(" | ")]
        if header is None:
            header = parts
        elif header[0] == "family" and not set(line) <= set("|-: "):
            assert len(parts) == len(header), line
            for column, cell in zip(header[1:], parts[1:]):
                assert (parts[0], column) not in cells, f"{parts[0]} / {column} appears twice"
                cells[(parts[0], column)] = cell
    return cells


def cell_claim(cell: str) -> tuple[str, str | None, list[str]]:
    """(supported | refused, the quoted reason of a refusal, the test ids named)."""
    status = cell.split()[0].rstrip(":,")
    reason = re.search(r'^refused \("([^"]+)"\)', cell)
    return status, reason.group(1) if reason else None, TEST_ID.findall(cell)


@pytest.fixture(scope="module")
def cells():
    return read_tables(DOC.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def row_configs(tiny_model_dir):
    """Each row's model config, as config check reads it: the tests' tiny Llama and the family
    matrix's configs (tests/families.py), Mistral once with its sliding window and once without."""
    from families import family_config, family_tokenizer
    from transformers import AutoConfig

    configs = {"Llama (SmolLM2)": AutoConfig.from_pretrained(tiny_model_dir)}
    for row, name in (("Llama 3.x", "llama3"), ("Qwen2 / 2.5", "qwen2"), ("Mistral (sliding window)", "mistral"),
                      ("Gemma 3", "gemma3"), ("Phi-3", "phi3"), ("Granite", "granite")):
        configs[row] = family_config(name, family_tokenizer(name))
    full_attention = family_config("mistral", family_tokenizer("mistral"))
    full_attention.sliding_window = None  # Mistral 7B v0.2 / v0.3
    configs["Mistral (full attention)"] = full_attention
    return configs


def test_the_tables_cover_every_family_and_format(cells):
    assert {row for row, _ in cells} == set(ROWS)
    assert {column for _, column in cells} == set(COLUMNS)
    assert len(cells) == len(ROWS) * len(COLUMNS)
    for (row, column), cell in cells.items():
        status, reason, tests = cell_claim(cell)
        assert status in ("supported", "refused"), f"{row} / {column}: {cell!r}"
        assert tests or "untested" in cell, f"{row} / {column} names no test and does not say untested"
        assert (reason is not None) == (status == "refused"), f"{row} / {column}: a refusal quotes its reason"


def disagreements(cells: dict[tuple[str, str], str], row_configs: dict) -> list[str]:
    """One line per export cell whose claim is not what format_support says of that family."""
    lines = []
    for (row, column), cell in cells.items():
        status, reason, _ = cell_claim(cell)
        fmt = COLUMNS[column]
        refusal = gguf_export.format_support(row_configs[row])[fmt] if fmt else None
        if refusal is None and status != "supported":
            lines.append(f"{row} / {column}: the docs say {status}, format_support accepts it")
        elif refusal is not None and status != "refused":
            lines.append(f"{row} / {column}: the docs say {status}, format_support refuses: {refusal}")
        elif refusal is not None and reason not in refusal:
            lines.append(f"{row} / {column}: {reason!r} is not in format_support's reason {refusal!r}")
    return lines


def test_every_export_cell_agrees_with_format_support(cells, row_configs):
    assert disagreements(cells, row_configs) == []


def test_every_test_named_exists(cells):
    named = {test for cell in cells.values() for test in cell_claim(cell)[2]}
    named |= set(TEST_ID.findall(DOC.read_text(encoding="utf-8")))  # the notes' tests too
    files = sorted({test.split("::")[0] for test in named})
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    ids = {line.strip() for line in collected.stdout.splitlines() if "::" in line}
    assert ids, collected.stdout[-2000:] + collected.stderr[-2000:]
    # A name without brackets stands for all its parametrizations: one of them must exist.
    missing = sorted(t for t in named if t not in ids and not any(i.startswith(t + "[") for i in ids))
    assert missing == [], f"docs/families.md names tests that do not exist: {missing}"


def test_a_drifted_cell_is_caught(cells, row_configs):
    drifted = dict(cells)
    drifted[("Granite", "LoRA GGUF")] = "supported: `tests/test_export.py::test_x`"
    drifted[("Qwen2 / 2.5", "Ollama")] = 'refused ("no reason"): `tests/test_export.py::test_x`'
    drifted[("Mistral (sliding window)", "merged")] = 'refused ("window"): `tests/test_export.py::test_x`'
    drifted[("Mistral (sliding window)", "Ollama")] = 'refused ("sliding window is too short"): `tests/test_export.py::test_x`'
    assert [line.split(":")[0] for line in disagreements(drifted, row_configs)] == [
        "Qwen2 / 2.5 / Ollama", "Mistral (sliding window) / merged", "Mistral (sliding window) / Ollama", "Granite / LoRA GGUF"]
