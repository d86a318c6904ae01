"""`tunesmith eval`: the fine-tune against the base model with good prompts, and against truth.

Subjects, all with the same chat template, the same held-out examples and the same greedy
decoding:
  base           the base model, system prompt only (zero-shot);
  base-prompted  the base model, system prompt + the label set or JSON Schema and "answer with
                 exactly that" (classification and JSON tasks);
  base-constrained  base-prompted's prompt, decoding held to the labels or the schema (xgrammar);
  base-fewshot   the base model, system prompt + k training examples as prior turns;
  majority       no model: the most frequent training label, always (classification);
  tuned          the fine-tune: runs.load_run_model (drift guard; an adapter unmerged and computed
                 in fp32, so small updates are not rounded away; a full model in the eval dtype);
  against        optionally another run (`--against RUN_DIR`), e.g. the one in production;
  openai:MODEL   models behind OpenAI-compatible APIs (eval.endpoints), sent the messages of base,
                 base-fewshot, base-prompted (endpoints.py); a run trained through a provider has
                 its hosted fine-tune answer as `tuned`.

Stop ids, dtype, prompt rendering and batched greedy decoding are inference.py's (with
eval.engine: vllm, vLLM's offline engine answers the same prompt ids: vllm_engine.py); scores and
statistics metrics.py's; the report files report.py's. This module reads top to bottom as the stage.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith import artifacts, endpoints, runs, tracking, vllm_engine
from tunesmith import metrics as M
from tunesmith.config import RunConfig
from tunesmith.errors import GateFailed, UserError
from tunesmith.formatting import cut_before_tail, truncate_prompt
from tunesmith.inference import Generation, cache_arg, generate_greedy, inference_dtype, pad_token_id, render_ids, stop_token_ids
from tunesmith.progress import Progress
from tunesmith.schema import Conversation

ALPHA = 0.05  # significance level of every paired test
BASELINES = ("base", "base-prompted", "base-constrained", "base-fewshot")  # the subjects the base model answers


# --------------------------------------------------------------------------- data


def read_splits(cfg: RunConfig) -> tuple[list[Conversation], list[Conversation], dict[str, str]]:
    """(eval, train, sources): the run's own split when training wrote one, else the config's files."""
    files = runs.data_files(cfg)
    if files.eval is None or not files.eval.exists():
        raise UserError(
            f"no held-out split: {cfg.run_dir / artifacts.EVAL_SPLIT_FILE} does not exist and data.eval is not set",
            "set data.eval to a held-out file, or let the pipeline write the split: tunesmith run CONFIG --until split",
        )
    if files.train is None or not files.train.exists():
        raise UserError(f"training split {files.train} not found", "run `tunesmith train` first, or fix data.train")
    sources = {"eval": str(files.eval), "eval_sha256": artifacts.sha256_file(files.eval), "train": str(files.train)}
    return files.read(files.eval), files.read(files.train), sources


# --------------------------------------------------------------------------- prompts


def _turns(messages) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.to_openai().items() if k != "weight"} for m in messages if m.role != "system"]


def system_prompt_of(conv: Conversation, default: str | None) -> str | None:
    """The example's own system message, else the config's system prompt (as training does)."""
    return next((m.content for m in conv.prompt_messages if m.role == "system"), default)


def prompt_messages(conv: Conversation, system: str | None, shots: list[Conversation] = ()) -> list[dict[str, Any]]:
    """System prompt, then each shot as a user turn and its answer, then the example's prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    for shot in shots:
        messages += shot_turns(shot)
    return messages + _turns(conv.prompt_messages)


def shot_turns(shot: Conversation) -> list[dict[str, Any]]:
    """A training example as prior turns: its prompt (without system) and its answer."""
    return _turns(shot.prompt_messages) + [{"role": "assistant", "content": shot.target}]


def shot_order(train: list[Conversation], task: str, exclude_inputs: set[str], seed: int) -> list[int]:
    """Training examples in the order shots are taken: seeded shuffle; for classification a
    round-robin over labels (sorted), so k shots cover as many labels as k allows."""
    rng = random.Random(seed)
    candidates = [i for i, c in enumerate(train) if c.target and c.input_text not in exclude_inputs]
    if task != "classification":
        rng.shuffle(candidates)
        return candidates
    groups: dict[str, list[int]] = {}
    for i in candidates:
        groups.setdefault(M.normalize_label(train[i].target), []).append(i)
    queues = []
    for label in sorted(groups):
        rng.shuffle(groups[label])
        queues.append(groups[label])
    order = []
    for depth in range(max((len(q) for q in queues), default=0)):
        order.extend(q[depth] for q in queues if depth < len(q))
    return order


def choose_shots(
    tokenizer,
    train: list[Conversation],
    order: list[int],
    *,
    system: str | None,
    k: int | None,
    budget_tokens: int,
) -> tuple[list[int], int]:
    """(chosen train indices, their tokens): the first k of `order`, or, when k is None, as
    many as fit `budget_tokens`. A shot's cost is what it adds to the rendered prompt."""
    head = [{"role": "system", "content": system or ""}]
    base_len = len(render_ids(tokenizer, head, generation_prompt=False))
    chosen, used = [], 0
    for i in order:
        if k is not None and len(chosen) >= k:
            break
        cost = len(render_ids(tokenizer, head + shot_turns(train[i]), generation_prompt=False)) - base_len
        if used + cost > budget_tokens:
            break
        chosen.append(i)
        used += cost
    return chosen, used


