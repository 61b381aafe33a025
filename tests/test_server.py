"""The OpenAI-compatible server, talked to with the official ``openai`` client.

One palettized base with two adapters is served from a subprocess on 127.0.0.1 (a free port).
Answers at temperature 0 must equal ``afm_mlx.generate``'s for the same prompt and adapter; then
streaming vs not, adapter switching, prompt-prefix reuse, stop strings, a bounded load test and
50 malformed requests.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import REPO, adapter_with_updates, one_line_error, run_cli

openai = pytest.importorskip("openai")

PROMPTS = ["ROMEO.", "Enter the KING and", "O, what a"]
MAX_TOKENS = 10


def start_server(*args) -> tuple[subprocess.Popen, str]:
    """``python -m afm_mlx.server ARGS --port 0`` (an ephemeral port); returns (process, URL)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "afm_mlx.server", "--port", "0", *map(str, args)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            found = re.search(r"on (http://127\.0\.0\.1:\d+/v1)$", proc.stdout.readline().strip())
            if found:
                return proc, found.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"server did not start: {proc.stderr.read()[-3000:]}")


@pytest.fixture(scope="module")
def served(tiny_lut4_dir, tmp_path_factory):
    """(client, base id, {name: adapter dir}, generator) for a palettized base + two adapters."""
    from afm_mlx.inference.generator import Generator

    root = tmp_path_factory.mktemp("server")
    base = tiny_lut4_dir  # its folder name, "tinypal", is the base's model id
    dirs = {
        name: adapter_with_updates(base, root / name, seed=i, std=0.5)
        for i, name in enumerate(["chat", "code"])
    }
    proc, url = start_server("--model", base, *[f"--adapter={n}={d}" for n, d in dirs.items()])
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    try:
        yield client, "tinypal", dirs, Generator(base), url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def expected(gen, dirs, model_id, prompt, chat=False, max_tokens=MAX_TOKENS):
    gen.use(dirs.get(model_id))
    return gen.generate(prompt, max_tokens=max_tokens, temp=0.0, chat=chat)


def test_models_lists_the_base_and_each_adapter(served):
    client, base, dirs, _, _ = served
    assert [m.id for m in client.models.list().data] == [base, *dirs]


def test_each_adapter_answers_as_generate_does(served):
    client, base, dirs, gen, _ = served
    answers = {}
    for model_id in [base, *dirs]:
        for prompt in PROMPTS:
            r = client.completions.create(
                model=model_id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
            )
            assert r.choices[0].text == expected(gen, dirs, model_id, prompt)
            assert r.usage.completion_tokens == MAX_TOKENS
            assert r.choices[0].finish_reason == "length"
            answers[model_id, prompt] = r.choices[0].text
    # The adapters change the answers (else this test could not tell them apart).
    assert len({answers[m, PROMPTS[0]] for m in [base, *dirs]}) == 3


def test_answer_equals_the_generate_cli(served, tiny_model_dir):
    client, _, dirs, gen, _ = served
    r = client.completions.create(model="code", prompt="ROMEO.", max_tokens=8, temperature=0)
    proc = run_cli(
        "afm_mlx.generate", "--model", gen_base(gen), "--adapter", dirs["code"],
        "--prompt", "ROMEO.", "--max-tokens", "8", "--temp", "0", "--no-verbose",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == r.choices[0].text + "\n"


def gen_base(gen) -> Path:
    return Path(gen.model_path)


def test_chat_answers_as_generate_chat(served):
    client, base, dirs, gen, _ = served
    for model_id in ("chat", base):
        r = client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "Who is there?"}],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        assert r.choices[0].message.content == expected(
            gen, dirs, model_id, "Who is there?", chat=True
        )
        assert r.choices[0].message.role == "assistant"


