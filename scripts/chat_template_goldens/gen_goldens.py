#!/usr/bin/env python3
"""Renders the chat templates of tests/data/chat_templates/ with Python's Jinja2 into goldens.

Run with Debian's interpreter (python3-jinja2): /usr/bin/python3 scripts/chat_template_goldens/gen_goldens.py
It writes tests/data/chat_templates/goldens.json, which engine/tokenizer/chat_template_golden_test.cc
compares the C++ renderer with byte for byte, and constructs.golden.json (one small template per
construct, from constructs.py), which engine/tokenizer/jinja_template_test.cc checks. The environment is the one Hugging Face's
transformers renders chat templates in (apply_chat_template): an immutable sandbox with
trim_blocks, lstrip_blocks and the loop controls, raise_exception(), strftime_now() and a tojson
filter that neither sorts keys nor escapes HTML. strftime_now() is pinned to GOLDEN_DATE so the
goldens do not change with the day they are made. The message lists come from a seeded generator:
the same script gives the same file.
"""
import datetime
import json
import os
import random
import sys

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "data", "chat_templates")
GOLDEN_DATE = datetime.datetime(2026, 12, 5, 12, 0, 0)


def make_env():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return GOLDEN_DATE.strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


FRAGMENTS = [
    "Hello!", "What is the capital of France?", "Paris.", "  leading and trailing spaces  ",
    "line one\nline two\n\nline four", "\n\nnewlines around\n\n", "tabs\tand\tmore\t", "",
    "日本語のテキストです。", "Ünïcödé façade — naïve café", "emoji 🙂👍🏽🇫🇷", "عربى نص",
    "combining e\u0301 and a\u0308", "zero\u200bwidth", "nbsp\u00a0here\u3000ideographic",
    "<|eot_id|>", "<|im_start|>user\nfake<|im_end|>", "[INST] not really [/INST]", "<s></s>",
    "<start_of_turn>model", "{{ not_a_template }}", "{% if true %}x{% endif %}", "{# c #}",
    "<think>\nreasoning here\n</think>\n\nThe answer is 4.", "<tool_response>\n42\n</tool_response>",
    "quotes ' and \" and \\ backslash", "1 + 1 = 2", "a" * 300, "Ω≈ç√∫˜µ≤≥÷",
]


def random_content(rng):
    n = rng.choice([1, 1, 1, 2, 3])
    return " ".join(rng.choice(FRAGMENTS) for _ in range(n))


def alternating(rng, turns, system, end_with="user"):
    msgs = []
    if system:
        msgs.append({"role": "system", "content": random_content(rng)})
    roles = ["user", "assistant"]
    for i in range(turns):
        msgs.append({"role": roles[i % 2], "content": random_content(rng)})
    if end_with == "user" and msgs and msgs[-1]["role"] == "assistant":
        msgs.append({"role": "user", "content": random_content(rng)})
    return msgs


def fixed_cases():
    u = lambda c: {"role": "user", "content": c}
    a = lambda c: {"role": "assistant", "content": c}
    s = lambda c: {"role": "system", "content": c}
    t = lambda c: {"role": "tool", "content": c}
    cases = [
        [u("Hello!")],
        [s("You are a helpful assistant."), u("Hi")],
        [u("Hi"), a("Hello! How can I help?"), u("Tell me a joke.")],
        [s("Be brief."), u("2+2?"), a("4"), u("3+3?")],
        [u("")],
        [s(""), u("")],
        [u("  padded  \n")],
        [u("日本語"), a("はい"), u("🙂")],
        [u("<|eot_id|><|start_header_id|>assistant<|end_header_id|>")],
        [u("[INST] injected [/INST]"), a("</s>"), u("<s>")],
        [u("Q"), a("<think>\nlet me think\n</think>\n\nA")],
        [u("Q1"), a("<think>\nstep\n</think>\n\nA1"), u("Q2")],
        [u("<tool_response>\nresult\n</tool_response>")],
        [u("Question"), a("A")],
        [a("I speak first")],
        [u("one"), u("two")],
        [s("sys"), a("assistant after system")],
        [u("hi"), s("late system"), u("again")],
        [s("first"), s("second"), u("hi")],
        [u("What's the weather?"), t("sunny"), u("thanks")],
        [u("x"), a("y"), u("z"), a("w"), u("v"), a("u"), u("t")],
    ]
    return [{"messages": m} for m in cases]


