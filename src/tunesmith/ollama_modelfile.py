"""Ollama's Modelfile: the chat template as a Go TEMPLATE, the Modelfile text, and a renderer to check it.

`chat_format` probes a tokenizer's chat template with marker contents and cuts out the literal
text around each role's message; `ollama_template` writes that as the Go template Ollama renders
`.Messages` with; `template_parity` renders conversations both ways and lists differences,
through `render_go_template` (the Go template subset the TEMPLATE uses), so the export proves
the Modelfile without Ollama installed.

Separate from `export.py`, which holds the export stage (`export_ollama` writes the GGUF and the
Modelfile there): this module works on tokenizers and template text only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tunesmith.errors import UserError


@dataclass
class ChatFormat:
    """A chat template reduced to literal pieces around each message's content.

    `begin` is written once before the first message (Llama 3's <|begin_of_text|>, Gemma's
    <bos>). With `system_in_first_user` (Gemma, Mistral) the system text opens the first user
    turn: prefix["system"] is the user prefix and suffix["system"] the separator before the
    user's text, and that user turn has no prefix of its own.
    """

    prefix: dict[str, str]
    suffix: dict[str, str]
    generation_prompt: str
    default_system: str | None
    begin: str = ""
    system_in_first_user: bool = False


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _common_prefix(a: str, b: str, special_tokens: list[str]) -> str:
    """The common prefix of two texts, cut before any special token it would split ("<|end|>\n<|"
    of "<|end|>\n<|assistant|>" and "<|end|>\n<|endoftext|>" is "<|end|>\n")."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    for token in special_tokens:
        start = a.find(token)
        while start != -1:
            if start < n < start + len(token):
                n = start
            start = a.find(token, start + 1)
    return a[:n]


def chat_format(tokenizer: Any) -> ChatFormat:
    """Probe the chat template with marker contents and cut out the literal pieces.

    Each piece is read where nothing else can be mixed into it: the user suffix is what the
    turn ends with with and without a generation prompt (Phi-3 ends a finished conversation
    with eos), the assistant suffix ends a finished assistant turn, the user prefix follows it.
    Templates that wrap messages in fixed text per role (ChatML, Llama 3, Phi-3) or fold the
    system message into the first user turn (Gemma, Mistral) fit; anything else is refused.
    """
    s, u, a, u2 = "\x01S\x01", "\x01U\x01", "\x01A\x01", "\x01V\x01"
    unfit = UserError("the chat template does not wrap messages in fixed text; Ollama TEMPLATE cannot be derived", "write the TEMPLATE of the Modelfile by hand")
    try:
        x1, x1_done = _render(tokenizer, [{"role": "user", "content": u}], True), _render(tokenizer, [{"role": "user", "content": u}])
        ua_done = _render(tokenizer, [{"role": "user", "content": u}, {"role": "assistant", "content": a}])
        x2 = _render(tokenizer, [{"role": "user", "content": u}, {"role": "assistant", "content": a}, {"role": "user", "content": u2}], True)
        xs = _render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u}], True)
    except Exception:  # noqa: BLE001 - a template that raises on these probes cannot be converted
        raise unfit from None
    if any(text.count(marker) != 1 for text, marker in ((x1, u), (x1_done, u), (ua_done, a), (x2, a), (x2, u2), (xs, s), (xs, u))):
        raise unfit
    head, tail = x1.split(u)
    tail_done = x1_done.split(u)[1]
    specials = [t.content for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values()]
    s_user = _common_prefix(tail, tail_done, specials)
    generation_prompt, end = tail[len(s_user) :], tail_done[len(s_user) :]
    s_asst = ua_done.split(a)[1]
    s_asst = s_asst[: len(s_asst) - len(end)] if end and s_asst.endswith(end) else s_asst
    head2, rest = x2.split(u, 1)
    mid1, rest = rest.split(a)
    mid2, tail2 = rest.split(u2)
    if head2 != head or tail2 != tail or not mid1.startswith(s_user) or not mid2.startswith(s_asst):
        raise unfit
    p_asst, p_user = mid1[len(s_user) :], mid2[len(s_asst) :]
    if not head.endswith(p_user):
        raise unfit
    before_user = head[: len(head) - len(p_user)]  # begin, plus a default system turn if the template adds one
    pre_s, rest = xs.split(s)
    between, tail_s = rest.split(u)
    if tail_s != tail:
        raise unfit
    if pre_s == before_user + p_user:  # Gemma, Mistral: the system text opens the first user turn
        return ChatFormat({"system": p_user, "user": p_user, "assistant": p_asst}, {"system": between, "user": s_user, "assistant": s_asst}, generation_prompt, None, before_user, True)
    if not between.endswith(p_user):
        raise unfit
    s_sys = between[: len(between) - len(p_user)]
    if pre_s.startswith(before_user):  # no default system turn: what precedes every conversation is `begin`
        return ChatFormat({"system": pre_s[len(before_user) :], "user": p_user, "assistant": p_asst}, {"system": s_sys, "user": s_user, "assistant": s_asst}, generation_prompt, None, before_user)
    # A template that adds a system turn when there is none: that text is Ollama's SYSTEM default.
    if not (before_user.startswith(pre_s) and before_user.endswith(s_sys)):
        raise unfit
    default_system = before_user[len(pre_s) : len(before_user) - len(s_sys)]
    return ChatFormat({"system": pre_s, "user": p_user, "assistant": p_asst}, {"system": s_sys, "user": s_user, "assistant": s_asst}, generation_prompt, default_system)