def truncate_prompts(tokenizer, prompts: list[list[int]], golds: list[str], data_cfg) -> tuple[list[list[int]], list[int], dict[str, Any]]:
    """(prompts, tokens cut from each, summary): with data.truncate on, each prompt cut as
    training cut its example (formatting.truncate_prompt, the example's answer length known),
    so the fine-tune is asked what it was trained on; off, prompts stay whole and are counted."""
    answer_tokens = [len(tokenizer(g, add_special_tokens=False)["input_ids"]) + 1 for g in golds]  # + end of turn
    over = sum(1 for p, a in zip(prompts, answer_tokens) if len(p) + a > data_cfg.max_length)
    summary: dict[str, Any] = {"data_truncate": data_cfg.truncate, "max_length": data_cfg.max_length, "over_max_length": over}
    if not data_cfg.truncate:
        return prompts, [0] * len(prompts), {**summary, "truncated_examples": 0, "cut_tokens": 0}
    cut_pairs = [truncate_prompt(p, a, data_cfg.max_length) for p, a in zip(prompts, answer_tokens)]
    cuts = [c for _, c in cut_pairs]
    summary.update(truncated_examples=sum(1 for c in cuts if c), cut_tokens=sum(cuts))
    return [p for p, _ in cut_pairs], cuts, summary


# --------------------------------------------------------------------------- models


# A run without a trained model can still have its baselines evaluated.
NO_TRAINED_MODEL_HINT = "run `tunesmith train` first, or evaluate the baselines only: --subjects base,base-fewshot"


def load_tuned(run_dir: Path, dtype, device, allow_base_mismatch: bool) -> runs.RunModel:
    """A run's fine-tune through runs.load_run_model (drift guard; LoRA unmerged, fp32 over the base)."""
    return runs.load_run_model(run_dir, allow_base_mismatch=allow_base_mismatch, dtype=dtype, device=device, missing_hint=NO_TRAINED_MODEL_HINT)


# --------------------------------------------------------------------------- the stage


@dataclass


class EvalData:
    """The held-out examples with an answer, the training split, and the task they define."""

    examples: list[Conversation]
    train: list[Conversation]  # training examples with an answer
    golds: list[str]
    skipped: int  # held-out examples without an answer
    sources: dict[str, str]
    task: str
    labels: list[str] | None  # classification: training and held-out labels
    schema: dict[str, Any] | None  # json: eval.json_schema or inferred from the training answers
    task_info: dict[str, Any]  # what results.json says about the task


@dataclass


