"""Chat templates: a model's own Jinja template (``tokenizer_config.json``'s ``chat_template``), rendered
as Hugging Face ``transformers`` renders it, in Jinja's immutable sandbox (a template is data from a
downloaded folder: it may not reach Python objects beyond the messages it is given).

The sandbox bounds what a template may touch, not what it may cost: ``{% for i in range(10**5) %}`` nested
twice, ``lipsum(10**6)`` or ``'w' * 10**9`` would take minutes or gigabytes. So templates render in a
worker process of their own (``python -m unmask.data.chat``, started at the first render and kept), under
a time budget (:data:`RENDER_SECONDS`), an address-space limit (:data:`RENDER_BYTES`) and an output limit
(:data:`RENDER_CHARS`); a worker past its budget is killed and the next render starts a new one. The
caller gets a one-line :class:`ChatTemplateError` naming what the template exceeded, and the process that
asked (a server, a training run) goes on.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from jinja2 import DictLoader, TemplateError, TemplateNotFound
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")
RENDER_SECONDS = 3.0  # a real template renders in milliseconds
RENDER_BYTES = 1 << 30  # the worker's address space
RENDER_CHARS = 4_000_000  # longer than any model's context


class ChatTemplateError(ValueError):
    """A template that does not render, or messages it refuses."""


def _raise(message: str):
    raise ChatTemplateError(message)


def render_unbounded(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                     special_tokens: dict[str, str], max_chars: int = RENDER_CHARS) -> str:
    """The rendering itself, in the sandbox and in this process (the worker's side: no time or memory
    bound here). ``{% include %}`` and ``{% import %}`` find no template; output beyond ``max_chars`` and
    recursion are errors."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, loader=DictLoader({}))
    env.globals["raise_exception"] = _raise
    try:
        pieces, length = [], 0
        for piece in env.from_string(template).generate(messages=messages,
                                                         add_generation_prompt=add_generation_prompt,
                                                         **special_tokens):
            length += len(piece)
            if length > max_chars:
                raise ChatTemplateError(f"the chat template renders more than {max_chars:,} characters")
            pieces.append(piece)
        return "".join(pieces)
    except TemplateNotFound as exc:
        raise ChatTemplateError(f"the chat template includes or imports {exc.name!r}: a chat template is one "
                                f"template") from None
    except TemplateError as exc:  # syntax errors, undefined names, the sandbox's SecurityError
        raise ChatTemplateError(f"the chat template does not render: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise ChatTemplateError("the chat template does not render: it recurses without end") from None
    except MemoryError:
        raise ChatTemplateError(f"the chat template needs more than {RENDER_BYTES >> 20} MiB to render") from None


class TemplateWorker:
    """The process that renders templates: one JSON request per line on its stdin, one JSON answer per
    line on its stdout; renders are one at a time (a lock), each within :data:`RENDER_SECONDS`."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.lock = threading.Lock()
        atexit.register(self.stop)

    def render(self, request: dict, seconds: float) -> str:
        """The text the worker renders for ``request`` (started or restarted as needed); a :class:`ChatTemplateError`
        when it fails, or gives no answer within ``seconds``."""
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                package_root = str(Path(__file__).resolve().parents[2])  # this copy of unmask, installed or not
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root,
                                                                                os.environ.get("PYTHONPATH")])))
                self.process = subprocess.Popen([sys.executable, "-m", "unmask.data.chat"], stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
            try:
                self.process.stdin.write(json.dumps(request).encode() + b"\n")
                self.process.stdin.flush()
                line = self._read_line(time.monotonic() + seconds)
            except BrokenPipeError:
                line = None
            if line is None:
                ran_out = self.process.poll() is None
                self.stop()
                if ran_out:
                    raise ChatTemplateError(f"the chat template did not render within {seconds:g} s")
                raise ChatTemplateError(f"the chat template worker stopped while rendering (the template needs more "
                                        f"than {RENDER_BYTES >> 20} MiB, or the worker could not run)")
        answer = json.loads(line)
        if "error" in answer:
            raise ChatTemplateError(answer["error"])
        return answer["text"]

    def _read_line(self, deadline: float) -> bytes | None:
        """The worker's next answer, or None when it does not come before ``deadline`` or the worker ends."""
        out, chunks = self.process.stdout.fileno(), []
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([out], [], [], left)[0]:
                return None
            chunk = os.read(out, 1 << 20)
            if not chunk:
                return None
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                return b"".join(chunks)

    def stop(self) -> None:
        """Kill the worker process, if one runs, and wait for it to end."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            self.process = None


WORKER = TemplateWorker()


def render_chat(template: str, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                **special_tokens: str) -> str:
    """The prompt text of ``messages`` (``[{"role": ..., "content": ...}]``) under ``template``, ending
    with the assistant's turn opened when ``add_generation_prompt``. ``special_tokens`` (``bos_token``,
    ``eos_token``, ...) are visible to the template, as ``transformers`` passes them. Rendered by the
    template worker within its bounds (module docstring)."""
    for m in messages:
        if set(m) != {"role", "content"} or m["role"] not in ROLES or not isinstance(m["content"], str):
            raise ChatTemplateError(f"a message is {{'role': one of {', '.join(ROLES)}, 'content': text}}, got {m!r}")
    return WORKER.render(dict(template=template, messages=messages, add_generation_prompt=add_generation_prompt,
                              special_tokens=special_tokens), RENDER_SECONDS)


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


def serve() -> None:
    """The worker's loop (``python -m unmask.data.chat``): its address space limited, it answers each
    request line until its stdin closes."""
    resource.setrlimit(resource.RLIMIT_AS, (RENDER_BYTES, RENDER_BYTES))
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            answer = {"text": render_unbounded(**request)}
        except ChatTemplateError as exc:
            answer = {"error": str(exc)}
        except Exception as exc:  # whatever a template provokes is that template's error
            answer = {"error": f"the chat template does not render: {type(exc).__name__}"}
        sys.stdout.buffer.write(json.dumps(answer).encode() + b"\n")
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    serve()
