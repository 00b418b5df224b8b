"""Chat templates: a model's own Jinja template (``tokenizer_config.json``'s ``chat_template``), rendered
as Hugging Face ``transformers`` renders it, in Jinja's immutable sandbox (a template is data from a
downloaded folder: it may not reach Python objects beyond the messages it is given)."""

from __future__ import annotations

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """A template that does not render, or messages it refuses."""


def _raise(message: str):
    raise ChatTemplateError(message)


def render_chat(template: str, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                **special_tokens: str) -> str:
    """The prompt text of ``messages`` (``[{"role": ..., "content": ...}]``) under ``template``, ending
    with the assistant's turn opened when ``add_generation_prompt``. ``special_tokens`` (``bos_token``,
    ``eos_token``, ...) are visible to the template, as ``transformers`` passes them."""
    for m in messages:
        if set(m) != {"role", "content"} or m["role"] not in ROLES or not isinstance(m["content"], str):
            raise ChatTemplateError(f"a message is {{'role': one of {', '.join(ROLES)}, 'content': text}}, got {m!r}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **special_tokens)
    except TemplateError as exc:  # syntax errors, undefined names, the sandbox's SecurityError
        raise ChatTemplateError(f"the chat template does not render: {str(exc).splitlines()[0]}") from None


def chat_pair(template: str, messages: list[dict[str, str]], bos_token: str = "",
              eos_token: str = "") -> tuple[str, str]:
    """(prompt, response) of a conversation that ends with the assistant's message, for supervised
    fine-tuning: the prompt renders the messages before it with the assistant's turn opened; the
    response is what rendering the whole conversation adds to that (the answer and the template's
    end of turn). A BOS the template writes first is left out: the row layout puts its own."""
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
            or messages[-1].get("role") != "assistant":
        raise ChatTemplateError("a training conversation is a list of messages ending with the assistant's")
    special = {"bos_token": bos_token, "eos_token": eos_token}
    prompt = render_chat(template, messages[:-1], add_generation_prompt=True, **special)
    whole = render_chat(template, messages, add_generation_prompt=False, **special)
    if not whole.startswith(prompt) or len(whole) == len(prompt):
        raise ChatTemplateError("the chat template renders the conversation so that its prompt is not a prefix "
                                "of it; its answer cannot be told apart")
    response = whole[len(prompt):]
    if bos_token and prompt.startswith(bos_token):
        prompt = prompt[len(bos_token):]
    return prompt, response