class Decoding:
    """What every generating subject shares: tokenizer, end-of-turn ids, padding, dtype, device."""

    tokenizer: Any
    stop_ids: set[int]
    pad_id: int
    dtype: Any
    device: str | None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def run(
    cfg: RunConfig,
    *,
    against: Path | None = None,
    gates: list[str] = (),
    junit: Path | None = None,
    subjects: list[str] | None = None,
    allow_base_mismatch: bool = False,
) -> dict:
    """Evaluate every subject on the held-out split; write the report; enforce the gates.

    `subjects` overrides eval.subjects (the pipeline's baseline stage runs the baselines alone).
    `allow_base_mismatch` lets the drift guard warn instead of refusing a run whose base changed.
    Returns results.json's content. Raises GateFailed (exit 3) after writing everything when a
    gate fails or the fine-tune is significantly worse than `against` on the primary metric.
    """
    import torch

    from tunesmith import report
    from tunesmith.models import load_model, load_model_description

    ec = cfg.eval
    run_dir = cfg.run_dir
    out_dir = run_dir / artifacts.EVAL_DIR
    gates = list(dict.fromkeys([*ec.gates, *gates]))
    for gate in gates:  # a typo in a gate is reported before minutes of generation, not after
        M.parse_gate(gate)
    subjects = list(dict.fromkeys(subjects or ec.subjects)) + (["against"] if against is not None else [])
    if against is not None and not (Path(against) / artifacts.MANIFEST_FILE).exists():
        raise UserError(f"--against {against}: no {artifacts.MANIFEST_FILE} there", "pass the folder of another tunesmith run")
    if ec.engine == "vllm":  # before the data is read and any model loads
        vllm_engine.require_vllm("eval.engine: vllm", "set eval.engine: torch")

    # 1. Data: held-out examples with a reference answer; the training answers define the task,
    #    and the task which baselines apply.
    data = read_eval_data(cfg)
    subjects, skipped_subjects = applicable_subjects(subjects, data)
    # Models behind APIs (endpoints.py): eval.endpoints, and the hosted fine-tune as `tuned` when
    # the run trained through a provider; listed now, so a missing fine-tune fails before minutes of generation.
    remote = endpoints.endpoint_subjects(cfg, data.task, *endpoints.hosted_finetune(cfg, subjects))
    local_subjects = [s for s in subjects if s not in {r.name for r in remote}]

    # 2. The base model first: the baselines share it, and the fine-tune is loaded after.
    dtype = inference_dtype(ec.precision)
    device = "cuda" if torch.cuda.is_available() else None
    m = cfg.model
    # The baselines render with the template the fine-tune was trained with (tokenizer_options).
    # vLLM loads the weights itself: here only the tokenizer and configs, for prompts and stop ids.
    load = load_model_description if ec.engine == "vllm" else partial(load_model, dtype=dtype, device=device)
    base = load(runs.base_model_ref(cfg), expected_fingerprint=m.expected_fingerprint, **runs.tokenizer_options(cfg, run_dir))
    stop_ids = stop_token_ids(base.model, base.tokenizer)
    pad_id = pad_token_id(base.tokenizer, stop_ids)
    decoding = Decoding(base.tokenizer, stop_ids, pad_id, dtype, device)

    # 3. Prompts, 4. answers: the baselines from the base model, then each fine-tune in turn.
    context_tokens = int(getattr(base.model.config, "max_position_embeddings", 0) or 2048)
    wanted = list(dict.fromkeys(subjects + [r.prompts_of for r in remote]))
    prompts, prompt_info, few_shot_info, truncation, messages = build_prompts(cfg, data, wanted, base.tokenizer, context_tokens)
    if ec.engine == "vllm":
        generations, subject_info, warnings = generate_with_vllm(cfg, data, local_subjects, prompts, base, decoding, against,
                                                                 allow_base_mismatch, out_dir)
    else:
        generations, subject_info = generate_baselines(cfg, data, local_subjects, prompts, base, decoding, out_dir)
        del base
        warnings = generate_finetunes(cfg, data, local_subjects, prompts, decoding, against, generations, subject_info, allow_base_mismatch)
    if "majority" in subjects:
        generations["majority"], subject_info["majority"], prompt_info["majority"] = majority_answers(data)
    for r in remote:
        generations[r.name], subject_info[r.name] = endpoints.generate_endpoint(r, messages[r.prompts_of], cfg.eval)
        prompt_info[r.name] = prompt_info[r.prompts_of]
    subjects = list(dict.fromkeys(subjects + [r.name for r in remote]))

    # 5. Scores, intervals, paired tests, verdict; 6. gates.
    primary = M.PRIMARY_METRIC[data.task]
    for name in subjects:
        subject_info[name]["prompt"] = prompt_info[name]
    results_subjects, columns = score_subjects(cfg, data, subjects, generations, subject_info)
    comparisons = compare_subjects(cfg, data.task, subjects, columns)
    verdict = make_verdict(results_subjects, comparisons, primary)
    gate_results = evaluate_gates(gates, results_subjects, comparisons, primary, subjects, against is not None)

    # 7. Write every artifact, then the manifest, then (only then) fail the gate.
    results = {
        **setup_record(cfg, data, decoding, few_shot_info),
        "prompt_truncation": truncation,
        "warnings": warnings,
        "skipped_subjects": skipped_subjects,
        "subjects": results_subjects,
        "comparisons": comparisons,
        "verdict": verdict,
        "gates": gate_results,
        "passed": all(g["passed"] for g in gate_results),
    }
    report.write_all(out_dir, results, prediction_rows(data, subjects, generations, columns), run_dir / artifacts.METRICS_FILE)
    if junit is not None:
        report.write_junit(Path(junit), results)
    write_manifest_section(run_dir, results)
    tracking.log_evaluation(cfg, results, out_dir)
    failed = [g for g in gate_results if not g["passed"]]
    if failed:
        raise GateFailed("; ".join(_gate_line(g) for g in failed))
    return results


def setup_record(cfg: RunConfig, data: EvalData, decoding: Decoding, few_shot_info: dict[str, Any]) -> dict[str, Any]:
    """results.json's account of what was evaluated, and how: task, data, decoding, statistics."""
    ec = cfg.eval
    return {
        "task": data.task,
        "task_source": "eval.task" if ec.task != "auto" else "inferred from the training answers",
        "primary_metric": M.PRIMARY_METRIC[data.task],
        "examples": len(data.examples),
        "skipped_without_answer": data.skipped,
        "sources": data.sources,
        "decoding": {"strategy": "greedy", "engine": ec.engine, "max_new_tokens": ec.max_new_tokens, "batch_size": ec.batch_size,
                     "dtype": str(decoding.dtype).replace("torch.", ""), "stop_token_ids": sorted(decoding.stop_ids)},
        "confidence": 0.95,
        "bootstrap_samples": ec.bootstrap_samples,
        "seed": ec.seed,
        **data.task_info,
        "few_shot": few_shot_info,
    }


def applicable_subjects(subjects: list[str], data: EvalData) -> tuple[list[str], dict[str, str]]:
    """(the subjects to evaluate, why each other one is skipped): `majority` needs a label set
    and training answers; `base-prompted` and `base-constrained` need a label set or a schema,
    else they are `base` again. Decided before any generation, not after minutes of it."""
    skipped = {}
    if data.task != "classification" and "majority" in subjects:
        skipped["majority"] = f"a majority class needs a label set; the task is {data.task}"
    elif not data.train and "majority" in subjects:
        skipped["majority"] = "the training split has no answers to count"
    for name in ("base-prompted", "base-constrained"):
        if data.task == "text" and name in subjects:
            skipped[name] = "free text has no label set or schema to state or to hold the answer to"
    kept = [s for s in subjects if s not in skipped]
    if not kept:
        raise UserError(f"no subject left to evaluate ({'; '.join(skipped.values())})", "add base, base-fewshot or tuned to eval.subjects")
    return kept, skipped


