#!/usr/bin/env python3
"""The OpenAI-compatible HTTP API of a real sieved, driven by real HTTP clients.

Starts `sieved` (the embedded model, loopback ports picked by the kernel) with the HTTP API on,
and talks to it with Python's standard library only (http.client, json): unstreamed and
streamed (server-sent events) completions and chats, bad fields, unknown model, n > 1, a client
that disconnects mid-stream (its KV must be freed), /v1/models, /health, the HTTP metrics and a
clean SIGTERM drain.

    http_api_test.py --sieved build/server/sieved --source-dir .
"""
import argparse
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

ARGS = None
DAEMON = None
KV_PAGES = 2048
MAX_REQUEST_BYTES = 65536


class Daemon:
    """A sieved child process; its output is collected for failure messages."""

    def __init__(self, sieved, source_dir, workdir,
                 scheduler="max_batch_tokens: 1024\n  prefill_chunk_tokens: 256", server_extra=""):
        config = os.path.join(workdir, "http_api.yaml")
        with open(config, "w") as f:
            f.write(
                'server:\n  listen_address: "127.0.0.1:0"\n  drain_grace_period_s: 1\n'
                + server_extra +
                'metrics:\n  listen_address: "127.0.0.1:0"\n'
                f'http:\n  listen_address: "127.0.0.1:0"\n  max_request_bytes: {MAX_REQUEST_BYTES}\n'
                f'model:\n  directory: "{source_dir}/models/embedded"\n'
                f"kv_cache:\n  num_pages: {KV_PAGES}\n"
                f"scheduler:\n  {scheduler}\n"
                "logging:\n  level: info\n")
        self.proc = subprocess.Popen([sieved, "--config", config], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.http_port = None
        self.metrics_port = None

    def _read(self):
        for line in self.proc.stdout:
            with self.lock:
                self.lines.append(line)

    def logs(self):
        with self.lock:
            return "".join(self.lines)

    def wait_serving(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            logs = self.logs()
            m = re.search(r"HTTP \(OpenAI API\) listening on [^\s:]+:(\d+)", logs)
            p = re.search(r"metrics on port (\d+)", logs)
            if m and p:
                self.http_port, self.metrics_port = int(m.group(1)), int(p.group(1))
                try:
                    status, _, _ = request("GET", "/health", port=self.http_port)
                    if status == 200:
                        return
                except OSError:
                    pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("sieved did not start serving:\n" + self.logs())

    def metrics(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        return parse_metrics(text)


def parse_metrics(text):
    """Prometheus text format -> list of (name, {label: value}, value)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        out.append((m.group(1), labels, float(m.group(4))))
    return out


def metric_sum(samples, name, **labels):
    return sum(v for n, l, v in samples
               if n == name and all(l.get(k) == want for k, want in labels.items()))


def request(method, path, body=None, raw=None, timeout=60, port=None, headers=None):
    """One HTTP request; returns (status, headers, parsed JSON body or the raw text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port or DAEMON.http_port, timeout=timeout)
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    headers = dict(headers or {})
    if data is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    return resp.status, dict(resp.getheaders()), parsed


def stream(path, body, timeout=60):
    """A streamed request read to its end; returns (status, content type, events) where events
    are the parsed `data:` payloads and the string "[DONE]"."""
    conn = http.client.HTTPConnection("127.0.0.1", DAEMON.http_port, timeout=timeout)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    events = []
    if resp.status == 200:
        for line in resp:  # http.client undoes the chunked transfer encoding
            line = line.decode().rstrip("\n")
            if not line.startswith("data: "):
                continue  # blank separators and ": keep-alive" comments
            payload = line[len("data: "):]
            events.append("[DONE]" if payload == "[DONE]" else json.loads(payload))
    else:
        events.append(json.loads(resp.read().decode()))
    ctype = resp.getheader("Content-Type")
    conn.close()
    return resp.status, ctype, events


def greedy(**extra):
    body = {"model": "sieve-embedded", "prompt": "The quick brown fox jumps over",
            "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    body.update(extra)
    return body


def chat_body(**extra):
    body = {"model": "sieve-embedded", "max_tokens": 10, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "system", "content": "You are terse."},
                         {"role": "user", "content": "Name a colour."}]}
    body.update(extra)
    return body


def counts(usage):
    """A usage object's token counts; prompt_tokens_details.cached_tokens depends on what the
    prefix cache held when the request came (an earlier test's request with the same prompt)."""
    details = usage.get("prompt_tokens_details") or {}
    assert 0 <= details.get("cached_tokens", 0) <= usage["prompt_tokens"], usage
    return {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def load(samples):
    return {
        "running": metric_sum(samples, "sieve_running_requests"),
        "waiting": metric_sum(samples, "sieve_waiting_requests"),
        # Pages held by requests: used minus those only the prefix cache holds.
        "held": metric_sum(samples, "sieve_kv_pages_used") -
                metric_sum(samples, "sieve_kv_pages_cached"),
    }


def wait_idle(baseline, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = load(DAEMON.metrics())
        if now["running"] == 0 and now["waiting"] == 0 and now["held"] <= baseline["held"]:
            return now
        time.sleep(0.05)
    return load(DAEMON.metrics())


class HttpApiTest(unittest.TestCase):
    def test_health_and_models(self):
        status, headers, body = request("GET", "/health")
        self.assertEqual(status, 200)
        self.assertEqual(body, {"status": "serving"})
        status, headers, body = request("GET", "/v1/models")
        self.assertEqual(status, 200)
        self.assertEqual(body["object"], "list")
        self.assertEqual([m["id"] for m in body["data"]], ["sieve-embedded"])
        self.assertEqual(body["data"][0]["object"], "model")
        self.assertGreater(body["data"][0]["max_model_len"], 0)

    def test_completion_unstreamed(self):
        status, headers, r = request("POST", "/v1/completions", greedy())
        self.assertEqual(status, 200, r)
        self.assertTrue(headers["Content-Type"].startswith("application/json"))
        self.assertTrue(r["id"].startswith("cmpl-"))
        self.assertEqual(r["object"], "text_completion")
        self.assertEqual(r["model"], "sieve-embedded")
        self.assertLess(abs(r["created"] - time.time()), 120)
        self.assertEqual(len(r["choices"]), 1)
        choice = r["choices"][0]
        self.assertEqual(choice["index"], 0)
        self.assertEqual(choice["finish_reason"], "length")
        self.assertIsNone(choice["logprobs"])
        self.assertGreater(len(choice["text"]), 0)
        self.assertEqual(r["usage"]["completion_tokens"], 12)
        self.assertGreater(r["usage"]["prompt_tokens"], 0)
        self.assertEqual(r["usage"]["total_tokens"],
                         r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"])

    def test_completion_streamed_equals_unstreamed(self):
        _, _, whole = request("POST", "/v1/completions", greedy())
        status, ctype, events = stream("/v1/completions",
                                       greedy(stream=True, stream_options={"include_usage": True}))
        self.assertEqual(status, 200, events)
        self.assertTrue(ctype.startswith("text/event-stream"), ctype)
        self.assertEqual(events[-1], "[DONE]")
        chunks = events[:-1]
        usage_chunk = chunks[-1]
        self.assertEqual(usage_chunk["choices"], [])
        self.assertEqual(usage_chunk["usage"]["completion_tokens"], 12)
        self.assertEqual(counts(usage_chunk["usage"]), counts(whole["usage"]))
        text_chunks = chunks[:-1]
        self.assertGreaterEqual(len(text_chunks), 2)
        for c in text_chunks:
            self.assertEqual(c["object"], "text_completion")
            self.assertEqual(c["id"], text_chunks[0]["id"])
            self.assertIn("usage", c)
            self.assertIsNone(c["usage"])
        for c in text_chunks[:-1]:
            self.assertIsNone(c["choices"][0]["finish_reason"])
        self.assertEqual(text_chunks[-1]["choices"][0]["finish_reason"], "length")
        # Greedy decoding: the stream's text is the unstreamed response's.
        self.assertEqual("".join(c["choices"][0]["text"] for c in text_chunks),
                         whole["choices"][0]["text"])

    def test_stream_without_usage_has_no_usage_chunk(self):
        status, _, events = stream("/v1/completions", greedy(stream=True, max_tokens=3))
        self.assertEqual(status, 200)
        self.assertEqual(events[-1], "[DONE]")
        for c in events[:-1]:
            self.assertNotIn("usage", c)
            self.assertEqual(len(c["choices"]), 1)

    def test_token_id_prompt_logprobs_and_seed(self):
        status, _, r = request("POST", "/v1/completions",
                               greedy(prompt=[5, 17, 300, 42], logprobs=2, max_tokens=4))
        self.assertEqual(status, 200, r)
        self.assertEqual(r["usage"]["prompt_tokens"], 4)
        lp = r["choices"][0]["logprobs"]
        self.assertEqual(len(lp["tokens"]), 4)
        self.assertEqual(len(lp["token_logprobs"]), 4)
        self.assertEqual(len(lp["text_offset"]), 4)
        for value, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
            self.assertLessEqual(value, 0)
            self.assertGreaterEqual(len(top), 1)
            self.assertLessEqual(len(top), 2)
            # Greedy: the chosen token is the most likely one.
            self.assertAlmostEqual(max(top.values()), value, places=4)
        sampled = [request("POST", "/v1/completions",
                           greedy(temperature=1.0, top_p=0.9, seed=1234, max_tokens=8))[2]
                   for _ in range(2)]
        self.assertEqual(sampled[0]["choices"][0]["text"], sampled[1]["choices"][0]["text"])

    def test_stop_string(self):
        _, _, whole = request("POST", "/v1/completions", greedy(max_tokens=16))
        text = whole["choices"][0]["text"]
        self.assertGreaterEqual(len(text), 4, whole)
        stop = text[2:4]
        status, _, r = request("POST", "/v1/completions", greedy(max_tokens=16, stop=[stop]))
        self.assertEqual(status, 200, r)
        self.assertEqual(r["choices"][0]["finish_reason"], "stop")
        self.assertEqual(r["choices"][0]["text"], text[:text.index(stop)])

    def test_bad_fields_are_400_naming_the_field(self):
        cases = [
            (greedy(n=2), "n"),
            (greedy(temperature="hot"), "temperature"),
            (greedy(temperature=-1), "temperature"),
            (greedy(top_p=1.5), "top_p"),
            (greedy(max_tokens=0), "max_tokens"),
            (greedy(stop=5), "stop"),
            (greedy(logprobs=50), "logprobs"),
            (greedy(stream_options={"include_usage": True}), "stream_options"),
            (greedy(prompt=[1, "x"]), "prompt[1]"),
            (greedy(prompt=[10 ** 6]), "prompt"),
            (greedy(prompt=""), "prompt"),
            ({"model": "sieve-embedded"}, "prompt"),
            (greedy(echo=True), "echo"),
        ]
        for body, param in cases:
            with self.subTest(body=body):
                status, _, r = request("POST", "/v1/completions", body)
                self.assertEqual(status, 400, r)
                self.assertEqual(r["error"]["type"], "invalid_request_error")
                self.assertEqual(r["error"]["param"], param, r)
                self.assertTrue(r["error"]["message"])
        status, _, r = request("POST", "/v1/completions", greedy(max_tokens=10 ** 7))
        self.assertEqual(status, 400, r)
        self.assertEqual(r["error"]["code"], "context_length_exceeded")
        self.assertEqual(r["error"]["param"], "max_tokens")
        status, _, r = request("POST", "/v1/completions", raw="{not json")
        self.assertEqual(status, 400)
        self.assertIn("JSON", r["error"]["message"])
        status, _, r = request("POST", "/v1/chat/completions", chat_body(messages=[]))
        self.assertEqual(status, 400)
        self.assertEqual(r["error"]["param"], "messages")

    def test_unknown_model_route_and_large_body(self):
        status, _, r = request("POST", "/v1/completions", greedy(model="gpt-4"))
        self.assertEqual(status, 404, r)
        self.assertEqual(r["error"]["code"], "model_not_found")
        self.assertEqual(r["error"]["param"], "model")
        self.assertIn("gpt-4", r["error"]["message"])
        status, _, r = request("GET", "/v1/nothing")
        self.assertEqual(status, 404)
        self.assertIn("error", r)
        status, _, r = request("POST", "/v1/completions",
                               greedy(prompt="x " * MAX_REQUEST_BYTES))
        self.assertEqual(status, 413)
        self.assertIn("max_request_bytes", r["error"]["message"])
        # The same body sent chunked (no Content-Length) meets the same limit, and the
        # connection then serves the next request.
        conn = http.client.HTTPConnection("127.0.0.1", DAEMON.http_port, timeout=60)
        big = json.dumps(chat_body(messages=[{"role": "user",
                                               "content": "x " * MAX_REQUEST_BYTES}])).encode()
        conn.request("POST", "/v1/chat/completions",
                     body=(big[i:i + 4096] for i in range(0, len(big), 4096)),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        resp = conn.getresponse()
        r = json.loads(resp.read().decode())
        self.assertEqual(resp.status, 413, r)
        self.assertEqual(r["error"]["type"], "invalid_request_error")
        self.assertIn("max_request_bytes", r["error"]["message"])
        conn.request("POST", "/v1/completions", body=json.dumps(greedy(max_tokens=2)),
                      headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        self.assertEqual(resp.status, 200, resp.read())
        resp.read()
        # A POST without a body (no Content-Length): an OpenAI-shaped 400 at once.
        conn.request("POST", "/v1/completions")
        resp = conn.getresponse()
        r = json.loads(resp.read().decode())
        self.assertEqual(resp.status, 400, r)
        self.assertIn("JSON", r["error"]["message"])
        conn.close()

    def test_chat_unstreamed_and_streamed(self):
        status, _, whole = request("POST", "/v1/chat/completions", chat_body())
        self.assertEqual(status, 200, whole)
        self.assertTrue(whole["id"].startswith("chatcmpl-"))
        self.assertEqual(whole["object"], "chat.completion")
        message = whole["choices"][0]["message"]
        self.assertEqual(message["role"], "assistant")
        self.assertEqual(whole["choices"][0]["finish_reason"], "length")
        self.assertEqual(whole["usage"]["completion_tokens"], 10)
        status, ctype, events = stream("/v1/chat/completions",
                                       chat_body(stream=True,
                                                 stream_options={"include_usage": True}))
        self.assertEqual(status, 200, events)
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual(events[0]["object"], "chat.completion.chunk")
        self.assertEqual(events[0]["choices"][0]["delta"]["role"], "assistant")
        self.assertEqual(counts(events[-2]["usage"]), counts(whole["usage"]))
        finals = [e for e in events[:-2] if e["choices"][0]["finish_reason"]]
        self.assertEqual(len(finals), 1)
        self.assertEqual(finals[0]["choices"][0]["finish_reason"], "length")
        content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
        self.assertEqual(content, message["content"])

    def test_chat_logprobs(self):
        status, _, r = request("POST", "/v1/chat/completions",
                               chat_body(logprobs=True, top_logprobs=3, max_tokens=3))
        self.assertEqual(status, 200, r)
        content = r["choices"][0]["logprobs"]["content"]
        self.assertEqual(len(content), 3)
        for entry in content:
            self.assertEqual(len(entry["top_logprobs"]), 3)
            self.assertEqual(bytes(entry["bytes"]).decode(errors="replace"),
                             entry["token"])

    def test_disconnect_mid_stream_frees_kv(self):
        baseline = wait_idle(load(DAEMON.metrics()))
        cancelled_before = metric_sum(DAEMON.metrics(), "sieve_requests_total",
                                      outcome="cancelled")
        conn = http.client.HTTPConnection("127.0.0.1", DAEMON.http_port, timeout=60)
        conn.request("POST", "/v1/completions",
                     body=json.dumps(greedy(stream=True, max_tokens=20000)),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        self.assertEqual(resp.status, 200)
        seen = 0
        while seen < 3:
            line = resp.readline().decode()
            if line.startswith("data: "):
                seen += 1
        # Mid-stream the request holds KV pages.
        during = load(DAEMON.metrics())
        self.assertEqual(during["running"], 1)
        self.assertGreater(during["held"], baseline["held"])
        # The client goes away without reading the rest.
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        after = wait_idle(baseline)
        self.assertEqual(after["running"], 0, after)
        self.assertEqual(after["held"], baseline["held"], after)
        self.assertEqual(metric_sum(DAEMON.metrics(), "sieve_requests_total",
                                    outcome="cancelled"), cancelled_before + 1)

    def test_readme_curl_examples(self):
        """The README's curl commands (section "Over HTTP"), their routes and bodies as written."""
        with open(os.path.join(ARGS.source_dir, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        section = readme[readme.index("### Over HTTP"):]
        section = section[:section.index("\n## ")]
        commands = re.findall(r"curl -s(N?) localhost:8000(/v1/[a-z/]+) .*?-d '([^']*)'", section,
                              re.S)
        self.assertEqual([c[1] for c in commands], ["/v1/completions", "/v1/chat/completions"])
        for streamed, route, body in commands:
            with self.subTest(route=route):
                body = json.loads(body)
                if streamed:
                    status, ctype, events = stream(route, body)
                    self.assertEqual(status, 200, events)
                    self.assertTrue(ctype.startswith("text/event-stream"), ctype)
                    self.assertEqual(events[-1], "[DONE]")
                    self.assertEqual(events[0]["object"], "chat.completion.chunk")
                else:
                    status, _, r = request("POST", route, body)
                    self.assertEqual(status, 200, r)
                    self.assertEqual(r["choices"][0]["finish_reason"], "length")

    def test_disconnect_unstreamed_frees_kv(self):
        baseline = wait_idle(load(DAEMON.metrics()))
        cancelled_before = metric_sum(DAEMON.metrics(), "sieve_requests_total",
                                      outcome="cancelled")
        conn = http.client.HTTPConnection("127.0.0.1", DAEMON.http_port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(chat_body(max_tokens=20000)),
                     headers={"Content-Type": "application/json"})
        deadline = time.time() + 30
        during = load(DAEMON.metrics())
        while (during["running"] == 0 or during["held"] <= baseline["held"]) and \
                time.time() < deadline:
            time.sleep(0.05)
            during = load(DAEMON.metrics())
        self.assertEqual(during["running"], 1, during)
        # The client goes away before the answer; the server notices within about a second.
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        after = wait_idle(baseline)
        self.assertEqual(after["running"], 0, after)
        self.assertEqual(after["held"], baseline["held"], after)
        self.assertEqual(metric_sum(DAEMON.metrics(), "sieve_requests_total",
                                    outcome="cancelled"), cancelled_before + 1)

    def test_http_metrics(self):
        request("POST", "/v1/completions", greedy(max_tokens=2))
        request("POST", "/v1/completions", greedy(n=3))
        request("GET", "/health")
        m = DAEMON.metrics()
        self.assertGreaterEqual(metric_sum(m, "sieve_http_requests_total",
                                           route="/v1/completions", code="200"), 1)
        self.assertGreaterEqual(metric_sum(m, "sieve_http_requests_total",
                                           route="/v1/completions", code="400"), 1)
        self.assertGreaterEqual(metric_sum(m, "sieve_http_requests_total",
                                           route="/health", code="200"), 1)
        self.assertGreaterEqual(metric_sum(m, "sieve_http_request_duration_seconds_count",
                                           route="/v1/completions"), 2)
        for name, labels, _ in m:
            if name.startswith("sieve_http_"):
                self.assertEqual(labels.get("role"), "both")
                self.assertEqual(labels.get("model"), "sieve-embedded")


def check_queue_full(workdir):
    """A daemon that runs one request and queues one: a third gets 429 queue_full. Returns a
    list of problems."""
    d = Daemon(ARGS.sieved, os.path.abspath(ARGS.source_dir), workdir,
               scheduler="max_running_requests: 1\n  max_queued_requests: 1")
    problems = []
    streams = []
    try:
        d.wait_serving()
        for _ in range(2):  # one runs, one waits
            conn = http.client.HTTPConnection("127.0.0.1", d.http_port, timeout=60)
            conn.request("POST", "/v1/completions",
                         body=json.dumps(greedy(stream=True, max_tokens=20000)),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                problems.append(f"queue: a stream got HTTP {resp.status}")
            streams.append(conn)
            if len(streams) == 1:
                resp.readline()  # the first request runs before the second arrives
        status, _, r = request("POST", "/v1/completions", greedy(), port=d.http_port)
        if status != 429 or r["error"]["code"] != "queue_full" or \
                r["error"]["type"] != "rate_limit_error":
            problems.append(f"queue: a third request got {status} {r}, not 429 queue_full")
    finally:
        for conn in streams:
            conn.close()
        d.proc.send_signal(signal.SIGTERM)
        code = d.proc.wait(timeout=60)
        if code != 0:
            problems.append(f"queue: sieved exited with {code}")
        if problems:
            print("---- sieved (queue) output ----\n" + d.logs())
    return problems


def check_drain():
    """SIGTERM with a stream open: the stream ends with finish_reason "cancelled" once the grace
    period passes, then [DONE]; the daemon exits 0. Returns a list of problems."""
    problems = []
    conn = http.client.HTTPConnection("127.0.0.1", DAEMON.http_port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(greedy(stream=True, max_tokens=20000)),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        return [f"drain: the stream got HTTP {resp.status}"]
    events = []
    for line in resp:
        line = line.decode().rstrip("\n")
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        events.append("[DONE]" if payload == "[DONE]" else json.loads(payload))
        if len(events) == 2:
            DAEMON.proc.send_signal(signal.SIGTERM)
    conn.close()
    finals = [e for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]]
    if not events or events[-1] != "[DONE]":
        problems.append(f"drain: the stream did not end with [DONE]: {events[-2:]}")
    if [e["choices"][0]["finish_reason"] for e in finals] != ["cancelled"]:
        problems.append(f"drain: expected one final chunk with finish_reason cancelled: {finals}")
    code = DAEMON.proc.wait(timeout=60)
    if code != 0:
        problems.append(f"drain: sieved exited with {code} after SIGTERM")
    return problems


def check_auth(workdir):
    """With server.auth.tokens_file, /v1/* needs one of its bearer tokens (401 otherwise, in
    OpenAI's error shape) and /health stays open. Returns a list of problems."""
    tokens = os.path.join(workdir, "tokens")
    with open(tokens, "w") as f:
        f.write("# test tokens\ntok-http-1\n")
    d = Daemon(ARGS.sieved, os.path.abspath(ARGS.source_dir), workdir,
               server_extra=f'  auth:\n    tokens_file: "{tokens}"\n')
    problems = []
    try:
        d.wait_serving()
        for what, headers in (("no token", {}), ("a wrong token", {"Authorization": "Bearer x"})):
            status, _, r = request("POST", "/v1/completions", greedy(max_tokens=2),
                                   port=d.http_port, headers=headers)
            if status != 401 or not isinstance(r, dict) or "error" not in r:
                problems.append(f"auth: a completion with {what} got {status} {r}, not 401")
            status, _, _ = request("GET", "/v1/models", port=d.http_port, headers=headers)
            if status != 401:
                problems.append(f"auth: /v1/models with {what} got {status}, not 401")
        good = {"Authorization": "Bearer tok-http-1"}
        status, _, r = request("POST", "/v1/completions", greedy(max_tokens=2),
                               port=d.http_port, headers=good)
        if status != 200:
            problems.append(f"auth: a completion with the token got {status} {r}")
        status, _, _ = request("GET", "/v1/models", port=d.http_port, headers=good)
        if status != 200:
            problems.append(f"auth: /v1/models with the token got {status}")
        status, _, _ = request("GET", "/health", port=d.http_port)
        if status != 200:
            problems.append(f"auth: /health without a token got {status}, not 200")
        if any("tok-http-1" in line for line in d.lines):
            problems.append("auth: the token appears in the daemon's log")
    finally:
        d.proc.send_signal(signal.SIGTERM)
        code = d.proc.wait(timeout=60)
        if code != 0:
            problems.append(f"auth: sieved exited with {code}")
        if problems:
            print("---- sieved (auth) output ----\n" + d.logs())
    return problems


def main():
    global ARGS, DAEMON
    parser = argparse.ArgumentParser()
    parser.add_argument("--sieved", required=True)
    parser.add_argument("--source-dir", required=True)
    ARGS, rest = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as workdir:
        DAEMON = Daemon(ARGS.sieved, os.path.abspath(ARGS.source_dir), workdir)
        ok = False
        try:
            DAEMON.wait_serving()
            result = unittest.main(argv=[sys.argv[0]] + rest, exit=False, verbosity=2).result
            ok = result.wasSuccessful()
            problems = (check_queue_full(tempfile.mkdtemp(dir=workdir)) + check_drain()
                        + check_auth(tempfile.mkdtemp(dir=workdir)))
            for p in problems:
                print(p)
            ok = ok and not problems
            if not problems:
                print("queue: a third request got 429 queue_full")
                print("drain: the open stream ended with finish_reason cancelled; sieved exited 0")
                print("auth: 401 without or with a wrong token, 200 with it, /health open")
        finally:
            if DAEMON.proc.poll() is None:
                DAEMON.proc.kill()
            if not ok:
                print("---- sieved output ----\n" + DAEMON.logs())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
