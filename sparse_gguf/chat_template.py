"""Render a model's chat template (Jinja2, from the untrusted GGUF file) in a sandbox with bounds.

As llama-cpp-python does (llama_chat_format.Jinja2ChatFormatter): ImmutableSandboxedEnvironment, trim_blocks,
lstrip_blocks, loop controls, the `{% generation %}` pass-through, its `tojson`, `raise_exception` and
`strftime_now`, so prompts are identical. On top of the sandbox (which already blocks attribute access to
internals and caps `range` at 100000 items):

* time: a trace function checks a deadline on every line the compiled template executes (Jinja compiles
  templates to Python), so loops that print nothing are stopped too; works in any thread, unlike SIGALRM;
* output: the prompt is generated in pieces and refused once longer than MAX_OUTPUT_CHARS;
* `*` and `**` are intercepted so that `'x' * 10**9` or `10**10**10` cannot build a huge value in one
  C-level step the time bound could not interrupt.

Every failure -- syntax error, `raise_exception`, sandbox violation, a bound -- is one SparseGGUFError line.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any

from .errors import SparseGGUFError

MAX_TEMPLATE_CHARS = 1 << 20      # the template source
MAX_OUTPUT_CHARS = 4 << 20        # the rendered prompt
MAX_SECONDS = 5.0                 # rendering time
MAX_POW_EXPONENT = 256


class TemplateLimit(Exception):
    pass


@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple, bytes)) and isinstance(n, int):
                        if len(seq) * max(n, 0) > MAX_OUTPUT_CHARS:
                            raise TemplateLimit(f"the template builds a value of more than {MAX_OUTPUT_CHARS} items")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_POW_EXPONENT:
                raise TemplateLimit(f"the template raises to the power {right}")
            return super().call_binop(context, operator, left, right)

    env = BoundedSandbox(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                         extensions=[Jinja2ChatFormatter.IgnoreGenerationTags, jinja2.ext.loopcontrols])
    env.filters["tojson"] = Jinja2ChatFormatter.tojson
    return env, Jinja2ChatFormatter.strftime_now


class _Deadline:
    """sys.settrace hook that raises TemplateLimit once the deadline passes (checked on every line)."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def __call__(self, frame, event, arg):
        if time.monotonic() > self.end:
            raise TemplateLimit(f"rendering took longer than {self.seconds:g} s")
        return self

    def __enter__(self):
        self.saved = sys.gettrace()
        sys.settrace(self)
        return self

    def __exit__(self, *exc):
        sys.settrace(self.saved)
        return False


def render_chat_template(template: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                         add_generation_prompt: bool = True, max_seconds: float = MAX_SECONDS,
                         max_chars: int = MAX_OUTPUT_CHARS, **kwargs: Any) -> str:
    """The prompt text `template` makes of `messages`; SparseGGUFError (one line) if it fails or runs away."""
    import jinja2

    if len(template) > MAX_TEMPLATE_CHARS:
        raise SparseGGUFError(f"chat template is {len(template)} characters long (limit {MAX_TEMPLATE_CHARS})")

    def raise_exception(message: str):
        raise ValueError(message)

    env, strftime_now = _environment()
    pieces: list[str] = []
    try:
        with _Deadline(max_seconds):
            compiled = env.from_string(template)
            n = 0
            for piece in compiled.generate(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                           add_generation_prompt=add_generation_prompt,
                                           raise_exception=raise_exception, strftime_now=strftime_now,
                                           **kwargs):
                n += len(piece)
                if n > max_chars:
                    raise TemplateLimit(f"the prompt grew past {max_chars} characters")
                pieces.append(piece)
    except TemplateLimit as e:
        raise SparseGGUFError(f"chat template stopped: {e}") from None
    except jinja2.TemplateSyntaxError as e:
        raise SparseGGUFError(f"chat template has a syntax error (line {e.lineno}): {_one_line(e)}") from None
    except (RecursionError, MemoryError) as e:
        raise SparseGGUFError(f"chat template failed to render: {type(e).__name__}") from None
    except Exception as e:      # raise_exception, SecurityError, TypeError, UndefinedError, ...
        raise SparseGGUFError(f"chat template failed to render: {_one_line(e)}") from None
    return "".join(pieces)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:299] + "…"
