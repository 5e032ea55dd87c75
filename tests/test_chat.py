"""`sparse-gguf chat`: the session logic on a tiny model (oldest turns dropped when the context fills, never
a crash; multi-line input; /system, /clear, --save), and the real command driven through a pseudo-terminal
on the default model: type, read the streamed reply, Ctrl-C in mid-reply, carry on, /stats, exit."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys

import pytest

from sparse_gguf.chat import ChatSession, read_message, run_chat
from sparse_gguf.sampling import SamplingParams

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_session_parts(tiny_model):
    from sparse_gguf.model import Model
    from sparse_gguf.tokenizer import Tokenizer

    path = tiny_model("llama", "Q8_0")
    return Model(path, n_ctx=160), Tokenizer(path)


def feeder(lines):
    it = iter(lines)

    def input_fn(prompt: str = "") -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return input_fn


def test_multi_line_input():
    assert read_message(feeder(["one \\", "two \\", "three"])) == "one \ntwo \nthree"
    assert read_message(feeder(['"""first', "second", 'third"""'])) == "first\nsecond\nthird"
    assert read_message(feeder(['"""', "a", '"""'])) == "a"
    assert read_message(feeder(['"""inline"""'])) == "inline"
    assert read_message(feeder(["plain"])) == "plain"


def test_context_fills_oldest_turns_are_dropped_never_a_crash(tiny_session_parts):
    model, tok = tiny_session_parts
    session = ChatSession(model, tok, SamplingParams(temperature=0), system="Be brief.", max_tokens=24)
    notices, replies = [], []
    for i in range(12):
        stats = session.reply(f"Message number {i}: tell me about apples and pears.", replies.append, notices.append)
        assert stats.stop in ("eog", "length", "context")
        assert model.n_past <= model.n_ctx
    assert any("dropped" in n for n in notices), notices
    assert session.messages[0] == {"role": "system", "content": "Be brief."}     # the system prompt stays
    assert "Message number 11" in session.messages[-2]["content"]
    # a single message longer than the context is refused with a notice, and the session carries on
    notices.clear()
    stats = session.reply("pear " * 400, replies.append, notices.append)
    assert stats.stop == "context" and any("too long" in n for n in notices)
    assert session.reply("Hello again.", replies.append, notices.append).stop in ("eog", "length")


def test_a_turn_prefills_only_its_new_tokens(tiny_session_parts):
    model, tok = tiny_session_parts
    session = ChatSession(model, tok, SamplingParams(temperature=0), max_tokens=4)
    first = session.reply("Hi there.", lambda s: None)
    second = session.reply("And again.", lambda s: None)
    full = len(tok.chat_prompt(session.messages[:-1]))
    assert first.prompt_tokens == len(tok.chat_prompt(session.messages[:1]))
    assert second.prompt_tokens < full - first.prompt_tokens + 8, (second.prompt_tokens, full)


def test_commands_and_save(tiny_session_parts, tmp_path):
    model, tok = tiny_session_parts
    session = ChatSession(model, tok, SamplingParams(temperature=0), max_tokens=4)
    out, notes = [], []
    save = tmp_path / "conv.json"
    run_chat(session, out.append, notes.append, feeder(["/help", "/stats", "/system Speak like a pirate.",
                                                        "Hello", "/stats", "/nope", "/exit", "never read"]),
             interactive=False, save=save)
    text = "\n".join(notes)
    assert "/system TEXT" in text and "[no reply yet]" in text and "[system prompt set]" in text
    assert "active FFN fraction" in text and "attended tokens per step" in text and "unknown command" in text
    saved = json.loads(save.read_text())["messages"]
    assert saved[0] == {"role": "system", "content": "Speak like a pirate."}
    assert saved[1] == {"role": "user", "content": "Hello"} and saved[2]["role"] == "assistant"
    run_chat(session, out.append, notes.append, feeder(["/clear"]), interactive=False, save=save)
    assert json.loads(save.read_text())["messages"] == [{"role": "system", "content": "Speak like a pirate."}]


def test_chat_through_a_pseudo_terminal(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    save = tmp_path / "conv.json"
    # Warm the Numba cache on the same paths first (a long prompt's prefill, decode): on a clean checkout the
    # first use of a kernel compiles it, and a Ctrl-C landing during a compile is handled only afterwards,
    # when a short reply may already be over.
    # One thread: with the other test worker busy on both cores, the 2-thread decode (a parallel region per kernel
    # call, each waiting for its slowest thread) slowed so much that the reply to "Bye." outlasted the 180 s timeout
    # in a full run (the whole test takes 12 s alone)
    warm = subprocess.run([sys.executable, "-m", "cli", "chat", "--temp", "0", "--max-tokens", "4", "--ctx", "2048",
                           "--threads", "1"],
                          cwd=REPO, input="Write a very long story about a dragon, with many chapters.\n",
                          capture_output=True, text=True, timeout=600)
    assert warm.returncode == 0, warm.stderr
    # 400 tokens: seconds of streaming for the Ctrl-C to land in, and a bound on every reply (the greedy reply to
    # "Bye." after the stopped story can run on to the limit; 1500 tokens of it outlasted the timeout on a loaded
    # machine)
    child = pexpect.spawn(sys.executable, ["-m", "cli", "chat", "--temp", "0", "--max-tokens", "400", "--ctx", "2048",
                                           "--threads", "1", "--save", str(save)],
                          cwd=str(REPO), encoding="utf-8", timeout=180, dimensions=(40, 200),
                          # a test run started in the background (`cmd &` in a script) ignores SIGINT, and the
                          # child would inherit that: give it the default disposition, as a terminal's shell does
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        child.expect("stops a reply")
        child.expect("> ")
        child.sendline("Name a color.")
        child.expect(r"\[ Prompt: .* t/s \]")                       # streamed reply, then the speed line
        first_reply = child.before
        assert len(first_reply.strip()) > 5
        child.expect("> ")
        child.sendline("Write a very long story about a dragon, with many chapters.")
        child.expect_exact("many chapters.\r\n")                  # the terminal's echo of the input
        child.expect(r"\w+ \w+ \w+")                                # the reply is streaming
        child.sendintr()                                            # Ctrl-C in mid-reply
        child.expect(r"\[reply stopped\]")
        child.expect("> ")
        child.sendline("/stats")
        child.expect("stop: interrupted")
        child.expect("> ")
        child.sendline("Thanks! \\")                                # multi-line: continues on the next line
        child.expect(r"\.\.\. ")
        child.sendline("Bye.")
        child.expect(r"\[ Prompt: .* t/s \]")
        child.expect("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    msgs = json.loads(save.read_text())["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
    assert len(msgs[3]["content"].split()) >= 3                  # the stopped reply was kept as far as it got
    assert msgs[4]["content"] == "Thanks! \nBye."
