"""`sparse-gguf serve` as a real subprocess on a free loopback port: a streamed chat in OpenAI's server-sent
event format, malformed JSON and bad fields answered 400 while the server keeps serving, the body size limit
(413), the max_tokens cap (clamped), a short load run (every request completes or gets 503), and a clean
exit on SIGTERM. The admission rule behind 503 is also tested alone."""

from __future__ import annotations

import http.client
import json
import pathlib
import signal
import socket
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

from load_test import free_port, rss_mib, run_load, start_server, stream_chat  # noqa: E402

CAP = 16
MAX_BODY = 8192


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "stderr.txt"
    port = free_port()
    proc = start_server(port, "--ctx", "512", "--max-tokens-cap", str(CAP), "--max-queue", "2",
                        "--queue-timeout", "10", "--max-body", str(MAX_BODY), log=log)
    yield proc, port, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def request(port: int, method: str, path: str, body=None, headers=None, chunked: bool = False):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if chunked:
            conn.request(method, path, body=iter(body), headers=hdrs, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_models(server):
    _, port, _ = server
    status, text = request(port, "GET", "/v1/models")
    d = json.loads(text)
    assert status == 200 and d["object"] == "list" and d["data"][0]["object"] == "model"


def test_streamed_chat_uses_openai_event_format(server):
    _, port, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {"messages": [{"role": "user", "content": "Name a color."}], "stream": True, "temperature": 0,
            "max_tokens": 8}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [line[6:] for line in resp.read().decode().splitlines() if line.startswith("data: ")]
    conn.close()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    # the same request without streaming gives the same text (greedy)
    status, plain = request(port, "POST", "/v1/chat/completions", json.dumps({**body, "stream": False}))
    assert status == 200 and json.loads(plain)["choices"][0]["message"]["content"] == text and text


@pytest.mark.parametrize("path, body, needle", [
    ("/v1/chat/completions", '{"messages": [{"role": "user", ', "malformed JSON"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature"),
    ("/v1/chat/completions", '{"messages": []}', "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "wizard", "content": "hi"}]}', "role"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}', "top_p"),
    ("/v1/completions", '{"prompt": "hi", "mirostat_mode": 1}', "mirostat_mode"),
    ("/v1/completions", '[1, 2, 3]', ""),
    ("/v1/completions", '{"prompt": "' + "word " * 800 + '"}', "context window"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(server, path, body, needle):
    _, port, _ = server
    status, text = request(port, "POST", path, body)
    assert status == 400, text
    err = json.loads(text)["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"
    status, text = request(port, "POST", "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 2}))
    assert status == 200 and json.loads(text)["object"] == "text_completion"


def raw_post(port: int, head: bytes, body: bytes) -> tuple[int, str]:
    """POST over a plain socket; the server may answer and close before the body is all sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        try:
            s.sendall(head + body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.decode().partition("\r\n")
    return int(status_line.split()[1]), rest.split("\r\n\r\n", 1)[1]


def test_oversized_body_gets_413(server):
    _, port, _ = server
    big = json.dumps({"prompt": "a" * (2 * MAX_BODY)}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(big)}\r\n\r\n").encode()
    status, text = raw_post(port, head, big)
    assert status == 413 and "larger than" in json.loads(text)["error"]["message"]
    # without Content-Length (chunked transfer), the limit still holds
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 1000]), big[i:i + 1000]) for i in range(0, len(big), 1000)) + b"0\r\n\r\n"
    status, _ = raw_post(port, head, body)
    assert status == 413
    assert request(port, "GET", "/v1/models")[0] == 200


def test_max_tokens_over_the_cap_is_clamped(server):
    _, port, _ = server
    body = {"prompt": "Count from one to one hundred: one, two, three,", "max_tokens": 100000, "temperature": 0}
    status, text = request(port, "POST", "/v1/completions", json.dumps(body))
    d = json.loads(text)
    assert status == 200 and d["usage"]["completion_tokens"] == CAP and d["choices"][0]["finish_reason"] == "length"


def test_short_load_every_request_completes_or_gets_503(server):
    proc, port, _ = server
    before = rss_mib(proc.pid)
    s = run_load("127.0.0.1", port, clients=8, seconds=10, max_tokens=CAP, server_pid=proc.pid)
    assert s["errors"] == 0, s["error_samples"]
    assert set(s["statuses"]) <= {"200", "503"}, s
    assert s["incomplete_200"] == 0 and s["completed"] > 0, s
    assert s["status_503"] > 0, s                       # 8 clients > 1 running + 2 queued: the bound holds
    assert proc.poll() is None
    assert s["rss_peak_mib"] < before + 300, s          # bounded: no growth with the number of requests
    # still serving after the storm
    r = stream_chat("127.0.0.1", port, {"messages": [{"role": "user", "content": "Hi"}], "stream": True,
                                        "max_tokens": 4})
    assert r["status"] == 200 and r["done"]


def test_a_client_that_hangs_up_mid_stream_frees_the_model(server):
    _, port, _ = server
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            body = json.dumps({"messages": [{"role": "user", "content": "Tell me a story."}], "stream": True}).encode()
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert b"200 OK" in s.recv(4096)                # headers (and maybe a first event), then hang up
    r = stream_chat("127.0.0.1", port, {"messages": [{"role": "user", "content": "Hi"}], "stream": True,
                                        "max_tokens": 4}, timeout=60)
    assert r["status"] == 200 and r["done"]


def test_sigterm_stops_the_server_cleanly(server):
    proc, _, log = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    err = log.read_text()
    assert "Traceback" not in err and "server stopped" in err, err


def test_admission_refuses_beyond_one_running_plus_the_queue():
    from sparse_gguf.server import Admission

    a = Admission(max_queue=2)
    assert [a.try_enter() for _ in range(4)] == [True, True, True, False]
    a.leave()
    assert a.try_enter() and not a.try_enter()


def test_sigterm_during_a_stream_ends_it_with_done_and_exits_cleanly(tmp_path):
    log = tmp_path / "stderr.txt"
    port = free_port()
    proc = start_server(port, "--ctx", "2048", "--max-tokens-cap", "1000", log=log)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            body = json.dumps({"messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
                               "stream": True, "max_tokens": 1000, "temperature": 1.0, "seed": 3}).encode()
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            data = b""
            while data.count(b'"content"') < 3:               # the reply is streaming
                data += s.recv(65536)
            proc.send_signal(signal.SIGTERM)
            while chunk := s.recv(65536):
                data += chunk
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    events = [l for l in data.decode().splitlines() if l.startswith("data: ")]   # (inside chunked framing)
    assert events[-1] == "data: [DONE]", events[-3:]
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] in ("length", "stop") and last["choices"][0]["delta"] == {}
    assert "Traceback" not in log.read_text() and "ERROR" not in log.read_text(), log.read_text()