def read_eval_data(cfg: RunConfig) -> EvalData:
    """The held-out examples that have an answer (the first eval.max_examples), the training
    examples that have one, and the task: eval.task, else inferred from the training answers."""
    ec = cfg.eval
    eval_all, train, sources = read_splits(cfg)
    examples = [c for c in eval_all if c.target is not None]
    skipped = len(eval_all) - len(examples)
    if ec.max_examples:
        examples = examples[: ec.max_examples]
    if not examples:
        raise UserError(f"{sources['eval']} holds no example with an assistant answer", "give each example an assistant turn")
    train = [c for c in train if c.target is not None]
    train_targets = [c.target for c in train]
    golds = [c.target.strip() for c in examples]
    task = M.infer_task(train_targets or golds) if ec.task == "auto" else ec.task
    labels, schema, task_info = None, None, {}
    if task == "classification":
        labels = M.label_set(train_targets + golds)
        unseen = sorted(set(M.label_set(golds)) - set(M.label_set(train_targets)), key=str)
        task_info = {"labels": labels, "labels_only_in_eval": unseen}
    elif task == "json":
        schema_path = cfg.resolve(ec.json_schema)
        if schema_path is not None:
            if not schema_path.exists():
                raise UserError(f"eval.json_schema {schema_path} not found", "give the path of a JSON Schema file")
            schema, schema_source = json.loads(schema_path.read_text(encoding="utf-8")), str(schema_path)
        else:
            parsed = [v for ok, v in map(M.parse_json, train_targets) if ok]
            schema, schema_source = M.infer_json_schema(parsed), "inferred from the training answers"
        task_info = {"schema": schema, "schema_source": schema_source}
    return EvalData(examples, train, golds, skipped, sources, task, labels, schema, task_info)


def build_prompts(
    cfg: RunConfig, data: EvalData, subjects: list[str], tokenizer, context_tokens: int
) -> tuple[dict[str, list[list[int]]], dict[str, dict[str, Any]], dict[str, Any], dict[str, Any], dict[str, list]]:
    """(prompt ids per subject, what prompt each subject saw, the few-shot choice, the prompt
    truncation, the chat messages of base/base-prompted/base-fewshot for endpoint subjects: whole,
    as a remote tokenizer cannot be cut like ours).

    Zero-shot prompts are what training saw (cut as training cut them, with data.truncate; every
    other subject's prompt loses the same tokens before its tail); base-prompted adds the answer format to the
    system prompt; few-shot adds the same k training examples before every held-out one (never
    a held-out example, never one whose input is also a held-out input).
    """
    ec = cfg.eval
    systems = [system_prompt_of(c, cfg.data.system_prompt) for c in data.examples]
    zero_shot = [render_ids(tokenizer, prompt_messages(c, s)) for c, s in zip(data.examples, systems)]
    zero_shot, cuts, truncation = truncate_prompts(tokenizer, zero_shot, data.golds, cfg.data)

    def cut_like_zero_shot(rendered: list[list[int]]) -> list[list[int]]:
        return [cut_before_tail(p, cut) if cut else p for p, cut in zip(rendered, cuts)]

    prompts = {"base": zero_shot, "tuned": zero_shot, "against": zero_shot}
    info = {name: prompt_record(systems) for name in ("base", "tuned", "against")}
    few_shot_info: dict[str, Any] = {}
    messages = {"base": [prompt_messages(c, s) for c, s in zip(data.examples, systems)]}  # what an endpoint is sent
    if "base-prompted" in subjects or "base-constrained" in subjects:
        instruction = answer_format_instruction(data)
        engineered = [f"{s}\n\n{instruction}" if s else instruction for s in systems]
        messages["base-prompted"] = [prompt_messages(c, s) for c, s in zip(data.examples, engineered)]
        prompts["base-prompted"] = prompts["base-constrained"] = cut_like_zero_shot(
            [render_ids(tokenizer, m) for m in messages["base-prompted"]]
        )
        info["base-prompted"] = prompt_record(engineered)
        info["base-constrained"] = {**prompt_record(engineered), "constrained_to": "the label set" if data.task == "classification" else "the JSON Schema"}
    if "base-fewshot" in subjects:
        room = context_tokens - max(map(len, zero_shot)) - ec.max_new_tokens
        budget = max(0, min(room, ec.few_shot_max_tokens if ec.few_shot_k is None else room))
        common_system = systems[0] if len(set(systems)) == 1 else cfg.data.system_prompt
        chosen, few_shot_info = select_shots(tokenizer, data, common_system, ec, budget)
        shots = [data.train[i] for i in chosen]
        messages["base-fewshot"] = [prompt_messages(c, s, shots) for c, s in zip(data.examples, systems)]
        prompts["base-fewshot"] = cut_like_zero_shot([render_ids(tokenizer, m) for m in messages["base-fewshot"]])
        info["base-fewshot"] = prompt_record(systems, few_shot_info["train_lines"])
    return prompts, info, few_shot_info, truncation, messages


def prompt_record(systems: list[str | None], shot_lines: list[int] = ()) -> dict[str, Any]:
    """What results.json says a subject saw: each distinct system prompt (in order of first
    use; usually one), and the training lines of its shots, in prompt order."""
    return {"system_prompts": list(dict.fromkeys(systems)), "shots": len(shot_lines), "shot_train_lines": list(shot_lines)}


def answer_format_instruction(data: EvalData) -> str:
    """The prompt engineering of `base-prompted`: the labels (of the training split: the
    held-out one must not leak into a prompt) or the JSON Schema, and to answer with nothing else."""
    if data.task == "classification":
        labels = M.label_set([c.target for c in data.train]) or data.labels
        return "Answer with exactly one of these labels, and nothing else:\n" + "\n".join(labels)
    return ("Answer with only a JSON value that matches this JSON Schema, and nothing else:\n"
            + json.dumps(data.schema, ensure_ascii=False))