def test_streaming_equals_not_streaming(served):
    client, _, _, _, _ = served
    kw = dict(model="chat", max_tokens=MAX_TOKENS, temperature=0)
    whole = client.completions.create(prompt="ROMEO.", **kw).choices[0].text
    parts = client.completions.create(prompt="ROMEO.", stream=True, **kw)
    assert "".join(c.choices[0].text for c in parts if c.choices) == whole
    msgs = [{"role": "user", "content": "Speak."}]
    whole = client.chat.completions.create(messages=msgs, **kw).choices[0].message.content
    chunks = list(client.chat.completions.create(messages=msgs, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_switching_adapters_a_b_a_returns_a_again(served):
    client, _, _, _, _ = served

    def ask(model_id):
        return (
            client.completions.create(
                model=model_id, prompt="O, what a", max_tokens=MAX_TOKENS, temperature=0
            )
            .choices[0]
            .text
        )

    first = ask("chat")
    assert ask("code") != first
    assert ask("chat") == first


def test_prompt_prefix_is_reused_within_one_adapter_only(served):
    client, _, dirs, gen, _ = served
    long = "Enter the KING and the QUEEN, with lords and attendants, and the PRINCE"
    kw = dict(max_tokens=MAX_TOKENS, temperature=0)
    client.completions.create(model="chat", prompt=long, **kw)
    again = client.completions.create(model="chat", prompt=long + " of Wales", **kw)
    assert again.usage.prompt_tokens_details.cached_tokens > 5
    assert again.choices[0].text == expected(gen, dirs, "chat", long + " of Wales")
    other = client.completions.create(model="code", prompt=long + " of Wales", **kw)
    assert other.usage.prompt_tokens_details.cached_tokens == 0  # never across adapters
    assert other.choices[0].text == expected(gen, dirs, "code", long + " of Wales")


def test_stop_strings_end_the_answer_before_them(served):
    client, _, dirs, gen, _ = served
    full = expected(gen, dirs, "chat", "ROMEO.", max_tokens=16)
    stop = full[4:7]
    assert stop and stop in full
    kw = dict(model="chat", prompt="ROMEO.", max_tokens=16, temperature=0, stop=[stop])
    r = client.completions.create(**kw)
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(stream=True, **kw)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full[: full.index(stop)]


def test_the_same_seed_gives_the_same_sample(served):
    client, _, _, _, _ = served
    kw = dict(model="code", prompt="ROMEO.", max_tokens=MAX_TOKENS, temperature=1.0, seed=7)
    assert client.completions.create(**kw).choices[0].text == (
        client.completions.create(**kw).choices[0].text
    )


def test_load_then_malformed_requests_then_still_serving(served):
    client, base, dirs, gen, url = served
    models = [base, *dirs]
    want = {(m, p): expected(gen, dirs, m, p) for m in models for p in PROMPTS}

    def one_client(c: int) -> list[bool]:
        ok = []
        for i in range(10):
            m, p = models[(c + i) % 3], PROMPTS[(c * 7 + i) % 3]
            r = client.completions.create(model=m, prompt=p, max_tokens=MAX_TOKENS, temperature=0)
            ok.append(r.choices[0].text == want[m, p])
        return ok

    with ThreadPoolExecutor(8) as pool:
        results = [ok for oks in pool.map(one_client, range(8)) for ok in oks]
    assert len(results) == 80 and all(results)

    good = {"model": "chat", "prompt": "ROMEO.", "max_tokens": 4, "temperature": 0}
    bad: list[tuple[int, dict]] = [
        (400, {"content": b"{not json"}),
        (400, {"content": b'{"model": "chat", "prompt": "x"'}),
        (404, {"json": {**good, "model": "no-such-adapter"}}),
        (400, {"json": {**good, "max_tokens": 10**9}}),
        (400, {"json": {**good, "max_tokens": "many"}}),
        (400, {"json": {**good, "temperature": "hot"}}),
        (400, {"json": {**good, "temperature": 9}}),
        (400, {"json": {**good, "stop": 5}}),
        (400, {"json": {**good, "prompt": ""}}),
        (400, {"json": {k: v for k, v in good.items() if k != "model"}}),
        (413, {"content": json.dumps({**good, "prompt": "x" * (2 << 20)}).encode()}),
        (400, {"json": ["a", "list"]}),
        (400, {"json": {**good, "seed": 1.5}}),
    ]
    chat_bad = [
        (400, {"json": {"model": "chat", "messages": []}}),
        (400, {"json": {"model": "chat", "messages": [{"role": "wizard", "content": "x"}]}}),
        (400, {"json": {"model": "chat", "messages": [{"role": "user", "content": 3}]}}),
    ]
    statuses = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(50):
            path, (status, kw) = (
                ("/chat/completions", chat_bad[i % len(chat_bad)])
                if i % 4 == 3
                else ("/completions", bad[i % len(bad)])
            )
            headers = {"content-type": "application/json"}
            r = http.post(path, headers=headers, **kw)
            assert r.status_code == status, (i, kw, r.status_code, r.text[:200])
            assert r.json()["error"]["message"]
            statuses.append(r.status_code)
        assert http.get("/nowhere").status_code == 404
        assert http.get("/completions").status_code == 405
    assert len(statuses) == 50 and all(400 <= s < 500 for s in statuses)
    # Still serving, and still right.
    r = client.completions.create(
        model="chat", prompt="ROMEO.", max_tokens=MAX_TOKENS, temperature=0
    )
    assert r.choices[0].text == want["chat", "ROMEO."]


def test_api_key_is_required_when_set(served, tmp_path):
    _, _, dirs, gen, _ = served
    proc, url = start_server("--model", gen_base(gen), "--api-key", "s3cret")
    try:
        anonymous = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            anonymous.models.list()
        keyed = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert [m.id for m in keyed.models.list().data] == ["tinypal"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bad_server_flags_are_one_line(served, tmp_path):
    _, _, dirs, gen, _ = served
    err = one_line_error(
        run_cli("afm_mlx.server", "--model", gen_base(gen), "--adapter", "x=" + str(tmp_path))
    )
    assert "adapter" in err
    err = one_line_error(run_cli("afm_mlx.server", "--model", gen_base(gen), "--adapter", "nodir"))
    assert "NAME=DIR" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        err = one_line_error(
            run_cli("afm_mlx.server", "--model", gen_base(gen), "--port", str(port))
        )
    assert "cannot listen" in err
