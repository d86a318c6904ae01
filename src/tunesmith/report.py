"""The evaluation report: report.md, a self-contained report.html, predictions, results, JUnit.

Both reports are rendered from one list of blocks (heading, paragraph, table, image, code), so
they cannot drift apart. The HTML embeds its plots as base64 PNG (matplotlib, Agg backend) and
loads nothing from the network; the Markdown links to it for the plots.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from tunesmith import artifacts
from tunesmith import metrics as M
from tunesmith.humanize import plural

MAX_DISAGREEMENTS = 12
MAX_CONFUSION_LABELS = 25  # a larger matrix is unreadable: list the top confusions instead
SHOWN_CHARS = 400


def write_all(out_dir: Path, results: dict[str, Any], predictions: list[dict[str, Any]], train_metrics: Path) -> None:
    """results.json, predictions.jsonl, report.md and report.html, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts.write_json_atomic(out_dir / "results.json", results)
    artifacts.write_text_atomic(
        out_dir / "predictions.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    )
    loss = read_loss_curve(train_metrics)
    blocks = build_blocks(results, predictions, loss)
    artifacts.write_text_atomic(out_dir / "report.md", render_markdown(blocks))
    artifacts.write_text_atomic(out_dir / "report.html", render_html(blocks, with_plots(blocks, results, loss)))


def read_loss_curve(path: Path) -> dict[str, list[tuple[float, float]]]:
    """Series name -> [(step, value)] from train/metrics.jsonl (keys loss/train_loss/eval_loss)."""
    series: dict[str, list[tuple[float, float]]] = {}
    if not path.exists():
        return series
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        step = record.get("step")
        if not isinstance(step, (int, float)):
            continue
        for key in ("loss", "train_loss", "eval_loss"):
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault("eval loss" if key == "eval_loss" else "train loss", []).append((step, float(value)))
    return series


def best_eval_point(series: dict[str, list[tuple[float, float]]]) -> tuple[float, float] | None:
    """(step, eval loss) of the lowest eval loss, the first when tied; None without evals."""
    points = series.get("eval loss") or []
    return min(points, key=lambda p: p[1]) if points else None


def plot_loss(ax, series: dict[str, list[tuple[float, float]]]) -> None:
    """Train and eval loss against the step, the best eval step marked: where early stopping
    would keep the model, and how far the last step is from it. (The one loss plot: train's
    loss.png and the report's draw it here.)"""
    for name, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name,
                marker="o" if name == "eval loss" else ("." if len(points) < 30 else None), linewidth=1)
    best = best_eval_point(series)
    if best is not None:
        ax.axvline(best[0], color="green", linestyle=":", linewidth=1)
        ax.plot([best[0]], [best[1]], marker="*", markersize=14, color="green", linestyle="none",
                label=f"best eval loss {best[1]:.4f} (step {int(best[0])})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (trained tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + " …"


def setup_blocks(results: dict[str, Any]) -> list[tuple]:
    """What was compared, on what, how."""
    primary = results["primary_metric"]
    decoding = results["decoding"]
    setup = [
        f"Task: **{results['task']}** ({results['task_source']}); primary metric: **{primary}**.",
        f"Held-out examples: {results['examples']} from `{results['sources']['eval']}`"
        + (f" ({results['skipped_without_answer']} without an answer skipped)" if results["skipped_without_answer"] else "")
        + ".",
        f"Decoding, identical for every subject: greedy, at most {decoding['max_new_tokens']} new tokens, "
        f"batches of {decoding['batch_size']}, same chat template (each subject's prompt is under Prompts); weights in {decoding['dtype']} "
        "unless a subject below says otherwise.",
    ]
    pt = results.get("prompt_truncation") or {}
    if pt.get("data_truncate"):
        setup.append(
            f"Prompt truncation as in training (data.truncate, max length {pt['max_length']}): "
            f"{plural(pt['truncated_examples'], 'prompt')} cut before their last turn header, {pt['cut_tokens']} tokens in all."
        )
    elif pt.get("over_max_length"):
        setup.append(
            f"{plural(pt['over_max_length'], 'example')} exceed{'s' if pt['over_max_length'] == 1 else ''} max length {pt['max_length']} with their answer; "
            "data.truncate is off, so their prompts are evaluated whole (training refused such examples)."
        )
    fs = results.get("few_shot") or {}
    if fs:
        setup.append(
            f"Few-shot prompt (base-fewshot): {fs['k']} training examples ({fs['tokens']} tokens): {fs['selection']}; "
            f"training lines in prompt order {', '.join(str(x) for x in fs['train_lines'][:30])}"
            + (" …" if len(fs["train_lines"]) > 30 else "") + "."
        )
    for name, entry in results["subjects"].items():
        if entry.get("kind") == "majority class":
            setup.append(f"`{name}`: no model; always the most frequent training label, `{entry['label']}` "
                         f"({entry['train_share']:.1%} of the training answers).")
        else:
            where = entry.get("path") or entry.get("model")
            where += f" at {entry['base_url']}" if entry.get("base_url") else ""
            setup.append(f"`{name}`: {entry.get('kind', 'base model')} {where}" + (f", computed in {entry['dtype']}" if entry.get("dtype") else "") + ".")
    for name, why in (results.get("skipped_subjects") or {}).items():
        setup.append(f"`{name}` not evaluated: {why}.")
    blocks = [("h2", "Setup"), ("list", setup)]
    if results["task"] == "json":
        blocks += [("p", f"JSON Schema ({results['schema_source']}):"), ("code", json.dumps(results["schema"], indent=2))]
    return blocks


def prompt_blocks(results: dict[str, Any]) -> list[tuple]:
    """Exactly what each subject saw: its system prompt(s), verbatim, and its shots."""
    blocks: list[tuple] = [("h2", "Prompts"), ("p", "Every subject sees the chat template, then the system prompt below, "
                                                    "then its shots as earlier user/assistant turns, then the example.")]
    for name, entry in results["subjects"].items():
        prompt = entry.get("prompt")
        if prompt is None:
            continue
        if prompt.get("note"):
            blocks.append(("p", f"`{name}`: {prompt['note']}."))
            continue
        systems = prompt["system_prompts"]
        shots = (f"{prompt['shots']} shots (training lines {', '.join(map(str, prompt['shot_train_lines']))})"
                 if prompt["shots"] else "0 shots")
        if prompt.get("constrained_to"):
            shots += f"; decoding held to {prompt['constrained_to']} (xgrammar)"
        if not any(systems):
            blocks.append(("p", f"`{name}`: no system prompt; {shots}."))
            continue
        many = f"{len(systems)} distinct system prompts (each example's own), the first shown" if len(systems) > 1 else "system prompt"
        blocks += [("p", f"`{name}`: {shots}; {many}:"), ("pre", systems[0] or "(none)")]
    return blocks


def build_blocks(results: dict[str, Any], predictions: list[dict[str, Any]], loss: dict) -> list[tuple]:
    """The report, top to bottom: verdict, setup, prompts, metrics, paired tests, gates, loss,
    per class, disagreements, how to read it."""
    blocks: list[tuple] = [("h1", "Evaluation report"), ("verdict", results["verdict"]["text"])]
    blocks += setup_blocks(results) + prompt_blocks(results) + metric_blocks(results) + usage_blocks(results) + comparison_blocks(results)
    if results["gates"]:
        rows = [[g["gate"], g["subject"], _fmt(g["value"], 4), "pass" if g["passed"] else "FAIL"] for g in results["gates"]]
        blocks += [("h2", "Gates"), ("table", ["gate", "subject", "value", "result"], rows)]
    if loss:
        blocks += [("h2", "Training loss"), ("plot", "loss")]
        best, evals = best_eval_point(loss), loss.get("eval loss") or []
        if best is not None:
            blocks.append(("p", f"Best eval loss {best[1]:.4f} at step {int(best[0])} (the star); the last, at step "
                                f"{int(evals[-1][0])}: {evals[-1][1]:.4f}."))
    if results["task"] == "classification":
        blocks += per_class_blocks(results)
    blocks += disagreement_blocks(results, predictions)
    blocks += [
        ("h2", "How to read this report"),
        ("list", [
            "The verdict compares the fine-tune with the best baseline on the primary metric. A difference is real "
            "when its 95% interval excludes 0 (and p < 0.05); overlapping subject intervals alone do not decide it, "
            "because the paired test uses the same examples for both sides.",
            "Every prediction of every subject is in predictions.jsonl; the numbers are in results.json.",
            "Latency is per example from its batch's start until its answer ended; tokens/s is generated tokens over "
            "generation wall time.",
        ]),
    ]
    return blocks


def metric_names(results: dict[str, Any]) -> list[str]:
    """Every metric any subject has, in first-seen order (majority has no tokens/s)."""
    return list(dict.fromkeys(m for e in results["subjects"].values() for m in e["metrics"]))


def focus_subject(results: dict[str, Any]) -> str:
    """The subject whose confusion matrix is shown: the fine-tune, else the last model baseline."""
    subjects = list(results["subjects"])
    if "tuned" in subjects:
        return "tuned"
    models = [s for s in subjects if results["subjects"][s].get("kind") != "majority class"]
    return (models or subjects)[-1]


def metric_blocks(results: dict[str, Any]) -> list[tuple]:
    """Every metric of every subject, with its interval; "-" where a subject has no such metric."""
    subjects, primary = list(results["subjects"]), results["primary_metric"]
    rows = []
    for metric in metric_names(results):
        row = [metric + (" (primary)" if metric == primary else "")]
        for s in subjects:
            m = results["subjects"][s]["metrics"].get(metric)
            row.append(f"{_fmt(m['value'])} [{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}]" if m else "-")
        rows.append(row)
    return [
        ("h2", "Metrics"),
        ("p", f"Value [95% bootstrap interval, {results['bootstrap_samples']} resamples, seed {results['seed']}]."),
        ("table", ["metric", *subjects], rows),
        ("plot", "metrics"),
    ]


def usd(amount: float) -> str:
    """Dollars with the digits that matter: an eval's hosted cost is often a fraction of a cent."""
    return f"${amount:,.2f}" if amount >= 1 else f"${amount:.3g}"


def usage_blocks(results: dict[str, Any]) -> list[tuple]:
    """Tokens and money per subject, when any subject answered through an API: hosted subjects
    are billed per token, local ones cost this machine's compute (their time is under Metrics)."""
    entries = results["subjects"]
    if not any(e.get("usage") for e in entries.values()):
        return []
    rows = []
    for name, e in entries.items():
        u = e.get("usage")
        if not u:
            where = "no model" if e.get("kind") == "majority class" else "this machine"
            rows.append([name, where, "-", "-", "-", "-", "local compute"])
            continue
        cost = e.get("cost_usd")
        rows.append([name, f"{e['model']} at {e['base_url']}", f"{u['requests_sent']} sent, {u['cached']} cached, {u['retries']} retried",
                     f"{u['prompt_tokens']:,}", f"{u['completion_tokens']:,}", f"{u['prompt_tokens'] + u['completion_tokens']:,}",
                     usd(cost) if cost is not None else "no price known"])
    return [
        ("h2", "Tokens and cost"),
        ("p", "Hosted subjects: tokens as the endpoint counted them, priced at eval.endpoints' or prices.json's dated "
              "per-token prices (cached answers count at their price, though this run did not pay for them again)."),
        ("table", ["subject", "where", "requests", "prompt tokens", "completion tokens", "total tokens", "cost"], rows),
    ]


def comparison_blocks(results: dict[str, Any]) -> list[tuple]:
    """Paired tests of the fine-tune against each other subject."""
    if not results["comparisons"]:
        return []
    header = ["metric"] + [k.replace("tuned_vs_", "tuned − ") for k in results["comparisons"]]
    rows = []
    for metric in metric_names(results):
        if metric in M.NEUTRAL:
            continue
        row = [metric]
        for comparison in results["comparisons"].values():
            c = comparison.get(metric)
            if c is None:
                row.append("-")
                continue
            star = " *" if c["p_value"] < 0.05 else ""
            row.append(f"{c['delta']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] p={c['p_value']:.3g}{star}")
        rows.append(row)
    return [
        ("h2", "Fine-tune against each subject"),
        ("p", "Difference tuned − other on the same examples [95% interval]; p from McNemar's exact test for "
              "accuracy and exact match, from a paired bootstrap otherwise; * marks p < 0.05."),
        ("table", header, rows),
    ]


def per_class_blocks(results: dict[str, Any]) -> list[tuple]:
    """Precision / recall / F1 per label for every subject, and one subject's confusion matrix."""
    subjects, labels = list(results["subjects"]), results["labels"]
    rows = []
    for label in labels:
        row = [label, str(next(iter(results["subjects"].values()))["per_class"][label]["support"])]
        for s in subjects:
            pc = results["subjects"][s]["per_class"][label]
            row.append(f"{pc['precision']:.2f} / {pc['recall']:.2f} / {pc['f1']:.2f}")
        rows.append(row)
    blocks: list[tuple] = [
        ("h2", "Per class"),
        ("p", "Precision / recall / F1 per label; support is the number of held-out examples of the label."),
        ("table", ["label", "support", *subjects], rows),
        ("plot", "per_class"),
    ]
    focus = focus_subject(results)
    matrix = results["subjects"][focus]["confusion"]
    blocks.append(("h2", f"Confusion matrix ({focus})"))
    if len(labels) <= MAX_CONFUSION_LABELS:
        rows = [[labels[i], *map(str, r)] for i, r in enumerate(matrix)]
        return blocks + [("p", "Rows: reference label; columns: answer (`other`: outside the label set)."),
                         ("table", ["reference \\ answer", *labels, "other"], rows), ("plot", "confusion")]
    pairs = [(matrix[i][j], labels[i], (labels + ["other"])[j]) for i in range(len(labels))
             for j in range(len(labels) + 1) if i != j and matrix[i][j]]
    pairs.sort(key=lambda x: (-x[0], x[1], x[2]))
    return blocks + [("p", f"{len(labels)} labels: the 20 most frequent confusions."),
                     ("table", ["reference", "answer", "count"], [[a, b, str(n)] for n, a, b in pairs[:20]])]


def disagreement_blocks(results: dict[str, Any], predictions: list[dict[str, Any]]) -> list[tuple]:
    """Side by side, the examples where the subjects disagree (the first MAX_DISAGREEMENTS)."""
    subjects = list(results["subjects"])
    key = "correct" if results["task"] == "classification" else "exact"
    disagree = []
    for p in predictions:
        outcomes = {s: p["outputs"][s].get(key) for s in subjects}
        texts = {p["outputs"][s]["text"] for s in subjects}
        if len(set(outcomes.values())) > 1 or (results["task"] == "text" and len(texts) > 1):
            disagree.append(p)
    blocks = [("h2", f"Where the subjects disagree ({len(disagree)} of {len(predictions)} examples, first {min(len(disagree), MAX_DISAGREEMENTS)} shown)")]
    for p in disagree[:MAX_DISAGREEMENTS]:
        rows = [["reference", _short(p["target"]), ""]]
        for s in subjects:
            o = p["outputs"][s]
            mark = "✓" if o.get(key) == 1.0 else "✗" if o.get(key) == 0.0 else ""
            rows.append([s, _short(o["text"]) or "(empty)", mark])
        blocks += [("p", f"Example {p['index']} (line {p['source_line']}): {_short(p['input'])}"), ("table", ["", "answer", key], rows)]
    return blocks


# --------------------------------------------------------------------------- plots


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def with_plots(blocks: list[tuple], results: dict[str, Any], loss: dict) -> dict[str, str]:
    """Plot name -> base64 PNG, for the plots the blocks ask for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wanted = {b[1] for b in blocks if b[0] == "plot"}
    subjects = list(results["subjects"])
    plots = {}
    if "metrics" in wanted:
        graded = [m for m in next(iter(results["subjects"].values()))["metrics"]
                  if m not in M.NEUTRAL and m not in ("mean_latency_s", "tokens_per_s")]
        fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(graded) * max(1, len(subjects)) / 2), 3.2))
        width = 0.8 / len(subjects)
        for k, s in enumerate(subjects):
            ms = results["subjects"][s]["metrics"]
            none = {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}
            values = [ms.get(m, none)["value"] for m in graded]
            errors = [[v - ms.get(m, none)["ci_low"] for v, m in zip(values, graded)],
                      [ms.get(m, none)["ci_high"] - v for v, m in zip(values, graded)]]
            ax.bar([i + k * width for i in range(len(graded))], values, width, yerr=errors, capsize=3, label=s)
        ax.set_xticks([i + width * (len(subjects) - 1) / 2 for i in range(len(graded))], graded, rotation=20, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title("Metrics with 95% bootstrap intervals")
        ax.legend(fontsize=8)
        plots["metrics"] = _png(fig)
    if "loss" in wanted and loss:
        fig, ax = plt.subplots(figsize=(6, 3))
        plot_loss(ax, loss)
        ax.set_title("Training loss")
        plots["loss"] = _png(fig)
    if "per_class" in wanted:
        labels = results["labels"]
        fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(labels) * len(subjects) / 2), 3.2))
        width = 0.8 / len(subjects)
        for k, s in enumerate(subjects):
            ax.bar([i + k * width for i in range(len(labels))], [results["subjects"][s]["per_class"][lab]["f1"] for lab in labels], width, label=s)
        ax.set_xticks([i + width * (len(subjects) - 1) / 2 for i in range(len(labels))], labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title("F1 per class")
        ax.legend(fontsize=8)
        plots["per_class"] = _png(fig)
    if "confusion" in wanted:
        focus = focus_subject(results)
        matrix = results["subjects"][focus]["confusion"]
        labels = results["labels"]
        fig, ax = plt.subplots(figsize=(1.5 + 0.5 * len(labels), 1.2 + 0.45 * len(labels)))
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(labels) + 1), labels + ["other"], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        peak = max(max(r) for r in matrix) or 1
        for i, r in enumerate(matrix):
            for j, v in enumerate(r):
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > peak / 2 else "black")
        ax.set_xlabel("answer")
        ax.set_ylabel("reference")
        ax.set_title(f"Confusion matrix ({focus})")
        plots["confusion"] = _png(fig)
    return plots


# --------------------------------------------------------------------------- renderers


def render_markdown(blocks: list[tuple]) -> str:
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            lines += [f"# {block[1]}", ""]
        elif kind == "h2":
            lines += [f"## {block[1]}", ""]
        elif kind == "verdict":
            lines += [f"**Verdict.** {block[1]}", ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "list":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "code":
            lines += ["```json", block[1], "```", ""]
        elif kind == "pre":
            lines += ["```text", block[1], "```", ""]
        elif kind == "table":
            cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines += ["| " + " | ".join(map(cell, block[1])) + " |", "|" + "---|" * len(block[1])]
            lines += ["| " + " | ".join(map(cell, row)) + " |" for row in block[2]] + [""]
        elif kind == "plot":
            lines += [f"(plot: {block[1]}, see report.html)", ""]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
.verdict{background:#eef6ee;border-left:4px solid #3a3;padding:.8em 1em;font-size:1.05em}
pre{background:#f6f6f6;padding:.8em;overflow:auto}
img{max-width:100%}
code{background:#f3f3f3;padding:0 .2em}
"""


def _inline(text: str) -> str:
    """Escape, then the two Markdown marks the blocks use: **bold** and `code`."""
    out, bold, code = [], False, False
    parts = html.escape(text).replace("**", "\x00").split("`")
    for k, part in enumerate(parts):
        if k:
            code = not code
            out.append("<code>" if code else "</code>")
        pieces = part.split("\x00")
        for j, piece in enumerate(pieces):
            if j:
                bold = not bold
                out.append("<b>" if bold else "</b>")
            out.append(piece)
    return "".join(out)


def render_html(blocks: list[tuple], plots: dict[str, str]) -> str:
    body: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            body.append(f"<h1>{_inline(block[1])}</h1>")
        elif kind == "h2":
            body.append(f"<h2>{_inline(block[1])}</h2>")
        elif kind == "verdict":
            body.append(f'<p class="verdict"><b>Verdict.</b> {_inline(block[1])}</p>')
        elif kind == "p":
            body.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block[1]) + "</ul>")
        elif kind in ("code", "pre"):
            body.append(f"<pre>{html.escape(block[1])}</pre>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(str(h))}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "plot" and block[1] in plots:
            body.append(f'<img alt="{block[1]}" src="data:image/png;base64,{plots[block[1]]}">')
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>tunesmith evaluation report</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_junit(path: Path, results: dict[str, Any]) -> None:
    """JUnit XML: one test case per gate, so CI shows which threshold failed and by how much."""
    gates = results["gates"]
    suite = ET.Element(
        "testsuite", name="tunesmith.eval", tests=str(len(gates)), failures=str(sum(not g["passed"] for g in gates)), errors="0"
    )
    properties = ET.SubElement(suite, "properties")
    ET.SubElement(properties, "property", name="verdict", value=results["verdict"]["text"])
    for subject, entry in results["subjects"].items():
        for metric, m in entry["metrics"].items():
            ET.SubElement(properties, "property", name=f"{subject}.{metric}", value=f"{m['value']:.6g}")
    for g in gates:
        case = ET.SubElement(suite, "testcase", classname="tunesmith.eval.gates", name=g["gate"])
        if not g["passed"]:
            failure = ET.SubElement(case, "failure", message=f"{g['subject']}.{g['metric']} = {g['value']:.6g}")
            failure.text = json.dumps(g, default=str)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    artifacts.write_text_atomic(Path(path), '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n")
