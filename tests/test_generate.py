"""The generation loop (sparse_gguf.generate) on a tiny model: it samples what a plain loop samples, a prompt
sharing a prefix with the cache evaluates only the rest, stop strings are cut and never streamed, and it
stops at an end-of-generation token, max_tokens, a full context or cancel(), saying why. A scripted sampler
chooses the tokens where the test needs known text."""

from __future__ import annotations

import pytest

from sparse_gguf.generate import Generator, held_back, stop_list
from sparse_gguf.sampling import Sampler, SamplingParams


@pytest.fixture(scope="module")
def parts(tiny_model):
    from sparse_gguf.model import Model
    from sparse_gguf.tokenizer import Tokenizer

    path = tiny_model("llama", "Q8_0")
    return Model(path, n_ctx=96), Tokenizer(path)


@pytest.fixture
def gen(parts):
    """A fresh Generator whose model counts the tokens of every eval call (gen.evals)."""
    model, tok = parts
    g = Generator(model, tok)
    g.reset()
    g.evals = []
    real_eval = type(model).eval
    model.eval = lambda tokens, *a, **k: (g.evals.append(len(tokens)), real_eval(model, tokens, *a, **k))[1]
    yield g
    del model.eval


class Script:
    """A sampler that returns the given tokens in turn and notes the tokens it was shown (prev)."""

    def __init__(self, tokens):
        self.tokens, self.seen = list(tokens), []

    def __call__(self, logits, prev=None):
        self.seen.append(list(prev))
        return self.tokens.pop(0)


def words(tok, text: str) -> list[int]:
    return tok.encode(text, add_bos=False)


def run_all(gen, prompt, sampler, max_tokens, **kw):
    run, pieces = gen.generate(prompt, sampler, max_tokens, **kw)
    return run, list(pieces)


def test_samples_what_a_plain_loop_samples(gen, parts):
    model, tok = parts
    prompt = words(tok, "Once upon a time, in a quiet village,")
    params = SamplingParams(temperature=0.9, seed=3, repeat_penalty=1.2)
    run, pieces = run_all(gen, prompt, Sampler(params), 12)
    model.reset()
    sampler, ids, logits = Sampler(params), list(prompt), model.eval(prompt)
    for _ in range(12):
        t = sampler(logits, ids)
        if tok.is_eog(t):
            break
        ids.append(t)
        logits = model.eval([t])
    assert run.tokens == ids[len(prompt):] and len(run.tokens) > 0
    assert "".join(pieces) == tok.decode(run.tokens)


def test_a_prompt_sharing_the_cache_evaluates_only_its_new_tokens(gen, parts):
    model, tok = parts
    first = words(tok, "The river runs to the sea, and the sea")
    run, _ = run_all(gen, first, Script(words(tok, " is deep and wide and blue")), 4)
    assert run.prefilled == len(first) and gen.evals == [len(first), 1, 1, 1]   # the last token not evaluated
    assert model.n_past == len(first) + 3 and gen.cached == first + run.tokens[:3]
    second = first + run.tokens + words(tok, ". Where does the river")
    gen.evals.clear()
    run2, _ = run_all(gen, second, Script(words(tok, " go")), 1)
    assert run2.prefilled == len(second) - len(first) - 3 and gen.evals == [run2.prefilled]
    # the same prompt again: its logits are kept, nothing is evaluated before the first sample
    gen.evals.clear()
    script = Script(words(tok, " go"))
    run3, _ = run_all(gen, second, script, 1)
    assert run3.prefilled == 0 and gen.evals == [] and script.seen == [second]
    # a prompt that diverges inside the cache keeps only the shared part
    third = second[:5] + words(tok, " cat")
    gen.evals.clear()
    assert run_all(gen, third, Script([1]), 1)[0].prefilled == len(third) - 5 and gen.evals == [len(third) - 5]


def test_a_model_reset_behind_its_back_means_a_full_prefill(gen, parts):
    model, tok = parts
    prompt = words(tok, "One, two, three")
    run_all(gen, prompt, Script([11, 12]), 2)
    model.reset()
    gen.evals.clear()
    assert run_all(gen, prompt, Script([11]), 1)[0].prefilled == len(prompt) and gen.evals == [len(prompt)]
    gen.reset()
    assert run_all(gen, prompt, Script([11]), 1)[0].prefilled == len(prompt)


def test_the_sampler_sees_the_prompt_and_the_tokens_so_far(gen, parts):
    _, tok = parts
    prompt, reply = words(tok, "Hello there"), words(tok, " and welcome back")
    script = Script(reply)
    run, _ = run_all(gen, prompt, script, len(reply))
    assert script.seen == [prompt + reply[:i] for i in range(len(reply))]


