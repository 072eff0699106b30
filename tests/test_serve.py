"""The per-user steering server over real HTTP on loopback, on a tiny finished run.

Servers run as subprocesses (``python -m scripts.serve``) on free ports, started once per
module; the official ``openai`` client and raw ``httpx`` talk to them.  The run has stages
01-05 done for every algorithm (LoRA adapters included), so task-mode answers can be held
against stage 05's ``generations.jsonl``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from data_process.artifact_io import read_jsonl
from tests.conftest import ROOT, run_stage
from tests.test_pipeline import write_config, write_fixture

ALGOS = ["zeroshot", "rag", "steer", "fints", "oppu", "oppu+fints"]
KEY = "test-key-0123456789"
MODEL = "tiny_llama"  # --served-name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama_dir):
    """A finished tiny run: stages 01-04, per-user adapters and 05 for every algorithm."""
    root = tmp_path_factory.mktemp("serve_run")
    config = write_config(root / "config.json", root / "run", write_fixture(root / "raw"), tiny_llama_dir)
    settings = json.loads(config.read_text())
    settings["train_lora"] = {"history_k": 2, "max_prompt_tokens": 256}
    config.write_text(json.dumps(settings))
    for name in ("select_users", "rank_history", "collect_pairs", "extract_vectors"):
        run_stage(name, ["--config", str(config)])
    run_stage("train_lora", ["--config", str(config), "--lr", "0.05", "--epochs", "1", "--rank", "4"])
    for algo in ALGOS:
        run_stage("generate", ["--config", str(config), "--algo", algo])
    (root / "key").write_text(KEY + "\n")
    return config, root / "run"


class Server:
    """``python -m scripts.serve`` on a free port; :meth:`wait` until it answers /health."""

    def __init__(self, config: Path, log: Path, *flags: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scripts.serve", "--config", str(config), "--port", str(self.port),
             "--served-name", MODEL, "--threads", "1", "--log-level", "WARNING", *flags],
            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def wait(self) -> Server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError(f"the server did not answer /health:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def servers(tiny_run, tmp_path_factory):
    """Three servers of the same run, started together (loading overlaps):

    * ``main``: an API key, small limits, a 100 ms collection window;
    * ``patient``: answers unknown users zero-shot; batches of 2, a queue of 2, a 1 s window;
    * ``hasty``: a 1.2 s window but a 0.3 s deadline, so a lone request always times out.
    """
    config, run_dir = tiny_run
    logs = tmp_path_factory.mktemp("logs")
    started = {
        "main": Server(config, logs / "main.log", "--api-key-file", str(run_dir.parent / "key"),
                       "--batch-window-ms", "100", "--max-body-bytes", "20000", "--max-tokens-limit", "64",
                       "--max-input-tokens", "400"),
        "patient": Server(config, logs / "patient.log", "--unknown-user", "zeroshot", "--max-batch-size", "2",
                          "--max-queue", "2", "--batch-window-ms", "1000"),
        "hasty": Server(config, logs / "hasty.log", "--batch-window-ms", "1200", "--request-timeout-s", "0.3"),
    }
    try:
        yield {name: srv.wait() for name, srv in started.items()}
    finally:
        for srv in started.values():
            srv.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers["main"]


@pytest.fixture(scope="module")
def patient_server(servers):
    return servers["patient"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def http(server, path: str, body=None, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
    if body is None:
        return httpx.get(server.url + path, headers=headers, timeout=60, **kwargs)
    content = json.dumps(body) if isinstance(body, (dict, list)) else body  # str, bytes or an iterator
    return httpx.post(server.url + path, content=content, headers=headers, timeout=60, **kwargs)


def samples(run_dir: Path, split: str = "seen_test") -> list[dict]:
    return read_jsonl(run_dir / "ranked" / f"{split}.jsonl")


def stage05(run_dir: Path, algo: str) -> dict[str, str]:
    return {r["id"]: r["generation"] for r in read_jsonl(run_dir / "generations" / "seen_test" / algo /
                                                          "generations.jsonl")}


@pytest.mark.parametrize("algo", ALGOS)
def test_task_mode_answers_equal_stage_05s_generations_for_every_algorithm(tiny_run, client, algo):
    _, run_dir = tiny_run
    expected = stage05(run_dir, algo)
    for sample in samples(run_dir):
        reply = client.completions.create(model=MODEL, prompt=sample["input"], user=sample["user_id"],
                                          extra_body={"fints": {"algo": algo}})
        assert reply.choices[0].text == expected[sample["id"]], sample["id"]
        assert reply.usage.prompt_tokens > 0 and reply.model == MODEL


def test_task_mode_through_the_chat_endpoint_equals_stage_05_too(tiny_run, client):
    _, run_dir = tiny_run
    sample = samples(run_dir)[0]
    reply = client.chat.completions.create(model=MODEL, user=sample["user_id"],
                                           messages=[{"role": "user", "content": sample["input"]}],
                                           extra_body={"fints": {"algo": "fints", "mode": "task"}})
    assert reply.choices[0].message.content == stage05(run_dir, "fints")[sample["id"]]


def test_an_unseen_user_without_vectors_gets_the_rag_answer_and_a_note(tiny_run, server):
    _, run_dir = tiny_run
    sample = samples(run_dir, "unseen_test")[0]
    answers = {}
    for algo in ("rag", "fints"):
        reply = http(server, "/v1/completions", {"model": MODEL, "user": sample["user_id"], "prompt": sample["input"],
                                                "fints": {"algo": algo}})
        assert reply.status_code == 200 and reply.headers["x-fints-algo"] == algo
        answers[algo] = reply.json()["choices"][0]["text"]
    assert answers["fints"] == answers["rag"] and "no steering vectors" in reply.headers["x-fints-note"]


def test_overrides_change_the_steering_multiplier_zero_equals_rag(tiny_run, client):
    _, run_dir = tiny_run
    rag = stage05(run_dir, "rag")
    for sample in samples(run_dir)[:3]:
        def ask(sample=sample, **fints):
            return client.completions.create(model=MODEL, prompt=sample["input"], user=sample["user_id"],
                                             extra_body={"fints": {"algo": "fints", **fints}}).choices[0].text
        assert ask(multipliers=[0.0]) == rag[sample["id"]]
        assert ask(multipliers=[50.0], top_pairs=2) != rag[sample["id"]]  # the vectors do steer


def chat(client, user: str, text: str, **fints) -> str:
    return client.chat.completions.create(model=MODEL, user=user, max_tokens=12, messages=[
        {"role": "system", "content": "You write headlines."}, {"role": "user", "content": text}],
        extra_body={"fints": fints}).choices[0].message.content


def test_chat_mode_sends_the_messages_as_given_and_only_steers(tiny_run, client):
    _, run_dir = tiny_run
    user = samples(run_dir)[0]["user_id"]
    plain = chat(client, user, "a new compiler for rust", algo="zeroshot")
    assert chat(client, user, "a new compiler for rust", algo="fints", multipliers=[0.0]) == plain
    assert chat(client, user, "a new compiler for rust", algo="fints", multipliers=[50.0]) != plain
    assert chat(client, user, "a new compiler for rust", algo="steer", multipliers=[50.0]) != plain


def text(reply: dict) -> str:
    """The answer of a completion or chat completion body."""
    choice = reply["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def test_a_burst_of_concurrent_requests_for_different_users_equals_each_sent_alone(tiny_run, server):
    _, run_dir = tiny_run
    bodies = []
    for i, sample in enumerate(samples(run_dir) + samples(run_dir, "unseen_test")):
        algo = ["fints", "steer", "rag", "oppu+fints", "zeroshot", "oppu"][i % 6]
        bodies.append(("/v1/completions", {"model": MODEL, "user": sample["user_id"], "prompt": sample["input"],
                                           "fints": {"algo": algo}}))
        bodies.append(("/v1/chat/completions", {
            "model": MODEL, "user": sample["user_id"], "max_tokens": 4 + 3 * i,
            "messages": [{"role": "user", "content": sample["input"][:60]}],
            "fints": {"algo": "fints" if i % 2 else "steer"}}))
    sampled = dict(bodies[0][1], temperature=0.9, seed=5, top_p=0.9)
    bodies.append(("/v1/completions", sampled))
    alone = [http(server, path, body).json() for path, body in bodies]
    before = http(server, "/health").json()
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda pb: http(server, *pb).json(), bodies))
    after = http(server, "/health").json()
    assert [text(r) for r in together] == [text(r) for r in alone]
    assert text(together[-1]) != text(together[0])  # the sampled request did sample
    rows, batches = after["rows"] - before["rows"], after["batches"] - before["batches"]
    assert rows == len(bodies) and batches < rows / 2  # the burst really was batched


def test_streaming_reassembles_to_the_non_streaming_text(tiny_run, client, server):
    _, run_dir = tiny_run
    sample = samples(run_dir)[1]
    args = dict(model=MODEL, user=sample["user_id"], max_tokens=24)
    whole = client.chat.completions.create(messages=[{"role": "user", "content": sample["input"]}], **args)
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        messages=[{"role": "user", "content": sample["input"]}], stream=True, **args) if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content and len(pieces) > 2
    text = client.completions.create(prompt=sample["input"], extra_body={"fints": {"algo": "rag"}}, **args)
    streamed = client.completions.create(prompt=sample["input"], extra_body={"fints": {"algo": "rag"}},
                                         stream=True, stream_options={"include_usage": True}, **args)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text.choices[0].text
    assert chunks[-1].usage.completion_tokens == text.usage.completion_tokens
    raw = http(server, "/v1/completions", {"model": MODEL, "user": sample["user_id"], "prompt": "x", "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_stop_sequences_and_max_tokens_end_the_answer(tiny_run, client):
    _, run_dir = tiny_run
    sample = samples(run_dir)[0]
    args = dict(model=MODEL, user=sample["user_id"], messages=[{"role": "user", "content": sample["input"]}])
    full = client.chat.completions.create(max_tokens=30, **args)
    short = client.chat.completions.create(max_tokens=3, **args)
    assert short.usage.completion_tokens <= 3 and short.choices[0].finish_reason == "length"
    stop = full.choices[0].message.content[3:6]
    cut = client.chat.completions.create(max_tokens=30, stop=[stop], **args)
    assert cut.choices[0].message.content == full.choices[0].message.content.split(stop)[0]
    assert cut.choices[0].finish_reason == "stop"


def test_models_and_health_describe_the_run(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["task"] == "lamp4" and health["algos"] == ALGOS


def test_the_api_key_is_required_and_checked(server):
    body = {"model": MODEL, "user": "u", "prompt": "x"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        reply = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def _bad_inputs(user: str) -> list[tuple[str, object, int, str, str | None]]:
    """(name, body, status, words of the message, param) -- the body is JSON unless it is a string."""
    ok = {"model": MODEL, "user": user, "prompt": "an article"}
    chat_ok = {"model": MODEL, "user": user, "messages": [{"role": "user", "content": "hi"}]}
    return [
        ("malformed JSON", '{"model": ', 400, "not valid JSON", None),
        ("a JSON array", "[1, 2]", 400, "must be a JSON object", None),
        ("no user", {**ok, "user": None}, 400, "user: required", "user"),
        ("a path as user id", {**ok, "user": "../../etc/passwd"}, 400, "is not a user id", "user"),
        ("an unknown user", {**ok, "user": "nobody"}, 404, "unknown user 'nobody'", "user"),
        ("another model", {**ok, "model": "gpt-4"}, 404, "model 'gpt-4' is not served here", "model"),
        ("max_tokens as a string", {**ok, "max_tokens": "ten"}, 400, "valid integer", "max_tokens"),
        ("max_tokens 0", {**ok, "max_tokens": 0}, 400, "greater than or equal to 1", "max_tokens"),
        ("max_tokens over the limit", {**ok, "max_tokens": 1000}, 400, "over this server's limit", "max_tokens"),
        ("temperature NaN", json.dumps({**ok, "temperature": float("nan")}), 400, "finite number", "temperature"),
        ("a NaN multiplier", json.dumps({**ok, "fints": {"multipliers": [float("nan")]}}), 400,
         "must be a finite number", "fints.multipliers"),
        ("top_pairs 0", {**ok, "fints": {"top_pairs": 0}}, 400, "must be at least 1", "fints.top_pairs"),
        ("an unknown algorithm", {**ok, "fints": {"algo": "fintz"}}, 400, "Did you mean 'fints'", "fints.algo"),
        ("a layer the model lacks", {**ok, "fints": {"layers": [7]}}, 400, "layer", "fints"),
        ("a layer without vectors", {**ok, "fints": {"layers": [0]}}, 400, "not extracted", "fints"),
        ("multipliers not one per layer", {**ok, "fints": {"multipliers": [1, 2]}}, 400, "one per layer", "fints"),
        ("layers as a string", {**ok, "fints": {"layers": "1"}}, 400, "must be a list of integers", "fints.layers"),
        ("an unknown fints key", {**ok, "fints": {"plugin": "/etc"}}, 400, "unknown field 'fints.plugin'",
         "fints.plugin"),
        ("an unknown field", {**ok, "temprature": 0.5}, 400, "unknown field 'temprature'", "temprature"),
        ("n = 2", {**ok, "n": 2}, 400, "not supported", "n"),
        ("no messages", {**chat_ok, "messages": []}, 400, "at least 1 item", "messages"),
        ("a role that does not exist", {**chat_ok, "messages": [{"role": "robot", "content": "x"}]}, 400,
         "'system', 'user' or 'assistant'", "messages.0.role"),
        ("an infinite alpha", json.dumps({**ok, "fints": {"alpha": float("inf")}}), 400, "must be a finite number",
         "fints.alpha"),
        ("five stop strings", {**ok, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4", "stop"),
        ("a prompt over the token limit", {**chat_ok, "messages": [{"role": "user", "content": "word " * 900}]},
         400, "tokens; this server takes at most 400", "messages"),
        ("an unknown mode", {**ok, "fints": {"mode": "poem"}}, 400, "not one of", "fints.mode"),
        ("rag in chat mode", {**chat_ok, "fints": {"algo": "rag"}}, 400, "chat mode sends your messages", "fints.algo"),
        ("a sample field the task lacks", {**ok, "fints": {"fields": {"secret": 1}}}, 400, "not a sample field",
         "fints.fields.secret"),
        ("a negative history_k", {**ok, "fints": {"history_k": -1}}, 400, "must be at least 0", "fints.history_k"),
        ("a prompt budget over the limit", {**ok, "fints": {"max_prompt_tokens": 5000}}, 400, "at most 400",
         "fints.max_prompt_tokens"),
        ("two prompts", {**ok, "prompt": ["a", "b"]}, 400, "give one prompt", "prompt"),
    ]


def test_every_bad_input_gets_an_openai_error_naming_the_field(tiny_run, server):
    _, run_dir = tiny_run
    user = samples(run_dir)[0]["user_id"]
    for name, body, status, words, param in _bad_inputs(user):
        path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
        if isinstance(body, dict) and body.get("user", "") is None:
            body = {k: v for k, v in body.items() if k != "user"}
        reply = http(server, path, body)
        error = reply.json()["error"]
        assert (reply.status_code, words in error["message"], error["param"]) == (status, True, param), \
            (name, reply.status_code, error)
        assert str(run_dir.parent) not in error["message"]  # the server's file layout stays private
    assert http(server, "/health").json()["status"] == "ok"


def test_bodies_over_the_size_limit_get_413_with_or_without_a_length(server):
    big = json.dumps({"model": MODEL, "user": "u", "prompt": "x" * 30000})
    assert http(server, "/v1/completions", big).status_code == 413
    chunked = http(server, "/v1/completions", iter([big[i:i + 4096].encode() for i in range(0, len(big), 4096)]))
    assert chunked.status_code == 413 and "over 20000 bytes" in chunked.json()["error"]["message"]
    missing = http(server, "/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()


def test_a_failing_request_leaves_the_rest_of_its_batch_answered(tiny_run, server):
    _, run_dir = tiny_run
    good = [{"model": MODEL, "user": s["user_id"], "prompt": s["input"]} for s in samples(run_dir)[:4]]
    bad = {**good[0], "fints": {"layers": [0]}}  # passes the checks, fails when its vectors load
    with ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(lambda b: http(server, "/v1/completions", b), [*good[:2], bad, *good[2:]]))
    assert [r.status_code for r in replies] == [200, 200, 400, 200, 200]
    expected = stage05(run_dir, "fints")
    assert [r.json()["choices"][0]["text"] for r in replies if r.status_code == 200] == \
        [expected[s["id"]] for s in samples(run_dir)[:4]]


def test_an_unknown_user_can_get_the_zero_shot_answer_with_a_header(tiny_run, patient_server):
    _, run_dir = tiny_run
    sample = samples(run_dir)[0]
    reply = http(patient_server, "/v1/completions", {"model": MODEL, "user": "newcomer", "prompt": sample["input"]})
    assert reply.status_code == 200 and "unknown user newcomer" in reply.headers["x-fints-fallback"]
    assert reply.json()["choices"][0]["text"] == stage05(run_dir, "zeroshot")[sample["id"]]


def test_a_full_queue_answers_503_and_the_rest_are_served(tiny_run, patient_server):
    _, run_dir = tiny_run
    body = {"model": MODEL, "user": samples(run_dir)[0]["user_id"], "prompt": "an article", "max_tokens": 32}
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: http(patient_server, "/v1/completions", body), range(8)))
    codes = sorted(r.status_code for r in replies)
    assert set(codes) == {200, 503} and codes.count(200) >= 2
    busy = next(r for r in replies if r.status_code == 503)
    assert busy.json()["error"]["code"] == "queue_full" and busy.headers["retry-after"] == "1"


def test_a_request_past_its_deadline_gets_504_and_is_never_run(tiny_run, servers):
    hasty = servers["hasty"]
    body = {"model": MODEL, "user": samples(tiny_run[1])[0]["user_id"], "prompt": "x"}
    reply = http(hasty, "/v1/completions", body)
    assert reply.status_code == 504 and reply.json()["error"]["code"] == "timeout"
    while http(hasty, "/health").json()["queued"]:  # until the window closes and the job is dropped
        time.sleep(0.05)
    assert http(hasty, "/health").json()["rows"] == 0


def test_sigterm_finishes_the_request_in_flight_then_exits(tiny_run, patient_server):
    _, run_dir = tiny_run
    sample = samples(run_dir)[2]
    result = {}
    asking = threading.Thread(target=lambda: result.update(reply=http(patient_server, "/v1/completions", {
        "model": MODEL, "user": sample["user_id"], "prompt": sample["input"], "fints": {"algo": "zeroshot"}})))
    asking.start()
    deadline = time.monotonic() + 10
    while http(patient_server, "/health").json()["queued"] == 0:  # it waits out the 1 s window
        assert time.monotonic() < deadline
        time.sleep(0.02)
    patient_server.proc.send_signal(signal.SIGTERM)
    asking.join(30)
    assert result["reply"].status_code == 200
    assert result["reply"].json()["choices"][0]["text"] == stage05(run_dir, "zeroshot")[sample["id"]]
    # uvicorn re-raises the signal it caught once its graceful shutdown is done
    assert patient_server.proc.wait(30) in (0, -signal.SIGTERM)
    assert "Traceback" not in patient_server.log.read_text()
