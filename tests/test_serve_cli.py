"""`mlxqwen serve` as users start it, with the demo model on both backends: answers equal the
Python API's, the API key, body limit, port clash, library-only pull and delete, the model
pool's memory policy, and a bounded load test."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import anthropic
import httpx
import ollama
import openai
import pytest
from serving import free_port, running, serve_command

import mlxqwen
from mlxqwen import demo
from mlxqwen.cli import main
from mlxqwen.library import LocalModel
from mlxqwen.server import ModelPool
from mlxqwen.server.errors import APIError

pytest.importorskip("llama_cpp")

KEY = "test-key-123"
QUESTIONS = ["What is 12 + 30?", "What is 7 + 8?", "What is the capital of France?", "What is 9 - 4?"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A data folder whose library holds two models, the demo's MLX form alone (`tiny-4bit`, which
    runs on MLX) and its GGUF (`tiny-Q4_K_M.gguf`), and an empty HF cache."""
    root = tmp_path_factory.mktemp("home")
    library = root / "data" / "models"
    shutil.copytree(demo.model_path("mlx"), library / "tiny-4bit", ignore=shutil.ignore_patterns("*.gguf"))
    shutil.copy(demo.model_path("gguf"), library / "tiny-Q4_K_M.gguf")
    return root


@pytest.fixture(scope="module")
def env(home):
    return {"MLXQWEN_DATA_DIR": str(home / "data"), "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def server(home, env):
    with running(serve_command("--api-key", KEY, "--max-body-mb", "0.05"), home / "serve.log", env) as server:
        yield server


@pytest.fixture(scope="module")
def reference():
    """Greedy answers without thinking from the Python API, per backend."""
    llms = {
        "tiny-4bit": mlxqwen.load(demo.model_path("mlx"), backend="mlx"),
        "mlxqwen-demo": mlxqwen.load("mlxqwen-demo"),  # its GGUF, on llama.cpp
    }
    return {(name, q): llm.generate(q, temperature=0, think=False) for name, llm in llms.items() for q in QUESTIONS}


@pytest.mark.parametrize("model", ["tiny-4bit", "mlxqwen-demo"])
def test_answers_equal_the_python_api_in_every_dialect(server, reference, model):
    auth = {"Authorization": f"Bearer {KEY}"}
    ollama_client = ollama.Client(host=server.url, headers=auth)
    openai_client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    anthropic_client = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)  # sends x-api-key
    for q in QUESTIONS:
        expected = reference[(model, q)]
        said = ollama_client.chat(model, [{"role": "user", "content": q}], think=False, options={"temperature": 0})
        assert said.message.content == expected
        done = openai_client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": q}], temperature=0, reasoning_effort="none"
        )
        assert done.choices[0].message.content == expected
        reply = anthropic_client.messages.create(
            model=model,
            max_tokens=200,
            thinking={"type": "disabled"},
            messages=[{"role": "user", "content": q}],
            extra_body={"temperature": 0},  # this client version has no temperature argument
        )
        assert reply.content[-1].text == expected


def test_api_key_is_required_in_each_dialect(server):
    for path, body, shape in [
        ("/api/chat", {}, lambda j: j["error"]),
        ("/v1/chat/completions", {}, lambda j: j["error"]["type"] == "authentication_error" and j["error"]["message"]),
        ("/v1/messages", {}, lambda j: j["error"]["type"] == "authentication_error" and j["error"]["message"]),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
            r = httpx.post(server.url + path, json=body, headers=headers)
            assert r.status_code == 401 and "API key" in shape(r.json())
    assert httpx.get(f"{server.url}/api/tags", headers={"x-api-key": KEY}).status_code == 200


def test_bodies_over_the_limit_are_a_413(server):
    big = {"model": "mlxqwen-demo", "prompt": "x" * 100_000}
    r = httpx.post(f"{server.url}/api/generate", json=big, headers={"x-api-key": KEY})
    assert r.status_code == 413 and "over the server's limit" in r.json()["error"]
    chunks = (b"x" * 20_000 for _ in range(5))  # no Content-Length: counted as it arrives
    r = httpx.post(f"{server.url}/v1/messages", content=chunks, headers={"x-api-key": KEY})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"


def test_models_listed_pulled_and_deleted_only_in_the_library(server, home):
    headers = {"x-api-key": KEY}
    names = {m["name"] for m in httpx.get(f"{server.url}/api/tags", headers=headers).json()["models"]}
    assert {"tiny-4bit", "tiny-Q4_K_M.gguf", "mlxqwen-demo"} <= names
    for name, arch in [("tiny-4bit", "qwen3_5"), ("tiny-Q4_K_M.gguf", "qwen35"), ("mlxqwen-demo", "qwen3_5")]:
        shown = ollama.Client(host=server.url, headers=headers).show(name)
        assert shown.modelinfo["general.architecture"] == arch and "enable_thinking" in shown.template
        assert {"completion", "tools", "thinking"} <= set(shown.capabilities)
    r = httpx.post(f"{server.url}/api/pull", json={"model": "Qwen/Qwen3-0.6B"}, headers=headers)
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines[0] == {"status": "pulling manifest"} and "HF_HUB_OFFLINE is set" in lines[-1]["error"]
    r = httpx.request("DELETE", f"{server.url}/api/delete", json={"model": "mlxqwen-demo"}, headers=headers)
    assert r.status_code == 403
    r = httpx.request("DELETE", f"{server.url}/api/delete", json={"model": "tiny-4bit:latest"}, headers=headers)
    assert r.status_code == 200 and not (home / "data" / "models" / "tiny-4bit").exists()
    names = {m["name"] for m in httpx.get(f"{server.url}/api/tags", headers=headers).json()["models"]}
    assert "tiny-4bit" not in names


def test_a_taken_port_is_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"mlxqwen serve: error: port {port} on 127.0.0.1 is taken (Ollama or another server?); choose one with --port N"
    )