def majority_answers(data: EvalData) -> tuple[list[Generation], dict[str, Any], dict[str, Any]]:
    """(answers, what the subject is, its prompt) of `majority`: no model, the most frequent
    training label for every example (ties: the first in label order). The floor a classifier
    must clear: on an 87% ham test set it scores 0.87 accuracy by saying "ham"."""
    counts = Counter(M.normalize_label(c.target) for c in data.train)
    spelling = {M.normalize_label(lab): lab for lab in data.labels}
    top = max(sorted(counts), key=lambda k: counts[k])
    label, share = spelling[top], counts[top] / sum(counts.values())
    answers = [Generation(label, [], 0.0, 0.0, True, 0) for _ in data.examples]
    info = {"kind": "majority class", "label": label, "train_share": share}
    prompt = {"system_prompts": [], "shots": 0, "shot_train_lines": [],
              "note": f"no model and no prompt: always answers {label!r}, {share:.1%} of the training answers"}
    return answers, info, prompt


def select_shots(tokenizer, data: EvalData, system: str | None, ec, budget_tokens: int) -> tuple[list[int], dict[str, Any]]:
    """(train indices of the few-shot examples, in prompt order; what results.json says of them)."""
    order = shot_order(data.train, data.task, {c.input_text for c in data.examples}, ec.seed)
    chosen, shot_tokens = choose_shots(tokenizer, data.train, order, system=system, k=ec.few_shot_k, budget_tokens=budget_tokens)
    # The order above cycles through the labels; as prompt order it would teach the pattern
    # (ham, spam, ham, ...) and end on whichever label comes last. Shuffled, still seeded.
    random.Random(f"shots-{ec.seed}").shuffle(chosen)
    classification = data.task == "classification"
    info = {
        "k": len(chosen),
        "k_requested": ec.few_shot_k,
        "tokens": shot_tokens,
        "budget_tokens": budget_tokens,
        "selection": ("round-robin over labels (sorted), each label's examples in seeded shuffle order"
                      if classification else "seeded shuffle of the training split")
                     + f", seed {ec.seed}, " + (f"first {ec.few_shot_k}" if ec.few_shot_k is not None
                                                else f"as many as fit {budget_tokens} tokens")
                     + ", then put in seeded shuffle order",
        "train_lines": [data.train[i].source_line for i in chosen],
        "labels": [data.train[i].target.strip() for i in chosen] if classification else None,
    }
    return chosen, info


def generate_baselines(
    cfg: RunConfig, data: EvalData, subjects: list[str], prompts, base, decoding: Decoding, out_dir: Path
) -> tuple[dict[str, list[Generation]], dict[str, dict[str, Any]]]:
    """(answers, what each subject is) of the baselines the base model answers.

    A baseline's answers are a function of the model, the prompts and the decoding: when the
    previous report has them for the same key (the pipeline's baseline stage, an eval rerun
    after retraining), they are reused instead of regenerated.
    """
    generations: dict[str, list[Generation]] = {}
    subject_info: dict[str, dict[str, Any]] = {}
    for name in BASELINES:
        if name not in subjects:
            continue
        grammar = answer_grammar(data) if name == "base-constrained" else None
        subject_info[name], previous = baseline_entry(cfg, data, name, prompts, base, decoding, out_dir, grammar)
        if previous is not None:
            generations[name] = previous
        elif grammar is not None:
            with generation_progress(cfg, name, len(prompts[name])) as progress:
                generations[name] = generate_constrained(base.model, prompts[name], grammar, data.task, cfg.eval.max_new_tokens, decoding,
                                                         on_example=progress.advance)
        else:
            generations[name] = generate_subject(cfg, name, base.model, prompts[name], decoding)
    return generations, subject_info


def baseline_entry(cfg: RunConfig, data: EvalData, name: str, prompts, base, decoding: Decoding, out_dir: Path,
                   grammar: str | None = None, engine: str = "torch") -> tuple[dict[str, Any], list[Generation] | None]:
    """(what the baseline `name` is, its answers from the previous report when they can be reused).

    The generation key is what makes answers reusable: the model, the prompts, the decoding
    settings, and a constrained baseline's grammar (the same prompts, other decoding).
    """
    key = generation_key(base.fingerprint, prompts[name], cfg.eval, decoding.dtype, decoding.stop_ids)
    if grammar is not None:
        key = hashlib.sha256((key + grammar).encode()).hexdigest()
    dtype = vllm_engine.vllm_dtype(decoding.dtype) if engine == "vllm" else str(decoding.dtype).replace("torch.", "")
    info = {"model": cfg.model.name, "fingerprint": base.fingerprint, "generation_key": key, "dtype": dtype,
            **({"engine": engine} if engine == "vllm" else {})}
    previous = previous_generations(out_dir, name, key, len(data.examples))
    if previous is not None:
        info["reused_from_previous_report"] = True
    return info, previous


def generate_finetunes(cfg, data, subjects, prompts, decoding: Decoding, against, generations, subject_info, allow_base_mismatch: bool) -> list[str]:
    """Answers of the fine-tune and of `--against`'s, one model in memory at a time (adds to
    `generations` and `subject_info`); returns the drift guard's warnings, when allowed."""
    warnings = []
    for name, folder in (("tuned", cfg.run_dir), ("against", against)):
        if name not in subjects:
            continue
        trained = load_tuned(Path(folder), decoding.dtype, decoding.device, allow_base_mismatch)
        generations[name] = generate_subject(cfg, name, trained.model, prompts[name], decoding)
        subject_info[name] = {**trained.info, **({"run": str(Path(folder).resolve())} if name == "against" else {})}
        if trained.warning:
            warnings.append(f"{name}: {trained.warning}")
            _stderr().print(f"warning: {name}: {trained.warning}", markup=False, highlight=False)
        del trained
    return warnings