def ollama_template(fmt: ChatFormat) -> str:
    """The Go template Ollama renders `.Messages` with (one line: no trim markers near text)."""
    for piece in [*fmt.prefix.values(), *fmt.suffix.values(), fmt.generation_prompt, fmt.begin]:
        if "{{" in piece or "}}" in piece:
            raise UserError("the chat template's text contains '{{'; cannot write it as a Go template", "write TEMPLATE by hand")
    user_prefix = fmt.prefix["user"]
    parts = [fmt.begin, "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"]
    if fmt.system_in_first_user:  # the user turn right after the system text continues it
        parts.append("{{ $first := index $.Messages 0 }}")
        user_prefix = f'{{{{ if not (and (eq $i 1) (eq $first.Role "system")) }}}}{user_prefix}{{{{ end }}}}'
    parts.append(f'{{{{ if eq .Role "system" }}}}{fmt.prefix["system"]}{{{{ .Content }}}}{fmt.suffix["system"]}')
    parts.append(f'{{{{ else if eq .Role "user" }}}}{user_prefix}{{{{ .Content }}}}{fmt.suffix["user"]}')
    parts.append(f'{{{{ else if eq .Role "assistant" }}}}{fmt.prefix["assistant"]}{{{{ .Content }}}}{{{{ if not $last }}}}{fmt.suffix["assistant"]}{{{{ end }}}}')
    parts.append("{{ end }}")
    parts.append(f'{{{{ if and $last (ne .Role "assistant") }}}}{fmt.generation_prompt}{{{{ end }}}}{{{{ end }}}}')
    return "".join(parts)


def ollama_stops(tokenizer: Any, stop_ids: list[int], fmt: ChatFormat) -> list[str]:
    """PARAMETER stop values: the run's stop tokens (end of turn, eos), then the special tokens
    that open a user turn: a model that starts the next turn itself has finished its answer
    (Ollama's own ChatML templates stop on <|im_start|>, its Mistral ones on [INST])."""
    stops: list[str] = []
    for token_id in stop_ids:
        text = tokenizer.convert_ids_to_tokens(token_id)
        if text and text not in stops:
            stops.append(text)
    for token in tokenizer.all_special_tokens + [t.content for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values()]:
        if token and fmt.prefix["user"].startswith(token) and token not in stops:
            stops.append(token)
    return stops


def _quote_modelfile(text: str) -> str:
    if '"""' in text:
        raise UserError('the template contains """; cannot quote it in a Modelfile', "write the Modelfile by hand")
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, template: str, stops: list[str], system: str | None) -> str:
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quote_modelfile(template)}"]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    if system:
        lines.append(f"SYSTEM {_quote_modelfile(system)}")
    return "\n".join(lines) + "\n"


def ollama_messages(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """What Ollama hands the template: SYSTEM is prepended when the request has no system turn."""
    if system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system}, *messages]
    return messages


def template_parity(tokenizer: Any, template: str, system: str | None, conversations: list[list[dict[str, str]]]) -> dict[str, Any]:
    """Render each conversation with the chat template and with the Go template; list differences."""
    mismatches = []
    for i, conv in enumerate(conversations):
        expected = _render(tokenizer, ollama_messages(conv, system), add_generation_prompt=True)
        got = render_go_template(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in ollama_messages(conv, system)]})
        if expected != got:
            mismatches.append({"conversation": i, "chat_template": expected, "modelfile": got})
    return {"conversations": len(conversations), "mismatches": mismatches}


# ----------------------------------------------------------------------------------------------
# A renderer for the Go template subset `ollama_template` writes, so the export can prove the
# Modelfile renders what the chat template renders without Ollama installed.

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_EXPR_TOKEN = re.compile(r'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+')


def render_go_template(template: str, data: dict[str, Any]) -> str:
    """Render `{{ range $i, $_ := .X }}`, `{{ $v := expr }}`, if/else if/else/end, `{{ .Field }}`
    with the functions eq, ne, and, or, not, len, slice, index. Enough for Ollama chat templates."""
    nodes, pos = [], 0
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if m.group(1):
            text = text.rstrip()
        nodes.append(("text", text))
        nodes.append(("action", m.group(2)))
        pos = m.end()
        if m.group(3):
            rest = template[pos:]
            pos += len(rest) - len(rest.lstrip())
    nodes.append(("text", template[pos:]))
    tree, end = _parse_block(nodes, 0)
    if end != len(nodes):
        raise ValueError("unbalanced {{ end }}")
    out: list[str] = []
    _exec(tree, {"$": data}, data, out)
    return "".join(out)


