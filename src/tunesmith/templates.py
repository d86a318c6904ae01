"""Chat templates: which one a run uses (`model.chat_template`), and where its turns end.

A template is the model's own (the default), one shipped here by name, or a .jinja file. The
named ones are the real models' templates (text-only parts), so a base model trained with
`chat_template: llama3` renders exactly what Llama 3 Instruct renders. Every stage loads its
tokenizer through `models.load_tokenizer`, which applies the chosen template here, so
formatting, evaluation, export and serving all render the same text.

The end-of-turn token (what training must teach and generation must stop on) is read off the
rendered template: a one-turn conversation is rendered and the token right after the
assistant's content is taken. No table keyed by model name: a template we have never seen
still gets its own end-of-turn token.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError

MODEL_TEMPLATE = "model"  # model.chat_template: the tokenizer's own template

# ChatML as Qwen2.5 and SmolLM2 write it, without a default system prompt.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta-Llama-3-8B-Instruct's template, verbatim.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Gemma 3's template (text parts): the system message opens the first user turn; the
# assistant's role is `model`; turns close with <end_of_turn>, not with <eos>.
GEMMA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# Mistral Instruct's [INST] template (v0.2 spacing); an assistant turn closes with eos (</s>).
# Mistral's templates take no system role; as Gemma's does, the system message opens the first
# user turn (Mistral's own v0.3 puts it in the last user turn, which changes earlier turns'
# text when a conversation grows, so no prefix of it could be trained).
MISTRAL = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '[INST] ' + (first_user_prefix if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- else -%}"
    "{{ message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Phi-3-mini-4k-instruct's template, verbatim: turns close with <|end|>; a finished
# conversation (no generation prompt) ends with eos (<|endoftext|>).
PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

NAMED_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA, "mistral": MISTRAL, "phi3": PHI3}
TEMPLATE_FIX = f"set model.chat_template to one of {', '.join(NAMED_TEMPLATES)}, or to a .jinja file (relative to the config)"


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved chat template: where it came from and its text.

    `source` is "model" (the tokenizer's own), a name of NAMED_TEMPLATES, or "file" (then
    `path` and `file_sha256` say which file).
    """

    source: str
    text: str
    path: str | None = None
    file_sha256: str | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def record(self) -> dict[str, Any]:
        """What the train manifest keeps: enough to tell which template, and its text to reapply."""
        return {"source": self.source, "path": self.path, "file_sha256": self.file_sha256, "sha256": self.sha256, "text": self.text}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ChatTemplate:
        return cls(record["source"], record["text"], record.get("path"), record.get("file_sha256"))


def template_problem(spec: str | None, config_dir: str | Path | None) -> str | None:
    """Why `model.chat_template` cannot resolve (checked without a tokenizer); None when it can."""
    if spec is None or spec == MODEL_TEMPLATE or spec in NAMED_TEMPLATES:
        return None
    if not spec.endswith(".jinja"):
        return f"{spec!r} is neither {MODEL_TEMPLATE!r}, a named template ({', '.join(NAMED_TEMPLATES)}) nor a .jinja file"
    path = template_path(spec, config_dir)
    if not path.is_file():
        return f"template file {path} not found"
    return None


def template_path(spec: str, config_dir: str | Path | None) -> Path:
    """A template file named in the config: relative paths are read from the config's folder."""
    path = Path(spec).expanduser()
    return path if path.is_absolute() else Path(config_dir or ".") / path


def resolve_chat_template(tokenizer: Any, spec: str | None, config_dir: str | Path | None = None) -> ChatTemplate:
    """The template `model.chat_template` names: None/"model" (the tokenizer's own), a name, or a .jinja file.

    A model without a template of its own (a base model) is refused here, with the key to set,
    before anything is tokenised.
    """
    if spec is None or spec == MODEL_TEMPLATE:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one is the chat template
            own = own.get("default")
        if not own:
            raise UserError(
                "the model has no chat template of its own (a base model?), so conversations cannot be rendered as chat turns",
                TEMPLATE_FIX,
            )
        return ChatTemplate(MODEL_TEMPLATE, own)
    if spec in NAMED_TEMPLATES:
        return ChatTemplate(spec, NAMED_TEMPLATES[spec])
    problem = template_problem(spec, config_dir)
    if problem:
        raise UserError(f"model.chat_template: {problem}", TEMPLATE_FIX)
    path = template_path(spec, config_dir)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"model.chat_template: {path} is not UTF-8 text", "save the template as UTF-8") from None
    if not text.strip():
        raise UserError(f"model.chat_template: {path} is empty", "write the Jinja template into the file")
    return ChatTemplate("file", text, str(path.resolve()), hashlib.sha256(data).hexdigest())


def apply_chat_template(tokenizer: Any, template: ChatTemplate | str | None, config_dir: str | Path | None = None) -> ChatTemplate | None:
    """Set the tokenizer's chat template from a spec or a resolved template; return it.

    A spec of None on a tokenizer without a template returns None (a base model loaded for
    something that renders no chat, e.g. /v1/completions); every chat renderer refuses it then.
    """
    if template is None and not getattr(tokenizer, "chat_template", None):
        return None
    resolved = template if isinstance(template, ChatTemplate) else resolve_chat_template(tokenizer, template, config_dir)
    tokenizer.chat_template = resolved.text
    return resolved


# --------------------------------------------------------------------------- end of turn

# A one-turn conversation whose assistant content cannot merge with what a template puts after it.
PROBE_USER = "Hello"
PROBE_ANSWER = "Sure thing."


def end_of_turn_token(tokenizer: Any) -> tuple[int, str]:
    """(id, text) of the token that closes an assistant turn in the tokenizer's chat template.

    Rendered, not looked up: the token right after a one-turn answer (Llama 3 `<|eot_id|>`,
    Gemma `<end_of_turn>`, Phi-3 `<|end|>`, ChatML `<|im_end|>`, Mistral `</s>`). It must be one
    special token of this tokenizer: a template whose closing text splits into ordinary tokens
    (a ChatML template on a tokenizer without `<|im_end|>`) could not teach the model to stop.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise UserError("the model has no chat template, so its turns have no end-of-turn token", TEMPLATE_FIX)
    return _end_of_turn(tokenizer, str(template))


@lru_cache(maxsize=16)
def _end_of_turn(tokenizer: Any, template: str) -> tuple[int, str]:
    messages = [{"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_ANSWER}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
    content_end = text.rfind(PROBE_ANSWER) + len(PROBE_ANSWER)
    if content_end < len(PROBE_ANSWER):
        raise UserError("the chat template does not render the assistant's answer", "check the template's assistant branch")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    after = next(((tid, start) for tid, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"]) if start >= content_end), None)
    following = repr(re.sub(r"\s+", " ", text[content_end : content_end + 24])) if content_end < len(text) else "nothing"
    if after is not None and not text[content_end : after[1]].strip():
        token_id = after[0]
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token_id in tokenizer.all_special_ids or token in tokenizer.get_added_vocab():
            return token_id, token
    raise UserError(
        f"the chat template closes an assistant turn with {following}, which is not one special token of this tokenizer, "
        "so the model could not learn where a turn ends",
        f"use a template made for this tokenizer: {TEMPLATE_FIX}",
    )