def generate_with_vllm(cfg: RunConfig, data: EvalData, subjects: list[str], prompts, base, decoding: Decoding, against,
                       allow_base_mismatch: bool, out_dir: Path) -> tuple[dict[str, list[Generation]], dict[str, dict[str, Any]], list[str]]:
    """(answers, what each subject is, the drift guard's warnings) of the local subjects, through
    vLLM's offline engine (eval.engine: vllm).

    One engine per model, one on the GPU at a time: the base answers the baselines and, as LoRA
    requests, every adapter trained on it; a full model (or an adapter on another base) gets an
    engine of its own. The prompts are the torch path's token ids, so the scores compare.
    """
    finetunes = {}
    for name, folder in (("tuned", cfg.run_dir), ("against", against)):
        if name in subjects:
            finetunes[name] = runs.locate_run_model(Path(folder), allow_base_mismatch=allow_base_mismatch, missing_hint=NO_TRAINED_MODEL_HINT)
    on_base = {n: f.adapter_dir for n, f in finetunes.items() if f.kind == "adapter" and f.model_dir == base.path}
    start = partial(vllm_engine.start_offline_engine, dtype=decoding.dtype, seed=cfg.eval.seed, trust_remote_code=cfg.model.trust_remote_code)
    generations: dict[str, list[Generation]] = {}
    subject_info: dict[str, dict[str, Any]] = {}
    engine = None
    for name in [b for b in BASELINES if b in subjects]:
        subject_info[name], previous = baseline_entry(cfg, data, name, prompts, base, decoding, out_dir, engine="vllm")
        if previous is not None:
            generations[name] = previous
            continue
        if engine is None:
            engine = start(base.path, base.path, adapters=on_base)
        generations[name] = generate_subject_vllm(cfg, name, engine, prompts[name], decoding)
    for number, (name, adapter_dir) in enumerate(on_base.items(), start=1):
        if engine is None:
            engine = start(base.path, base.path, adapters=on_base)
        generations[name] = generate_subject_vllm(cfg, name, engine, prompts[name], decoding, vllm_engine.lora_request(name, number, adapter_dir))
    del engine
    vllm_engine.release_gpu_memory()
    for name in [n for n in finetunes if n not in on_base]:
        f = finetunes[name]
        adapters = {name: f.adapter_dir} if f.adapter_dir is not None else {}
        engine = start(f.model_dir, f.model_dir if adapters else base.path, adapters=adapters)
        lora = vllm_engine.lora_request(name, 1, f.adapter_dir) if adapters else None
        generations[name] = generate_subject_vllm(cfg, name, engine, prompts[name], decoding, lora)
        del engine
        vllm_engine.release_gpu_memory()
    warnings = []
    for name, f in finetunes.items():
        subject_info[name] = {**f.info, "dtype": vllm_engine.vllm_dtype(decoding.dtype), "engine": "vllm",
                              **({"run": str(Path(against).resolve())} if name == "against" else {})}
        if f.warning:
            warnings.append(f"{name}: {f.warning}")
            _stderr().print(f"warning: {name}: {f.warning}", markup=False, highlight=False)
    return generations, subject_info, warnings


def generate_subject_vllm(cfg: RunConfig, name: str, engine, prompts: list[list[int]], decoding: Decoding, lora=None) -> list[Generation]:
    """One subject's greedy answers from vLLM (all prompts in one call: vLLM schedules them)."""
    with generation_progress(cfg, name, len(prompts)) as progress:
        out = vllm_engine.generate_offline(engine, prompts, max_new_tokens=cfg.eval.max_new_tokens, stop_ids=decoding.stop_ids,
                                           decode=decoding.decode, lora=lora)
        progress.advance(len(prompts))
    return out


def generation_progress(cfg: RunConfig, name: str, count: int) -> Progress:
    """The progress of one subject's answers (a bar, or plain lines when not in a terminal)."""
    return Progress(f"generate {name}", count, "examples", console=_stderr(), run_dir=cfg.run_dir, transient=True)


def generate_subject(cfg: RunConfig, name: str, model, prompts: list[list[int]], decoding: Decoding) -> list[Generation]:
    """One subject's greedy answers, with progress; decoding identical for every subject."""
    ec = cfg.eval
    with generation_progress(cfg, name, len(prompts)) as progress:
        return generate_greedy(
            model, prompts, max_new_tokens=ec.max_new_tokens, batch_size=ec.batch_size, stop_ids=decoding.stop_ids,
            pad_id=decoding.pad_id, decode=decoding.decode, on_batch=progress.advance,
        )


def answer_grammar(data: EvalData) -> str:
    """What `base-constrained` may answer: an EBNF alternation of the training labels, or the
    JSON Schema (as JSON text)."""
    if data.task == "classification":
        labels = M.label_set([c.target for c in data.train]) or data.labels
        return "root ::= " + " | ".join(json.dumps(lab, ensure_ascii=False) for lab in labels)
    return json.dumps(data.schema or {}, ensure_ascii=False)


