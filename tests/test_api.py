"""SparseLlama against llama_cpp.Llama on the default model: the same dict shapes key by key, the same prompt
tokens, greedy continuations that agree with llama.cpp, greedy determinism, streaming equal to
non-streaming, stop strings, KV-cache reuse across calls, and bad arguments refused."""

from __future__ import annotations

import pytest

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a color."}]
AGREE_TOKENS = 3   # greedy tokens that must equal llama.cpp's; the engines differ in the last bits (README)


@pytest.fixture(scope="module")
def llama_ref(default_model):
    import llama_cpp

    from sparse_gguf.tokenizer import quiet_stderr

    with quiet_stderr():
        return llama_cpp.Llama(model_path=str(default_model), n_ctx=512, verbose=False, seed=1)


def shape(obj):
    """Keys in order and value types, recursively: what code consuming the dicts relies on."""
    if isinstance(obj, dict):
        return [(k, shape(v)) for k, v in obj.items()]
    if isinstance(obj, list):
        return [shape(v) for v in obj]
    return type(obj).__name__


def first_tokens(llm, text: str, n: int) -> list[int]:
    return llm.tokenize(text.encode(), add_bos=False)[:n]


def test_completion_matches_llama_cpp(sparse_llm, llama_ref):
    ours = sparse_llm.create_completion(PROMPT, max_tokens=8, temperature=0)
    ref = llama_ref.create_completion(PROMPT, max_tokens=8, temperature=0)
    assert shape(ours) == shape(ref)
    assert ours["object"] == ref["object"] == "text_completion"
    assert ours["id"].startswith("cmpl-") and ours["model"] == ref["model"]
    assert ours["usage"] == ref["usage"]                       # same prompt tokens, 8 generated
    assert ours["choices"][0]["finish_reason"] == ref["choices"][0]["finish_reason"] == "length"
    assert first_tokens(llama_ref, ours["choices"][0]["text"], AGREE_TOKENS) == \
        first_tokens(llama_ref, ref["choices"][0]["text"], AGREE_TOKENS)


def test_chat_completion_matches_llama_cpp(sparse_llm, llama_ref):
    ours = sparse_llm.create_chat_completion(CHAT, max_tokens=8, temperature=0)
    ref = llama_ref.create_chat_completion(CHAT, max_tokens=8, temperature=0)
    assert shape(ours) == shape(ref)
    assert ours["object"] == "chat.completion" and ours["id"].startswith("chatcmpl-")
    assert ours["usage"] == ref["usage"]                       # the same chat template, the same prompt tokens
    assert ours["choices"][0]["message"]["role"] == "assistant"
    assert first_tokens(llama_ref, ours["choices"][0]["message"]["content"], AGREE_TOKENS) == \
        first_tokens(llama_ref, ref["choices"][0]["message"]["content"], AGREE_TOKENS)


def _first_middle_last(chunks):
    assert len(chunks) >= 3
    return chunks[0], chunks[1], chunks[-1]


def test_chat_stream_chunks_match_llama_cpp(sparse_llm, llama_ref):
    ours = list(sparse_llm.create_chat_completion(CHAT, max_tokens=4, temperature=0, stream=True))
    ref = list(llama_ref.create_chat_completion(CHAT, max_tokens=4, temperature=0, stream=True))
    for a, b in zip(_first_middle_last(ours), _first_middle_last(ref)):
        assert shape(a) == shape(b)
    first, middle, last = _first_middle_last(ours)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == first["id"] for c in ours)
    assert first["choices"][0]["delta"] == {"role": "assistant"} and first["choices"][0]["finish_reason"] is None
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in ours[1:-1])
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "length"


def test_completion_stream_chunks_match_llama_cpp(sparse_llm, llama_ref):
    ours = list(sparse_llm.create_completion(PROMPT, max_tokens=3, temperature=0, stream=True))
    ref = list(llama_ref.create_completion(PROMPT, max_tokens=3, temperature=0, stream=True))
    for a, b in zip(_first_middle_last(ours), _first_middle_last(ref)):
        assert shape(a) == shape(b)
    assert [c["choices"][0]["finish_reason"] for c in ours] == [None] * (len(ours) - 1) + ["length"]
    assert ours[-1]["choices"][0]["text"] == ""


def test_tokenize_and_detokenize_match_llama_cpp(sparse_llm, llama_ref):
    for text in (b"Hello world", "Ünïcode – ok? 数字 42".encode(), b"<|im_start|>user"):
        for special in (False, True):
            assert sparse_llm.tokenize(text, special=special) == llama_ref.tokenize(text, special=special)
        ids = llama_ref.tokenize(text, add_bos=False)
        assert sparse_llm.detokenize(ids) == llama_ref.detokenize(ids)


