"""Chat templates come from the (untrusted) model file: sparse_gguf.chat_template renders them in Jinja2's
immutable sandbox as llama-cpp-python does (same prompt), and turns every failure or runaway -- syntax errors,
raise_exception, unsafe attribute access, endless loops with or without output, huge values, recursion --
into one SparseGGUFError line, within bounded time and output."""

from __future__ import annotations

import time

import pytest

from sparse_gguf.chat_template import render_chat_template
from sparse_gguf.errors import SparseGGUFError

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}]


def test_same_prompt_as_llama_cpp_python(default_model):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from sparse_gguf.tokenizer import Tokenizer

    tok = Tokenizer(default_model)
    for add in (True, False):
        ref = Jinja2ChatFormatter(tok.chat_template, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                  add_generation_prompt=add)(messages=MESSAGES).prompt
        got = render_chat_template(tok.chat_template, MESSAGES, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   add_generation_prompt=add)
        assert got == ref
        assert "2+2?" in got
    ids = tok.chat_prompt(MESSAGES)
    assert tok.decode(ids).endswith("2+2?\nassistant\n")


BAD = {
    "raise_exception": ("{{ raise_exception('only user and assistant roles') }}", "only user and assistant"),
    "syntax error": ("{% for m in %}", "syntax error"),
    "unsafe attribute": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    "mutation": ("{{ messages.append(1) }}", "unsafe"),
    "recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    "huge string": ("{{ 'x' * 10**9 }}", "more than"),
    "huge list": ("{{ ([1] * 100000) * 100000 }}", "more than"),
    "huge power": ("{{ 7 ** 100000000 }}", "power"),
    "undefined call": ("{{ nothing() }}", "failed to render"),
    "output runaway": ("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
                       "grew past"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_template_one_line(case):
    template, needle = BAD[case]
    with pytest.raises(SparseGGUFError) as e:
        render_chat_template(template, MESSAGES, max_chars=100_000)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_silent_endless_loop_stopped():
    """A loop that prints nothing is stopped by the time bound (the output bound cannot see it)."""
    template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}done"
    t0 = time.monotonic()
    with pytest.raises(SparseGGUFError, match="longer than 0.3 s"):
        render_chat_template(template, MESSAGES, max_seconds=0.3)
    assert time.monotonic() - t0 < 60          # hang guard: unbounded this runs for hours


def test_time_bound_restores_tracing():
    import sys

    before = sys.gettrace()
    render_chat_template("{{ messages[0]['content'] }}", MESSAGES)
    assert sys.gettrace() is before


def test_template_too_long():
    with pytest.raises(SparseGGUFError, match="characters long"):
        render_chat_template("x" * (2 << 20), MESSAGES)


def test_tokenizer_chat_prompt_uses_the_bounds(tmp_path):
    """A model file whose template runs away: chat_prompt raises one line instead of hanging."""
    from gguf import GGUFValueType as VT

    from gguf_fuzz import small_model
    from sparse_gguf.tokenizer import Tokenizer

    p = small_model(tmp_path / "t.gguf", kv={"tokenizer.chat_template": (BAD["huge string"][0], VT.STRING)})
    with pytest.raises(SparseGGUFError, match="chat template"):
        Tokenizer(p).chat_prompt(MESSAGES)