def generate_constrained(model, prompts: list[list[int]], grammar: str, task: str, max_new_tokens: int, decoding: Decoding,
                         on_example=None) -> list[Generation]:
    """Greedy answers held to `grammar` (xgrammar, as the server's response_format does): at
    each step the tokens the grammar forbids are masked out before the argmax.

    One prompt at a time, with a KV cache: a baseline's answers are a label or a short JSON
    value, and a matcher per row is what batching would complicate. No free whitespace in JSON,
    as in the server: a small model otherwise wanders into endless indentation.
    """
    import torch
    import xgrammar as xgr
    from transformers import DynamicCache

    vocab_size = int(model.config.vocab_size)
    info = xgr.TokenizerInfo.from_huggingface(decoding.tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(decoding.stop_ids))
    compiler = xgr.GrammarCompiler(info)
    try:
        compiled = compiler.compile_grammar(grammar) if task == "classification" else compiler.compile_json_schema(grammar, any_whitespace=False)
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError on a schema it cannot use
        raise UserError(f"base-constrained: xgrammar cannot compile the {task} grammar: {e}",
                        "fix eval.json_schema, or remove base-constrained from the subjects") from None
    device = next(model.parameters()).device
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    out = []
    with torch.inference_mode():
        for ids in prompts:
            matcher, cache, tokens, stopped = xgr.GrammarMatcher(compiled), DynamicCache(config=model.config), [], False
            start = time.perf_counter()
            logits = model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1, **cache_arg(model, cache)).logits[0, -1]
            for _ in range(max_new_tokens):
                scores = logits[:vocab_size].float().unsqueeze(0)
                matcher.fill_next_token_bitmask(bitmask)
                xgr.apply_token_bitmask_inplace(scores, bitmask.to(scores.device))
                token = int(scores.argmax())
                tokens.append(token)
                if token in decoding.stop_ids or not matcher.accept_token(token) or matcher.is_terminated():
                    stopped = token in decoding.stop_ids or matcher.is_terminated()
                    break
                logits = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **cache_arg(model, cache)).logits[0, -1]
            elapsed_s = time.perf_counter() - start
            answer = tokens[:-1] if tokens and tokens[-1] in decoding.stop_ids else tokens
            out.append(Generation(decoding.decode(answer).strip(), tokens, elapsed_s, elapsed_s, stopped))
            if on_example:
                on_example()
    return out


def score_subjects(
    cfg: RunConfig, data: EvalData, subjects: list[str], generations, subject_info
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, np.ndarray]]]:
    """(results.json's entry, per-example score columns) of every subject."""
    ec = cfg.eval
    task = data.task
    columns, entries = {}, {}
    for name in subjects:
        gens = generations[name]
        cols = M.score(task, data.golds, [g.text for g in gens], labels=data.labels, schema=data.schema,
                       abstain_label=ec.abstain_label if task == "classification" else None)
        cols["output_tokens"] = np.array([g.new_tokens for g in gens], dtype=float)
        cols["latency_s"] = np.array([g.latency_s for g in gens])
        cols["compute_s"] = np.array([g.compute_s for g in gens])
        columns[name] = cols
        values = M.aggregate(task, cols)
        intervals = M.bootstrap_ci(task, cols, samples=ec.bootstrap_samples, seed=ec.seed)
        entry: dict[str, Any] = {
            **subject_info[name],
            "metrics": {k: {"value": v, "ci_low": intervals[k][0], "ci_high": intervals[k][1]} for k, v in values.items()},
            "ended_on_end_of_turn": float(np.mean([g.stopped for g in gens])),
        }
        if task == "classification":
            pc = M.per_class(cols["gold_idx"], cols["pred_idx"], len(data.labels))
            entry["per_class"] = {
                lab: {"precision": float(pc["precision"][i]), "recall": float(pc["recall"][i]), "f1": float(pc["f1"][i]), "support": int(pc["support"][i])}
                for i, lab in enumerate(data.labels)
            }
            entry["confusion"] = pc["confusion"].tolist()
        entries[name] = entry
    return entries, columns


def compare_subjects(cfg: RunConfig, task: str, subjects: list[str], columns) -> dict[str, Any]:
    """The fine-tune against every other subject, paired on the same examples."""
    if "tuned" not in subjects:
        return {}
    ec = cfg.eval
    return {f"tuned_vs_{name}": M.compare(task, columns["tuned"], columns[name], samples=ec.bootstrap_samples, seed=ec.seed)
            for name in subjects if name != "tuned"}


def evaluate_gates(gates, results_subjects, comparisons, primary: str, subjects: list[str], has_against: bool) -> list[dict[str, Any]]:
    """Thresholds on any metric, and "not significantly worse than --against" on the primary one."""
    metric_values = {s: {k: v["value"] for k, v in e["metrics"].items()} for s, e in results_subjects.items()}
    gate_results = M.check_gates(gates, metric_values, "tuned" if "tuned" in subjects else subjects[-1])
    if has_against and "tuned" in subjects:
        c = comparisons["tuned_vs_against"][primary]
        worse = (-c["delta"] if primary not in M.LOWER_IS_BETTER else c["delta"]) > 0 and c["p_value"] < ALPHA
        gate_results.append({
            "gate": f"tuned not significantly worse than against on {primary}", "subject": "tuned", "metric": primary,
            "op": "not worse", "threshold": None, "value": metric_values["tuned"][primary],
            "against_value": metric_values["against"][primary], "p_value": c["p_value"], "passed": not worse,
        })
    return gate_results