def test_greedy_is_deterministic_and_streaming_equals_non_streaming(sparse_llm):
    msgs = [{"role": "user", "content": "Write one sentence about rivers."}]
    a = sparse_llm.create_chat_completion(msgs, max_tokens=24, temperature=0)
    b = sparse_llm.create_chat_completion(msgs, max_tokens=24, temperature=0)
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    chunks = list(sparse_llm.create_chat_completion(msgs, max_tokens=24, temperature=0, stream=True))
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == a["choices"][0]["message"]["content"] and streamed
    assert chunks[-1]["choices"][0]["finish_reason"] == a["choices"][0]["finish_reason"]
    c = sparse_llm(PROMPT, max_tokens=12, temperature=0)
    streamed = "".join(ch["choices"][0]["text"] for ch in sparse_llm(PROMPT, max_tokens=12, temperature=0, stream=True))
    assert streamed == c["choices"][0]["text"]


def test_same_seed_same_sampled_text(sparse_llm):
    kw = dict(max_tokens=8, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = sparse_llm(PROMPT, seed=42, **kw)["choices"][0]["text"]
    assert sparse_llm(PROMPT, seed=42, **kw)["choices"][0]["text"] == a
    others = {sparse_llm(PROMPT, seed=s, **kw)["choices"][0]["text"] for s in (1, 2, 3)}
    assert others != {a}                                      # the seed does change the draw
    for extra in ({"mirostat_mode": 2}, {"top_h": 0.9}):
        x = sparse_llm(PROMPT, seed=7, **kw, **extra)["choices"][0]["text"]
        assert sparse_llm(PROMPT, seed=7, **kw, **extra)["choices"][0]["text"] == x


def test_stop_strings_end_the_text_in_both_modes(sparse_llm):
    prompt = "Count: one, two, three,"
    full = sparse_llm(prompt, max_tokens=16, temperature=0)["choices"][0]["text"]
    i = full.find(",", 1)
    assert i > 0, full                                        # the model does go on with the list
    stop = full[i:i + 4]             # from the greedy text itself (which item comes next differs between CPUs)
    cut = sparse_llm(prompt, max_tokens=16, temperature=0, stop=[stop])
    assert cut["choices"][0]["text"] == full[:full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    streamed = "".join(c["choices"][0]["text"] for c in
                       sparse_llm(prompt, max_tokens=16, temperature=0, stop=stop, stream=True))
    assert streamed == cut["choices"][0]["text"]


def test_a_follow_up_turn_prefills_only_its_new_tokens(sparse_llm):
    msgs = [{"role": "user", "content": "Name a fruit."}]
    first = sparse_llm.create_chat_completion(msgs, max_tokens=8, temperature=0)
    msgs += [first["choices"][0]["message"], {"role": "user", "content": "And a vegetable?"}]
    evaluated = []
    real_eval = sparse_llm.model.eval
    sparse_llm.model.eval = lambda tokens, *a, **k: (evaluated.append(len(tokens)), real_eval(tokens, *a, **k))[1]
    try:
        second = sparse_llm.create_chat_completion(msgs, max_tokens=4, temperature=0)
    finally:
        del sparse_llm.model.eval
    prompt_tokens = second["usage"]["prompt_tokens"]
    assert evaluated[0] < prompt_tokens - first["usage"]["prompt_tokens"] + 2, (evaluated, prompt_tokens)


def test_bad_calls_raise_value_errors(sparse_llm):
    with pytest.raises(ValueError, match="exceed context window"):
        sparse_llm("word " * 600, max_tokens=4)
    with pytest.raises(ValueError, match="not supported"):
        sparse_llm(PROMPT, max_tokens=4, grammar="root ::= 'a'")
    with pytest.raises(ValueError, match="mirostat_mode"):
        sparse_llm(PROMPT, max_tokens=4, mirostat_mode=1)


def test_engine_arguments_are_forwarded_and_llama_cpp_ones_accepted(tiny_model):
    from sparse_gguf import SparseLlama

    path = tiny_model("llama", "Q8_0")
    llm = SparseLlama(str(path), n_ctx=64, n_gpu_layers=99, n_batch=8, use_mmap=False, dense=True, verbose=False)
    assert llm.model.dense is True and llm.n_ctx() == 64
    out = llm("hello", max_tokens=3, temperature=0)
    assert out["usage"]["completion_tokens"] <= 3
    with pytest.raises(TypeError):
        SparseLlama(str(path), n_ctx=64, no_such_engine_option=1, verbose=False)