@pytest.mark.parametrize("stop", [" four", [" four", "seven"], [" fo", "zzz"], "r, f"])
def test_stop_strings_are_cut_and_never_streamed(gen, parts, stop):
    _, tok = parts
    text = "one, two, three, four, five, six"
    run, pieces = run_all(gen, words(tok, "Count:"), Script(words(tok, text)), 40, stop=stop)
    cut = text[:min(text.find(s) for s in stop_list(stop) if s in text)]
    assert "".join(pieces) == cut and run.stop == "stop" and all(pieces)
    assert len(run.tokens) < len(words(tok, text))        # it stopped at the token completing the stop string


def test_text_that_might_start_a_stop_string_is_held_back_until_it_does_not(gen, parts):
    _, tok = parts
    text = "one, two, three, four"
    streamed = []
    run, pieces = gen.generate(words(tok, "Count:"), Script(words(tok, text)), len(words(tok, text)),
                               stop=[", four!"])
    for piece in pieces:
        streamed.append(piece)
        assert not "".join(streamed).endswith((",", ", f", ", fo", ", fou")), streamed
    assert "".join(streamed) == text and run.stop == "length"
    assert held_back("abc, fo", [", four!"]) == 4 and held_back("abc", [", four!"]) == 0
    assert stop_list(None) == [] and stop_list("x") == ["x"] and stop_list(["", "y"]) == ["y"]


def test_max_tokens_stops_with_length(gen, parts):
    model, tok = parts
    prompt = words(tok, "A long story:")
    run, pieces = run_all(gen, prompt, Script(words(tok, " and then, and then, and then")), 5)
    assert len(run.tokens) == 5 and run.stop == "length" and model.n_past == len(prompt) + 4
    run, pieces = run_all(gen, prompt, Script([]), 0)
    assert run.tokens == [] and pieces == [] and run.stop == "length"
    # eval_last (the chat): the last token is evaluated too, a decode step like the others
    steps = []
    run, _ = run_all(gen, prompt, Script(words(tok, " and then, and then, and then")), 5, eval_last=True,
                     on_step=lambda m: steps.append(m.n_past))
    assert len(run.tokens) == 5 and run.stop == "length" and model.n_past == len(prompt) + 5
    assert gen.cached == prompt + run.tokens and steps == [len(prompt) + k for k in range(1, 6)]


def test_an_end_of_generation_token_stops_and_is_not_emitted(gen, parts):
    _, tok = parts
    reply = words(tok, " Fine, thanks.")
    run, pieces = run_all(gen, words(tok, "How are you?"), Script(reply + [tok.eos_id, 42]), 20)
    assert run.tokens == reply and run.stop == "eog" and "".join(pieces) == " Fine, thanks."


def test_a_full_context_stops_the_reply(gen, parts):
    model, tok = parts
    prompt = (words(tok, "word ") * model.n_ctx)[:model.n_ctx - 4]
    run, _ = run_all(gen, prompt, Script([7] * 50), 50)
    # every token but the last was evaluated, and the cache is full
    assert run.stop == "context" and len(run.tokens) == 5 and model.n_past == model.n_ctx


def test_cancel_and_the_step_hook(gen, parts):
    model, tok = parts
    asked, steps = [], []

    def cancel() -> bool:
        asked.append(1)
        return len(asked) == 3

    run, pieces = run_all(gen, words(tok, "Go on:"), Script([300] * 20), 20, cancel=cancel,
                          on_step=lambda m: steps.append(m.n_past))
    assert run.stop == "cancelled" and len(run.tokens) == 3 and len(asked) == 3
    assert steps == [len(words(tok, "Go on:")) + 1, len(words(tok, "Go on:")) + 2]   # after each decode step


def test_streaming_never_splits_a_utf8_character(gen, parts):
    _, tok = parts
    text = "日本語のテキスト, café ☕"
    ids = words(tok, text)
    assert any("\ufffd" in tok.decode([t]) for t in ids)     # some tokens are parts of a character
    run, pieces = run_all(gen, words(tok, "Say:"), Script(ids), len(ids))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    # cut inside a character: the dangling bytes come out at the end, as the detokenizer renders them
    k = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    run, pieces = run_all(gen, words(tok, "Say:"), Script(ids), k)
    assert "".join(pieces) == tok.decode(ids[:k]) and pieces[-1].endswith("\ufffd")