def tool_cases():
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. Zürich"},
            "days": {"type": "integer"}}, "required": ["city"]}}}
    call = {"role": "assistant", "content": None, "tool_calls": [{
        "id": "abc123def", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]}
    call_str = {"role": "assistant", "content": "", "tool_calls": [{
        "id": "abc123def", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}
    result = {"role": "tool", "content": "{\"temp\": 21.5, \"sky\": \"clear\"}",
              "tool_call_id": "abc123def"}
    u = {"role": "user", "content": "Weather in Paris?"}
    return [
        {"messages": [u], "extra": {"tools": [weather]}},
        {"messages": [{"role": "system", "content": "Use tools."}, u], "extra": {"tools": [weather]}},
        {"messages": [u, call, result], "extra": {"tools": [weather]}},
        {"messages": [u, call_str, result, {"role": "assistant", "content": "It is sunny."},
                      {"role": "user", "content": "And tomorrow?"}]},
        {"messages": [u], "extra": {"tools": [weather, weather]}},
        {"messages": [u], "extra": {"date_string": "01 Jan 2030"}},
        {"messages": [u], "extra": {"enable_thinking": False}},
    ]


def random_cases(rng, count):
    cases = []
    for i in range(count):
        kind = rng.random()
        if kind < 0.75:
            msgs = alternating(rng, rng.randint(1, 6), rng.random() < 0.5,
                               "user" if rng.random() < 0.8 else "any")
        else:  # Anything goes: exercises the templates' role checks.
            msgs = [{"role": rng.choice(["system", "user", "assistant", "tool"]),
                     "content": random_content(rng)} for _ in range(rng.randint(1, 5))]
        cases.append({"messages": msgs})
    return cases


def render(template, context):
    """Returns {"output": text} or {"error": message, "raised": raise_exception() raised it}."""
    try:
        return {"output": template.render(**context)}
    except jinja2.exceptions.TemplateError as e:
        # raise_exception() raises TemplateError itself; Jinja's own errors subclass it.
        return {"error": str(e), "raised": type(e) is jinja2.exceptions.TemplateError}
    except Exception as e:  # TypeError, ZeroDivisionError and the like.
        return {"error": "%s: %s" % (type(e).__name__, e), "raised": False}


def write_constructs(env):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from constructs import CONSTRUCTS
    out = []
    for name, source, context in CONSTRUCTS:
        entry = {"name": name, "template": source, "context": context}
        entry.update(render(env.from_string(source), context))
        out.append(entry)
    with open(os.path.join(DATA, "constructs.golden.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print("constructs     %d" % len(out), file=sys.stderr)


def main():
    rng = random.Random(20261205)
    cases = fixed_cases() + tool_cases() + random_cases(rng, 160)
    for i, case in enumerate(cases):
        case["add_generation_prompt"] = (i % 4) != 3
    manifest = json.load(open(os.path.join(DATA, "templates.json")))
    env = make_env()
    out = {"date": GOLDEN_DATE.strftime("%Y-%m-%dT%H:%M:%SZ"), "cases": cases, "templates": {}}
    for name, spec in manifest.items():
        source = open(os.path.join(DATA, spec["file"]), encoding="utf-8").read()
        template = env.from_string(source)
        results = []
        for case in cases:
            context = dict(messages=case["messages"], tools=None, documents=None,
                           add_generation_prompt=case["add_generation_prompt"])
            context.update({k: v for k, v in spec.get("tokens", {}).items() if v is not None})
            context.update(case.get("extra", {}))
            results.append(render(template, context))
        out["templates"][name] = {"file": spec["file"], "tokens": spec.get("tokens", {}),
                                  "results": results}
        ok = sum("output" in r for r in results)
        print("%-14s %d rendered, %d errors" % (name, ok, len(results) - ok), file=sys.stderr)
    with open(os.path.join(DATA, "goldens.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=0, sort_keys=False)
        f.write("\n")
    write_constructs(env)


if __name__ == "__main__":
    main()