def prediction_rows(data: EvalData, subjects: list[str], generations, columns) -> list[dict[str, Any]]:
    """predictions.jsonl: per held-out example, every subject's answer and its scores."""
    rows = []
    for i, conv in enumerate(data.examples):
        row: dict[str, Any] = {"index": i, "source_line": conv.source_line, "input": conv.input_text, "target": data.golds[i], "outputs": {}}
        for name in subjects:
            g, cols = generations[name][i], columns[name]
            out: dict[str, Any] = {"text": g.text, "new_tokens": g.new_tokens, "latency_s": g.latency_s, "compute_s": g.compute_s, "stopped": g.stopped}
            for key in ("correct", "lenient_correct", "exact", "parsed", "schema_valid", "token_f1", "rouge_l"):
                if key in cols:
                    out[key] = float(cols[key][i])
            row["outputs"][name] = out
        rows.append(row)
    return rows


def write_manifest_section(run_dir: Path, results: dict[str, Any]) -> None:
    """The run manifest's `eval` record: primary metric per subject, verdict, what each subject was."""
    primary = results["primary_metric"]
    runs.write_eval_record(run_dir, runs.EvalRecord(
        finished_at=time.time(),
        task=results["task"],
        examples=results["examples"],
        eval_sha256=results["sources"]["eval_sha256"],
        primary_metric=primary,
        primary={s: e["metrics"][primary]["value"] for s, e in results["subjects"].items()},
        verdict=results["verdict"]["text"],
        gates_passed=results["passed"],
        subjects={s: {k: v for k, v in e.items() if k in ("kind", "path", "fingerprint", "base_fingerprint", "trained_on_base_fingerprint", "model", "run", "warning", "base_url", "usage", "cost_usd")}
                  for s, e in results["subjects"].items()},
        report=str(run_dir / artifacts.EVAL_DIR / "report.html"),
        prompt_truncation=results.get("prompt_truncation"),
    ))


def generation_key(fingerprint: str, prompts: list[list[int]], ec, dtype, stop_ids: set[int]) -> str:
    """What a subject's greedy answers depend on: model, exact prompt tokens, decoding, batching
    (batch composition changes rounding in bf16)."""

    engine = [ec.engine] if ec.engine != "torch" else []  # another engine, other kernels; torch's keys as before
    digest = hashlib.sha256(json.dumps([fingerprint, ec.max_new_tokens, ec.batch_size, str(dtype), sorted(stop_ids), *engine]).encode())
    for p in prompts:
        digest.update(json.dumps(p).encode())
    return digest.hexdigest()


def previous_generations(out_dir: Path, name: str, key: str, count: int) -> list[Generation] | None:
    """The answers of `name` in the last report, when they were made under the same key."""
    try:
        previous = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
        if previous["subjects"][name].get("generation_key") != key:
            return None
        rows = [json.loads(x) for x in (out_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        outs = [r["outputs"][name] for r in rows]
        if len(outs) != count:
            return None
        return [Generation(o["text"], [], o["latency_s"], o["compute_s"], o["stopped"], o["new_tokens"]) for o in outs]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _gate_line(g: dict[str, Any]) -> str:
    if g["op"] == "not worse":
        return f"{g['gate']}: {g['value']:.4f} vs {g['against_value']:.4f} (p={g['p_value']:.3g})"
    return f"{g['gate']}: {g['subject']}.{g['metric']} = {g['value']:.4f}"


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


def make_verdict(subjects: dict[str, Any], comparisons: dict[str, Any], primary: str) -> dict[str, Any]:
    """A plain sentence: does the fine-tune beat the best baseline, by how much, significantly?"""
    value = {s: e["metrics"][primary]["value"] for s, e in subjects.items()}
    others = [s for s in subjects if s != "tuned"]
    if "tuned" not in subjects or not others:
        best = max(value, key=lambda s: (value[s] if primary not in M.LOWER_IS_BETTER else -value[s]))
        return {"text": f"No comparison with a fine-tune: the best subject on {primary} is {best} ({value[best]:.3f}).",
                "best_baseline": None, "beats": None, "significant": None}
    best = others[0]
    for s in others[1:]:
        if M.better(primary, value[s], value[best]):
            best = s
    c = comparisons[f"tuned_vs_{best}"][primary]
    beats = M.better(primary, value["tuned"], value[best])
    significant = c["p_value"] < ALPHA
    numbers = (f"{value['tuned']:.3f} vs {value[best]:.3f} ({c['delta']:+.3f}, 95% CI of the difference "
               f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]; {c['test']} p = {c['p_value']:.3g})")
    if beats and significant:
        text = f"The fine-tune beats the best baseline ({best}) on {primary}: {numbers}. The difference is significant at {ALPHA:.0%}."
    elif beats:
        text = (f"The fine-tune scores higher than the best baseline ({best}) on {primary}: {numbers}, but the difference "
                f"is not significant at {ALPHA:.0%}: it may be noise; evaluate more examples.")
    elif significant:
        text = f"The fine-tune is worse than the best baseline ({best}) on {primary}: {numbers}. The difference is significant at {ALPHA:.0%}."
    else:
        text = f"The fine-tune does not beat the best baseline ({best}) on {primary}: {numbers}; not significant at {ALPHA:.0%}."
    return {"text": text, "best_baseline": best, "beats": beats, "significant": significant,
            "delta": c["delta"], "p_value": c["p_value"], "test": c["test"]}