def test_listening_beyond_loopback_warns_without_a_key(monkeypatch, capsys):
    import uvicorn

    from mlxqwen import serve_cli

    assert serve_cli._loopback("localhost") and serve_cli._loopback("::1") and not serve_cli._loopback("0.0.0.0")
    monkeypatch.setattr(serve_cli, "_loopback", lambda host: False)  # as for --host 0.0.0.0, without binding it
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: None)
    assert main(["serve", "--port", str(free_port())]) == 0
    assert "warning: listening on 127.0.0.1 without --api-key" in capsys.readouterr().err
    assert main(["serve", "--port", str(free_port()), "--api-key", "k"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_serve_loads_models_with_the_options_given(monkeypatch):
    import uvicorn

    from mlxqwen import server

    seen = {}

    def pool(models, keep_alive, load):
        seen.update(load.keywords)
        return ModelPool(models, keep_alive=keep_alive, load=load)

    monkeypatch.setattr(server, "ModelPool", pool)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: None)
    assert main(["serve", "--port", str(free_port()), "--no-mtp", "--kv-bits", "8", "--max-queue", "0"]) == 0
    assert seen == {
        "backend": "auto",
        "max_context": None,
        "kv_bits": 8,
        "rope_scaling": None,
        "mtp": False,
        "parallel": "pipeline",
        "max_queue": 0,
    }


def test_pool_keeps_models_within_the_memory_budget():
    """LRU eviction to make room, a model too big for the machine refused with what fits, keep-alive 0."""

    def model(name: str, size: int) -> LocalModel:
        return LocalModel(name, Path(name), "mlx", "path", size, 0.0, "4-bit")

    loaded: list[str] = []

    async def scenario():
        pool = ModelPool(
            [model("a", 40), model("b", 40), model("c", 40), model("huge", 500)],
            keep_alive=None,
            load=lambda path: loaded.append(str(path)) or SimpleNamespace(name="fake", close=lambda: None),
            budget=100,
        )
        for name in ("a", "b"):
            pool.release(await pool.acquire(name, None))
        busy = await pool.acquire("a", None)  # a is used last, and is busy
        c = await pool.acquire("c", None)  # no room for three: b (least recently used, idle) goes
        assert sorted(pool.resident) == ["a", "c"]
        with pytest.raises(APIError) as e:
            await pool.acquire("b", None)  # a and c busy: no room now
        assert e.value.status == 503
        pool.release(busy)
        pool.release(c)
        with pytest.raises(APIError) as e:
            await pool.acquire("huge", None)
        assert e.value.status == 507 and "models that fit: a, b, c" in e.value.message
        pool.release(await pool.acquire("a:latest", 0))  # keep_alive 0: unloaded once idle
        assert sorted(pool.resident) == ["c"]

    asyncio.run(scenario())
    assert loaded == ["a", "b", "c"]


def test_bounded_load(server, reference):
    """16 clients x 5 requests, streamed or not, one in four leaving early: every request gets its
    own answer (or a 503), and the server's memory comes back near where it started."""
    model, headers = "mlxqwen-demo", {"x-api-key": KEY}

    def rss() -> int:
        status = Path(f"/proc/{server.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) * 1024

    def ask(client: httpx.Client, q: str, stream: bool, leave: bool) -> str | None:
        body = {"model": model, "messages": [{"role": "user", "content": q}], "think": False, "stream": stream}
        body["options"] = {"temperature": 0}
        if not stream:
            r = client.post(f"{server.url}/api/chat", json=body)
            return "503" if r.status_code == 503 else r.json()["message"]["content"]
        with client.stream("POST", f"{server.url}/api/chat", json=body) as r:
            if r.status_code == 503:
                return "503"
            text = ""
            for line in r.iter_lines():
                text += json.loads(line)["message"]["content"]
                if leave:
                    return None
            return text

    ask(httpx.Client(headers=headers, timeout=120), QUESTIONS[0], False, False)  # loaded and warm
    baseline = rss()
    results: list[tuple[str, str | None, bool]] = []
    errors: list[BaseException] = []

    def client(i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(headers=headers, timeout=120) as c:
            for _ in range(5):
                q, stream = rng.choice(QUESTIONS), rng.random() < 0.5
                leave = stream and rng.random() < 0.25
                try:
                    results.append((q, ask(c, q, stream, leave), leave))
                except BaseException as e:  # noqa: BLE001 (reported below)
                    errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and len(results) == 80 and time.monotonic() - start < 600
    for q, answer, left in results:
        assert left or answer in (reference[(model, q)], "503")
    time.sleep(1)
    assert rss() < baseline * 1.25 + 64 * 2**20


# --- the batched engine: prefix cache and queue -----------------------------------------------


def _turn(dialect: str, client, model: str, history: list[dict]) -> tuple[str, int]:
    """One stateless turn: the answer, and how many prompt tokens the server computed."""
    if dialect == "ollama":
        r = client.chat(model, history, think=False, options={"temperature": 0})
        return r.message.content, r.prompt_eval_count
    if dialect == "openai":
        r = client.chat.completions.create(model=model, messages=history, temperature=0, reasoning_effort="none")
        return r.choices[0].message.content, r.usage.prompt_tokens - r.usage.prompt_tokens_details.cached_tokens
    r = client.messages.create(
        model=model, max_tokens=200, thinking={"type": "disabled"}, messages=history, extra_body={"temperature": 0}
    )
    return r.content[-1].text, r.usage.input_tokens


@pytest.mark.parametrize("dialect", ["ollama", "openai", "anthropic"])
def test_stateless_ten_turn_chat_computes_only_each_new_turn(server, dialect):
    """Each turn resends the whole conversation; the prefix cache leaves only what is new since the
    last turn's prompt to compute, and the answers are those of the Python API without any cache."""
    model = "mlxqwen-demo"
    client = {
        "ollama": lambda: ollama.Client(host=server.url, headers={"x-api-key": KEY}),
        "openai": lambda: openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0),
        "anthropic": lambda: anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0),
    }[dialect]()
    llm = mlxqwen.load(demo.model_path("gguf"))
    history: list[dict] = []
    before = 0  # prompt tokens of the previous turn
    for turn in range(10):
        history.append({"role": "user", "content": f"What is {turn + 3} + {2 * turn}?"})
        answer, computed = _turn(dialect, client, model, history)
        assert answer == llm.generate(history, temperature=0, think=False)
        prompt = len(llm.tokenizer.encode(llm.prompt_text(history, think=False)))
        if turn:
            assert computed <= prompt - before  # the last reply and the new question, never the history
        history.append({"role": "assistant", "content": answer})
        before = prompt


def test_a_full_queue_is_a_503_with_retry_after(home, env):
    command = serve_command("mlxqwen-demo", "--max-concurrent", "1", "--max-queue", "1")
    with running(command, home / "queue.log", env) as server:
        body = {"model": "mlxqwen-demo", "prompt": "What is 12 + 30?", "stream": False}
        with httpx.Client(timeout=120) as c:
            results: list[httpx.Response] = []
            threads = [
                threading.Thread(target=lambda: results.append(c.post(f"{server.url}/api/generate", json=body)))
                for _ in range(8)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
        refused = [r for r in results if r.status_code == 503]
        assert refused and all(r.status_code in (200, 503) for r in results) and len(results) == 8
        assert all(r.headers["Retry-After"] and "busy" in r.json()["error"] for r in refused)
        r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "x", "messages": []})
        assert r.status_code == 400
