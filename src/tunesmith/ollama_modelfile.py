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
from collections import ChainMap
from dataclasses import dataclass
from typing import Any

from tunesmith.errors import UserError


@dataclass
class ChatFormat:
    """A chat template reduced to literal pieces around each message's content."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    generation_prompt: str
    default_system: str | None
    # Templates with no system turn of their own (Gemma's, Mistral's) open the first user turn
    # with the system text and this joiner; `lead` is what they write before any turn (<bos>).
    system_joiner: str | None = None
    lead: str = ""


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_format(tokenizer: Any) -> ChatFormat:
    """Probe the chat template with marker contents and cut out the literal pieces.

    Works for templates that wrap each message in fixed text per role (ChatML, Llama 3, Zephyr
    and the like); anything else is refused by the check in `ollama_template`.
    """
    s, u, a = "\x01S\x01", "\x01U\x01", "\x01A\x01"
    sys_only = _render(tokenizer, [{"role": "system", "content": s}])
    sys_user = _render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u}])
    full = _render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u}, {"role": "assistant", "content": a}])
    with_gen = _render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u}], add_generation_prompt=True)
    user_only = _render(tokenizer, [{"role": "user", "content": u}])
    unfit = UserError("the chat template does not wrap messages in fixed text; Ollama TEMPLATE cannot be derived", "write the TEMPLATE of the Modelfile by hand")
    if s not in sys_only:
        return _folded_system_format(sys_user, full, with_gen, user_only, sys_only, (s, u, a), unfit)
    if not (sys_user.startswith(sys_only) and full.startswith(sys_user) and with_gen.startswith(sys_user)):
        raise unfit
    p_sys, _, s_sys = sys_only.partition(s)
    p_user, _, s_user = sys_user[len(sys_only) :].partition(u)
    p_asst, _, s_asst = full[len(sys_user) :].partition(a)
    generation_prompt = with_gen[len(sys_user) :]
    # A template that adds a system turn when there is none: that text is Ollama's SYSTEM default.
    default_system = None
    own = p_user + u + s_user
    if user_only != own:
        head = user_only[: -len(own)] if user_only.endswith(own) else None
        if head is None or not (head.startswith(p_sys) and head.endswith(s_sys)):
            raise unfit
        default_system = head[len(p_sys) : len(head) - len(s_sys)]
    return ChatFormat({"system": p_sys, "user": p_user, "assistant": p_asst}, {"system": s_sys, "user": s_user, "assistant": s_asst}, generation_prompt, default_system)


def _folded_system_format(sys_user: str, full: str, with_gen: str, user_only: str, lead: str, markers: tuple[str, str, str], unfit: UserError) -> ChatFormat:
    """A template that renders no system turn: the system text opens the first user turn.

    The pieces are cut as for wrapped turns, and the whole is checked: the system-and-user
    render must be the user-only render with `system + joiner` put before the user's text.
    """
    s, u, a = markers
    if not user_only.startswith(lead) or u not in user_only:
        raise unfit
    p_user, _, s_user = user_only[len(lead) :].partition(u)
    head = lead + p_user + s
    joiner = sys_user[len(head) : sys_user.find(u, len(head))] if sys_user.startswith(head) else None
    if joiner is None or sys_user != head + joiner + u + s_user or not (full.startswith(sys_user) and with_gen.startswith(sys_user)):
        raise unfit
    p_asst, _, s_asst = full[len(sys_user) :].partition(a)
    prefix, suffix = {"system": "", "user": p_user, "assistant": p_asst}, {"system": "", "user": s_user, "assistant": s_asst}
    return ChatFormat(prefix, suffix, with_gen[len(sys_user) :], None, system_joiner=joiner, lead=lead)


def ollama_template(fmt: ChatFormat) -> str:
    """The Go template Ollama renders `.Messages` with (one line: no trim markers near text)."""
    for piece in [*fmt.prefix.values(), *fmt.suffix.values(), fmt.generation_prompt]:
        if "{{" in piece or "}}" in piece:
            raise UserError("the chat template's text contains '{{'; cannot write it as a Go template", "write TEMPLATE by hand")
    if fmt.system_joiner is not None:
        return _folded_system_template(fmt)
    parts = ["{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"]
    for n, role in enumerate(("system", "user", "assistant")):
        parts.append(f'{{{{ {"if" if n == 0 else "else if"} eq .Role "{role}" }}}}{fmt.prefix[role]}{{{{ .Content }}}}')
        parts.append(f"{{{{ if not $last }}}}{fmt.suffix[role]}{{{{ end }}}}" if role == "assistant" else fmt.suffix[role])
    parts.append("{{ end }}")
    parts.append(f'{{{{ if and $last (ne .Role "assistant") }}}}{fmt.generation_prompt}{{{{ end }}}}{{{{ end }}}}')
    return "".join(parts)


def _folded_system_template(fmt: ChatFormat) -> str:
    """The Go template of a folded-system format: find the system text first, then put it in
    the first user turn (Go's `=` assigns the variable declared outside the range)."""
    for piece in (fmt.lead, str(fmt.system_joiner)):
        if "{{" in piece or "}}" in piece:
            raise UserError("the chat template's text contains '{{'; cannot write it as a Go template", "write TEMPLATE by hand")
    return "".join(
        [
            f'{fmt.lead}{{{{ $system := "" }}}}{{{{ range .Messages }}}}{{{{ if eq .Role "system" }}}}{{{{ $system = .Content }}}}{{{{ end }}}}{{{{ end }}}}',
            "{{ $first := true }}{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}",
            f'{{{{ if eq .Role "user" }}}}{fmt.prefix["user"]}{{{{ if and $first $system }}}}{{{{ $system }}}}{fmt.system_joiner}{{{{ end }}}}{{{{ .Content }}}}{fmt.suffix["user"]}',
            f'{{{{ else if eq .Role "assistant" }}}}{fmt.prefix["assistant"]}{{{{ .Content }}}}{{{{ if not $last }}}}{fmt.suffix["assistant"]}{{{{ end }}}}{{{{ end }}}}',
            '{{ if ne .Role "system" }}{{ $first = false }}{{ end }}',
            f'{{{{ if and $last (ne .Role "assistant") }}}}{fmt.generation_prompt}{{{{ end }}}}{{{{ end }}}}',
        ]
    )


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
    with the functions eq, ne, and, or, not, len, slice. Enough for Ollama chat templates."""
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
    _exec(tree, ChainMap({"$": data}), data, out)
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


def _exec(block: list[Any], scope: ChainMap, dot: Any, out: list[str]) -> None:
    """Run a parsed block. A range body gets its own scope, as in Go: `$v := x` declares there,
    `$v = x` assigns the variable where it was declared (an outer one too)."""
    for node in block:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "expr":
            m = re.match(r"^(\$\w+)\s*(:?=)\s*(.*)$", node[1], re.S)
            if m:
                value = _eval(m.group(3), scope, dot)
                if m.group(2) == ":=":
                    scope[m.group(1)] = value
                else:
                    owner = next((layer for layer in scope.maps if m.group(1) in layer), None)
                    if owner is None:
                        raise ValueError(f"undefined variable {m.group(1)}")
                    owner[m.group(1)] = value
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
                inner = scope.new_child()
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
    if token in ("true", "false"):
        return token == "true"
    if token == ".":
        return dot
    root, fields = (dot, token[1:].split(".")) if token.startswith(".") else (scope[token.split(".")[0]], token.split(".")[1:])
    value = root
    for name in fields:
        value = value[name]
    return value