def _parse_block(nodes: list[tuple[str, str]], i: int) -> tuple[list[Any], int]:
    block: list[Any] = []
    while i < len(nodes):
        kind, value = nodes[i]
        if kind == "text":
            block.append(("text", value))
            i += 1
            continue
        word = value.split(None, 1)[0] if value else ""
        if word in ("end", "else"):
            return block, i
        if word in ("if", "range"):
            branches, i = _parse_branches(nodes, i)
            block.append((word, branches))
            continue
        block.append(("expr", value))
        i += 1
    return block, i


def _parse_branches(nodes: list[tuple[str, str]], i: int) -> tuple[list[tuple[str | None, list[Any]]], int]:
    head = nodes[i][1]
    branches = []
    cond: str | None = head.split(None, 1)[1]
    i += 1
    while True:
        body, i = _parse_block(nodes, i)
        branches.append((cond, body))
        if i >= len(nodes):
            raise ValueError("missing {{ end }}")
        value = nodes[i][1]
        i += 1
        if value == "end":
            return branches, i
        rest = value[len("else") :].strip()
        cond = rest[len("if") :].strip() if rest.startswith("if") else None


def _exec(block: list[Any], scope: dict[str, Any], dot: Any, out: list[str]) -> None:
    for node in block:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "expr":
            m = re.match(r"^(\$\w+)\s*:?=\s*(.*)$", node[1], re.S)
            if m:
                scope[m.group(1)] = _eval(m.group(2), scope, dot)
            else:
                value = _eval(node[1], scope, dot)
                out.append("" if value is None else str(value))
        elif kind == "if":
            for cond, body in node[1]:
                if cond is None or _truthy(_eval(cond, scope, dot)):
                    _exec(body, scope, dot, out)
                    break
        elif kind == "range":
            (cond, body), *rest = node[1]
            m = re.match(r"^(?:(\$\w+)\s*,\s*(\$\w+)\s*:=\s*)?(.*)$", cond, re.S)
            items = _eval(m.group(3), scope, dot)
            for index, item in enumerate(items or []):
                inner = dict(scope)
                if m.group(1):
                    inner[m.group(1)], inner[m.group(2)] = index, item
                _exec(body, inner, item, out)
            if not items and rest:
                _exec(rest[0][1], scope, dot, out)


def _truthy(value: Any) -> bool:
    return bool(value) if not isinstance(value, (int, float)) or isinstance(value, bool) else value != 0


def _eval(expr: str, scope: dict[str, Any], dot: Any) -> Any:
    tokens = _EXPR_TOKEN.findall(expr)
    value, i = _eval_pipeline(tokens, 0, scope, dot)
    if i != len(tokens):
        raise ValueError(f"cannot parse {expr!r}")
    return value


def _eval_pipeline(tokens: list[str], i: int, scope: dict[str, Any], dot: Any) -> tuple[Any, int]:
    """A command: an operand alone, or a function applied to operands (until ')' or the end)."""
    functions = {
        "eq": lambda a, *b: any(a == x for x in b),
        "ne": lambda a, b: a != b,
        "and": lambda *a: next((x for x in a if not _truthy(x)), a[-1]),
        "or": lambda *a: next((x for x in a if _truthy(x)), a[-1]),
        "not": lambda a: not _truthy(a),
        "len": len,
        "slice": lambda a, *idx: a[idx[0] : idx[1]] if len(idx) > 1 else a[idx[0] :] if idx else a,
        "index": lambda a, *idx: a[idx[0]] if len(idx) == 1 else a[idx[0]][idx[1]],
    }
    args = []
    while i < len(tokens) and tokens[i] != ")":
        token = tokens[i]
        if token == "(":
            value, i = _eval_pipeline(tokens, i + 1, scope, dot)
            i += 1  # the ')'
            args.append(value)
            continue
        args.append(functions[token] if token in functions else _operand(token, scope, dot))
        i += 1
    if args and callable(args[0]):
        return args[0](*args[1:]), i
    if len(args) != 1:
        raise ValueError(f"cannot evaluate {' '.join(tokens)!r}")
    return args[0], i


def _operand(token: str, scope: dict[str, Any], dot: Any) -> Any:
    if token.startswith('"'):
        return json.loads(token)
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if token == ".":
        return dot
    root, fields = (dot, token[1:].split(".")) if token.startswith(".") else (scope[token.split(".")[0]], token.split(".")[1:])
    value = root
    for name in fields:
        value = value[name]
    return value
