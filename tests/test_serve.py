"""serve.py: an OpenAI-compatible server of many tenants' adapters with continuous batching. Every request's tokens
equal generate.py's for the same prompt, adapter and seed, whatever shares the batch; bad requests get 4xx and
the server serves on. Servers listen on 127.0.0.1 on a free port, and every wait is bounded."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import adapters
import generate
import serve
from loaders import load
from test_generate import adapter_files, tiny_dir  # noqa: F401 (a fixture)

openai = pytest.importorskip("openai")
TIMEOUT = 60  # seconds any one request may take


def start_server(tiny_dir, named=(), *flags):
    """A server of the tiny model (None: the small default model) and the adapters `named` ({name: path}), serving
    from a thread of this process."""
    argv = [*(["--ckpt_dir", str(tiny_dir)] if tiny_dir else []), "--port", "0", "--dtype", "fp32", *flags]
    for name, path in dict(named).items():
        argv += ["--adapter", f"{name}={path}"]
    _, args = serve.parse_args(argv)
    server = serve.start(args)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop_server(server):
    server.engine.drain(10)
    server.shutdown()
    server.server_close()


def client(server):
    host, port = server.server_address[:2]
    return openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)


def post(server, path, body, raw=None):
    """(status, parsed JSON) of one POST, with a raw body if given."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    conn.request("POST", path, body=raw if raw is not None else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    status, data = response.status, response.read()
    conn.close()
    return status, json.loads(data)


def expected(tiny_dir, path, prompt, **options):
    """generate.py's text for one prompt alone, with the adapter at `path` (None: the base model)."""
    model, tokenizer = load(str(tiny_dir))
    if path:
        adapters.load_adapter(model, [path])
    return generate.generate(model, tokenizer, [tokenizer.encode(prompt)], **options)[0].text


def greedy_concurrently(server, jobs):
    """The answers to jobs [(model, prompt, max_tokens)], each from its own thread and client, greedy; arrivals
    staggered over 40 ms, so that some join a batch already decoding."""
    answers = [None] * len(jobs)

    def ask(i, name, prompt, n):
        time.sleep(0.01 * (i % 5))
        answers[i] = client(server).completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0)

    threads = [threading.Thread(target=ask, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    return answers


PROMPTS = ["w5 w6 w7", "w9 w10 w11 w12 w13 w14 w15 w16", "w20", "w30 w31 w32 w33", "w40 w41", "w50 w51 w52 w53 w54 w55"]


@pytest.fixture(scope="module")
def para_files(tiny_dir, tmp_path_factory):
    return adapter_files(tiny_dir, tmp_path_factory.mktemp("para"), "para", r=4)


@pytest.fixture(scope="module")
def para_server(tiny_dir, para_files):
    server = start_server(tiny_dir, {"a": para_files[0], "b": para_files[1]}, "--max_batch", "4")
    yield server
    stop_server(server)


# -----------------------------------------------------------------------------
# exactness under concurrency


def test_18_concurrent_greedy_requests_mixing_the_base_model_and_two_adapters_get_generate_pys_text(
        tiny_dir, para_files, para_server):
    names = {para_server.base_name: None, "a": para_files[0], "b": para_files[1]}
    jobs = [(name, PROMPTS[i % len(PROMPTS)], 4 + i % 9) for i, name in enumerate(list(names) * 6)]
    answers = greedy_concurrently(para_server, jobs)
    for (name, prompt, n), answer in zip(jobs, answers):
        assert answer.choices[0].text == expected(tiny_dir, names[name], prompt, max_new_tokens=n), (name, prompt)
        assert answer.usage.completion_tokens <= n and answer.model == name
    assert len({a.choices[0].text for a in answers}) > len(PROMPTS)  # the adapters matter


@pytest.mark.parametrize("method, settings", [("ia3", {}), ("ia3", {"targets": ["wq", "wv", "w3"]}), ("lora", {"r": 4}),
                                              ("adalora", {"r": 4}), ("houlsby", {"size": 4})])
def test_every_method_serves_its_tenants_exactly(method, settings, tiny_dir, tmp_path):
    files = adapter_files(tiny_dir, tmp_path, method, **settings)
    server = start_server(tiny_dir, {"a": files[0], "b": files[1]}, "--max_batch", "3")
    try:
        jobs = [(name, PROMPTS[i], 6) for i, name in enumerate(["a", "b", server.base_name, "b", "a", "a"])]
        answers = greedy_concurrently(server, jobs)
        paths = {"a": files[0], "b": files[1], server.base_name: None}
        for (name, prompt, n), answer in zip(jobs, answers):
            assert answer.choices[0].text == expected(tiny_dir, paths[name], prompt, max_new_tokens=n), (name, prompt)
    finally:
        stop_server(server)


MIXED = [("para", {"r": 4}), ("para", {"r": 2}), ("ia3", {}), ("ia3", {"targets": ["wq", "wv", "w3"]}),
         ("lora", {"r": 4}), ("adalora", {"r": 4}), ("houlsby", {"size": 4})]


def test_tenants_of_every_method_share_one_batch_and_each_gets_generate_pys_text(tiny_dir, tmp_path, monkeypatch):
    """Adapters of different methods and configs in one batch (mixed.py): each row computes its own method's
    equation, the identity of every other group, so every request gets what generate.py gives it alone."""
    paths = {}
    for i, (method, settings) in enumerate(MIXED):
        (tmp_path / str(i)).mkdir()
        paths[f"{method}-{i}-a"], paths[f"{method}-{i}-b"] = adapter_files(tiny_dir, tmp_path / str(i), method,
                                                                          **settings)
    server = start_server(tiny_dir, paths, "--max_batch", "8")
    engine, shared = server.engine, []
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (shared.append(len({r.adapter[0] for r in engine.batch.rows
                                                                     if r.adapter != serve.BASE})), step())[1])
    try:
        assert len(engine.bank.configs) == len(MIXED)  # one group per method and config
        names = [server.base_name, *paths]
        jobs = [(name, PROMPTS[i % len(PROMPTS)], 3 + i % 7) for i, name in enumerate(names * 2)]
        answers = greedy_concurrently(server, jobs)
        paths[server.base_name] = None
        for (name, prompt, n), answer in zip(jobs, answers):
            assert answer.choices[0].text == expected(tiny_dir, paths[name], prompt, max_new_tokens=n), (name, prompt)
        assert max(shared) >= 4  # decode steps ran rows of several methods' groups together
    finally:
        stop_server(server)


def test_an_adapter_dir_of_several_methods_gets_a_group_each(tiny_dir, para_files, tmp_path):
    folder = tmp_path / "tenants"
    folder.mkdir()
    lora = adapter_files(tiny_dir, tmp_path, "lora", r=4)
    for name, path in (("p", para_files[0]), ("l", lora[0]), ("m", lora[1])):
        (folder / f"{name}.pt").write_bytes(Path(path).read_bytes())
    server = start_server(tiny_dir, {}, "--adapter_dir", str(folder), "--max_adapters", "1")
    try:
        assert len(server.engine.bank.configs) == 2
        c = client(server)
        for name, path in (("p", para_files[0]), ("l", lora[0]), ("m", lora[1]), ("l", lora[0]), ("p", para_files[0])):
            text = c.completions.create(model=name, prompt=PROMPTS[1], max_tokens=6, temperature=0).choices[0].text
            assert text == expected(tiny_dir, path, PROMPTS[1], max_new_tokens=6), name
        # a file of a method no group holds, put in the folder after start-up: that request fails, saying why
        houlsby = adapter_files(tiny_dir, tmp_path, "houlsby", size=4)
        (folder / "h.pt").write_bytes(Path(houlsby[0]).read_bytes())
        with pytest.raises(openai.InternalServerError, match="restart the server"):
            c.completions.create(model="h", prompt=PROMPTS[1], max_tokens=6, temperature=0)
        text = c.completions.create(model="p", prompt=PROMPTS[1], max_tokens=6, temperature=0).choices[0].text
        assert text == expected(tiny_dir, para_files[0], PROMPTS[1], max_new_tokens=6)  # and it serves on
    finally:
        stop_server(server)


def test_a_seeded_sample_is_generate_pys_sample_whatever_shares_the_batch(tiny_dir, para_files, para_server):
    options = dict(temperature=0.9, top_p=0.95, seed=7, max_tokens=10)
    results = [None] * 4

    def ask(i):
        results[i] = client(para_server).completions.create(model="a", prompt=PROMPTS[i], **options)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    for i, r in enumerate(results):
        assert r.choices[0].text == expected(tiny_dir, para_files[0], PROMPTS[i], temperature=0.9, top_p=0.95, seed=7,
                                             max_new_tokens=10)


def test_streamed_text_equals_the_plain_response_for_completions_and_chat(para_server):
    c = client(para_server)
    plain = c.completions.create(model="b", prompt=PROMPTS[1], max_tokens=12, temperature=0).choices[0].text
    streamed = "".join(chunk.choices[0].text for chunk in c.completions.create(
        model="b", prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True))
    assert streamed == plain and plain


def test_the_vector_generator_runs_only_at_each_requests_prefill(para_server):
    calls = []
    hooks = [vg.register_forward_hook(lambda m, inputs, out: calls.append(len(inputs[0])))
             for block in para_server.engine.model.layers for vg in block.vector_generators]
    try:
        threads = [threading.Thread(target=lambda p=p: client(para_server).completions.create(
            model="a", prompt=p, max_tokens=8, temperature=0)) for p in PROMPTS[:3]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
    finally:
        for h in hooks:
            h.remove()
    # each prompt once per layer (one row of a prefill, alone or in a group); the decode steps only multiply
    assert sum(calls) == 3 * len(para_server.engine.model.layers)


def test_models_and_health(para_server):
    names = [m.id for m in client(para_server).models.list().data]
    assert names == [para_server.base_name, "a", "b"]
    host, port = para_server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200


# -----------------------------------------------------------------------------
# bad requests get 4xx, and the server serves on


@pytest.mark.parametrize("body, status, words", [
    (None, 400, "not valid JSON"),
    ([1, 2], 400, "JSON object"),
    ({"model": "a", "prompt": 5}, 400, "'prompt' must be"),
    ({"model": "nobody", "prompt": "w5"}, 404, "no model or adapter named 'nobody'"),
    ({"model": "a", "prompt": " ".join(["w5"] * 70)}, 400, "more than this server's context"),
    ({"model": "a", "prompt": "w5", "max_tokens": -1}, 400, "'max_tokens' must be"),
    ({"model": "a", "prompt": "w5", "max_tokens": 0}, 400, "'max_tokens' must be"),
    ({"model": "a", "prompt": "w5", "temperature": -0.5}, 400, "'temperature' must be"),
    ({"model": "a", "prompt": "w5", "top_p": 0}, 400, "'top_p' must be"),
    ({"model": "a", "prompt": "w5", "logprobs": 3}, 400, "unsupported parameter(s): logprobs"),
    ({"model": "a", "prompt": "w5", "n": 2}, 400, "'n' must be"),
    ({"model": "a", "prompt": "w5", "stop": [""]}, 400, "'stop' must be"),
])
def test_a_bad_request_gets_an_openai_style_error_and_the_server_serves_on(body, status, words, para_server):
    raw = b'{"model": "a", "prompt": "w5",' if body is None else None
    got, answer = post(para_server, "/v1/completions", body, raw)
    assert got == status and words in answer["error"]["message"]
    assert client(para_server).completions.create(model="a", prompt="w5", max_tokens=2, temperature=0).choices


def raw_request(server, head, body=b""):
    """(status, parsed JSON) of one request sent as raw bytes: a request line and headers `head`, then `body`."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(head.encode() + b"\r\nHost: x\r\n\r\n" + body)
        sock.shutdown(socket.SHUT_WR)  # a server that waited for more of the body would now read its end
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


@pytest.mark.parametrize("head, body, status, words", [
    # JSON may escape half a UTF-16 pair; Python reads it, no tokenizer can (it used to drop the connection)
    ("POST /v1/completions HTTP/1.1\r\nContent-Length: 38", b'{"model": "a", "prompt": "w5 \\ud800"}', 400,
     "lone UTF-16 surrogate"),
    ("POST /v1/completions HTTP/1.1\r\nContent-Length: -5", b'{"model": "a"}', 400, "Content-Length"),
    ("POST /v1/completions HTTP/1.1", b'{"model": "a", "prompt": "w5"}', 400, "Content-Length"),
    (f"POST /v1/completions HTTP/1.1\r\nContent-Length: {serve.MAX_BODY + 1}", b"{", 413, "more than this server"),
    ("DELETE /v1/completions HTTP/1.1", b"", 501, "Unsupported method"),  # the standard server's own error, in JSON
])
def test_a_malformed_http_request_gets_a_json_error_and_the_server_serves_on(head, body, status, words, para_server):
    got, answer = raw_request(para_server, head, body)
    assert got == status and words in answer["error"]["message"], answer
    assert client(para_server).completions.create(model="a", prompt="w5", max_tokens=2, temperature=0).choices


def test_a_fault_while_reading_a_request_answers_500_and_the_server_serves_on(para_server, monkeypatch):
    def faulty(text):
        raise KeyError("injected")
    monkeypatch.setattr(para_server.engine.tokenizer, "encode", faulty)
    status, answer = post(para_server, "/v1/completions", {"model": "a", "prompt": "w5"})
    monkeypatch.undo()
    assert status == 500 and "KeyError" in answer["error"]["message"] and "injected" in answer["error"]["message"]
    assert client(para_server).completions.create(model="a", prompt="w5", max_tokens=2, temperature=0).choices


def test_a_model_is_retrieved_by_its_id(para_server):
    c = client(para_server)
    assert c.models.retrieve("b").id == "b" and c.models.retrieve(para_server.base_name).id == para_server.base_name
    with pytest.raises(openai.NotFoundError, match="nobody"):
        c.models.retrieve("nobody")


def test_chat_content_as_text_parts_is_the_joined_text_and_other_parts_are_refused(para_server, monkeypatch):
    tokenizer, seen = para_server.engine.tokenizer, []

    def format_chat(messages):  # the tiny model has no chat format: record what the server would format
        seen.append(messages)
        return tokenizer.encode(" ".join(m["content"] for m in messages))
    monkeypatch.setattr(tokenizer, "format_chat", format_chat)
    ask = lambda content: client(para_server).chat.completions.create(
        model="a", messages=[{"role": "user", "content": content}], max_tokens=6, temperature=0)
    assert ask([{"type": "text", "text": "w5 w6"}, {"type": "text", "text": "w7"}]).choices[0].message.content
    assert seen == [[{"role": "user", "content": "w5 w6\nw7"}]]
    with pytest.raises(openai.BadRequestError, match="text"):
        ask([{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}])
    assert len(seen) == 1


def test_a_stream_with_include_usage_ends_with_the_usage_of_the_plain_response(para_server):
    c = client(para_server)
    plain = c.completions.create(model="b", prompt=PROMPTS[1], max_tokens=7, temperature=0)
    chunks = list(c.completions.create(model="b", prompt=PROMPTS[1], max_tokens=7, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage and plain.usage.completion_tokens == 7
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert "".join(chunk.choices[0].text for chunk in chunks[:-1]) == plain.choices[0].text
    with pytest.raises(openai.BadRequestError, match="stream_options"):  # without "stream": true it means nothing
        c.completions.create(model="b", prompt="w5", max_tokens=2, stream_options={"include_usage": True})


def test_nan_is_refused(para_server):
    got, answer = post(para_server, "/v1/completions", None, b'{"model": "a", "prompt": "w5", "temperature": NaN}')
    assert got == 400 and "NaN" in answer["error"]["message"]


def test_a_client_that_goes_away_mid_stream_frees_its_row(para_server):
    host, port = para_server.server_address[:2]
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    body = json.dumps({"model": "a", "prompt": PROMPTS[0], "max_tokens": 50, "temperature": 0, "stream": True})
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    sock.recv(10)
    sock.close()
    deadline = time.time() + TIMEOUT
    while para_server.engine.busy() and time.time() < deadline:
        time.sleep(0.05)
    assert not para_server.engine.busy()
    assert client(para_server).completions.create(model="b", prompt="w5", max_tokens=2, temperature=0).choices


def test_more_requests_than_the_queue_holds_get_429(tiny_dir):
    server = start_server(tiny_dir, {}, "--max_batch", "1", "--max_waiting", "1")
    try:
        statuses = []
        threads = [threading.Thread(target=lambda: statuses.append(post(
            server, "/v1/completions", {"model": server.base_name, "prompt": "w5 w6", "max_tokens": 40,
                                        "temperature": 0})[0])) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
    finally:
        stop_server(server)


def test_a_fault_in_the_engine_fails_only_that_steps_requests(para_server, monkeypatch):
    decode = generate.decode_step
    faults = []

    def faulty(*args, **kwargs):
        if not faults:
            faults.append(1)
            raise RuntimeError("injected")
        return decode(*args, **kwargs)
    monkeypatch.setattr(generate, "decode_step", faulty)
    status, answer = post(para_server, "/v1/completions", {"model": "a", "prompt": "w5", "max_tokens": 4,
                                                           "temperature": 0})
    assert status == 500 and "injected" in answer["error"]["message"]
    assert client(para_server).completions.create(model="a", prompt="w5", max_tokens=4, temperature=0).choices


# -----------------------------------------------------------------------------
# start-up and shutdown


def test_a_damaged_adapter_file_is_refused_at_start_up_naming_it(tiny_dir, para_files, tmp_path, capsys):
    payload = torch.load(para_files[0], weights_only=True)
    next(iter(payload["tensors"].values()))[0] = float("nan")
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(SystemExit):
        serve.main(["--ckpt_dir", str(tiny_dir), "--port", "0", "--adapter", f"bad={tmp_path / 'bad.pt'}"])
    assert "bad.pt" in capsys.readouterr().err


def test_adapters_of_a_folder_load_on_first_use_and_the_least_recently_used_makes_room(tiny_dir, para_files,
                                                                                      tmp_path):
    folder = tmp_path / "tenants"
    folder.mkdir()
    for name, path in zip("xy", para_files):
        (folder / f"{name}.pt").write_bytes(Path(path).read_bytes())
    server = start_server(tiny_dir, {}, "--adapter_dir", str(folder), "--max_adapters", "1")
    try:
        c = client(server)
        for name, path in (("x", para_files[0]), ("y", para_files[1]), ("x", para_files[0])):
            text = c.completions.create(model=name, prompt=PROMPTS[1], max_tokens=6, temperature=0).choices[0].text
            assert text == expected(tiny_dir, path, PROMPTS[1], max_new_tokens=6)
        assert [m.id for m in c.models.list().data][1:] == ["x", "y"]
        # a name is a file in the folder, never a path out of it: ../outside.pt exists, and is not served
        (tmp_path / "outside.pt").write_bytes(Path(para_files[0]).read_bytes())
        for name in ("../outside", str(tmp_path / "outside")):
            with pytest.raises(openai.NotFoundError):
                c.completions.create(model=name, prompt="w5", max_tokens=2, temperature=0)
    finally:
        stop_server(server)


def test_sigterm_finishes_the_requests_in_flight_then_exits_0(tiny_dir, para_files):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "serve.py", "--ckpt_dir", str(tiny_dir), "--port", str(port),
                             "--dtype", "fp32", "--adapter", f"a={para_files[0]}"],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline:  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        result = {}
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        asking = threading.Thread(target=lambda: result.setdefault("r", c.completions.create(
            model="a", prompt=PROMPTS[0], max_tokens=40, temperature=0)))
        asking.start()
        time.sleep(0.5)  # the request is in flight
        proc.send_signal(signal.SIGTERM)
        asking.join(TIMEOUT)
        assert proc.wait(TIMEOUT) == 0
        assert result["r"].choices[0].text == expected(tiny_dir, para_files[0], PROMPTS[0], max_new_tokens=40)
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("prefill_layers", [None, 1])
def test_rows_move_left_near_the_caches_end_and_right_for_a_longer_prompt_and_still_get_generate_pys_text(
        tiny_dir, para_files, prefill_layers, monkeypatch):
    """The engine driven by hand, one iteration at a time, over a cache of 24 positions: random arrivals of random
    lengths make the rows move, left by the padding they share near the cache's end, right for a prompt longer than
    the current column; arrivals join alone or in groups; prefills run whole, or a layer at a time with decode steps
    between the pieces. Every request still gets generate.py's text."""
    import random

    _, args = serve.parse_args(["--ckpt_dir", str(tiny_dir), "--dtype", "fp32", "--adapter", f"a={para_files[0]}",
                                "--max_batch", "3", "--max_len", "24"])
    model, tokenizer = load(str(tiny_dir))
    bank = serve.Bank(model, args.named)
    engine = serve.Engine(model, tokenizer, bank, max_batch=3, max_len=24, prefill_tokens=16,
                          prefill_layers=prefill_layers)  # driven below
    moves, move = [], serve.Batch.move
    engine.batch.move = lambda d: (moves.append(d) if d and engine.batch.rows else None, move(engine.batch, d))[1]
    groups, Prefill = [], serve.Prefill
    monkeypatch.setattr(serve, "Prefill", lambda model, group, *rest: (groups.append(len(group)),
                                                                       Prefill(model, group, *rest))[1])
    rng, requests = random.Random(3), []
    for _ in range(300):
        if rng.random() < 0.3 and len(engine.waiting) < 3:
            words = " ".join(f"w{rng.randrange(4, 90)}" for _ in range(rng.randint(1, 12)))
            options = generate.Options(max_new_tokens=rng.randint(2, 24 - 12), temperature=0, eos_id=-1)
            requests.append(serve.Request(tokenizer.encode(words), options, "a", adapter=bank.rows["a"]))
            engine.submit(requests[-1])
        engine.admit()
        if engine.batch.rows:
            engine.step()
    while engine.busy():
        engine.admit()
        engine.step()
    assert len(requests) > 20 and any(d < 0 for d in moves) and any(d > 0 for d in moves)
    assert 1 in groups and max(groups) > 1
    adapted, _ = load(str(tiny_dir))
    adapters.load_adapter(adapted, [para_files[0]])
    for r in requests:
        events = [r.events.get_nowait() for _ in range(r.events.qsize())]
        text = "".join(v for kind, v in events if kind == "text")
        assert events[-1][0] == "done" and text == generate.generate(
            adapted, tokenizer, [r.prompt], max_new_tokens=r.options.max_new_tokens, eos_id=-1)[0].text


def test_on_the_real_small_model_18_concurrent_requests_get_generate_pys_tokens(smollm, tmp_path):
    """SmolLM2-135M with two PARA tenants (bench.py's random non-trivial adapters) and the base model, 18 greedy
    requests at once. Batched rows can differ from a prompt alone in the last bits of their logits (another matmul
    shape); the tokens are compared, and must be equal (measured: equal for all 18)."""
    import bench

    model, tokenizer = smollm
    bank = bench.with_adapter(model, "para", {"r": 12}, 2, True, seed=5)
    files = {}
    for i in range(2):
        files[f"t{i}"] = str(tmp_path / f"t{i}.pt")
        adapters.save_adapter(bank, files[f"t{i}"], index=i)
    server = start_server(None, files, "--max_batch", "8", "--max_len", "256")
    try:
        names = [server.base_name, "t0", "t1"] * 6
        prompts = [tokenizer.decode(p) for p in bench.prompts_from_text(tokenizer, 18, 40)]
        answers = [None] * 18

        def ask(i):
            time.sleep(0.02 * (i % 6))
            answers[i] = client(server).completions.create(model=names[i], prompt=prompts[i], max_tokens=24,
                                                           temperature=0)
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(18)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(4 * TIMEOUT)
        alone = {name: bench.with_adapter(model, None, {}, 1, False, 0) for name in names[:1]}
        for name, path in files.items():
            alone[name] = adapters.load_adapter(bench.with_adapter(model, None, {}, 1, False, 0), [path])
        for i in range(18):
            want = generate.generate(alone[names[i]], tokenizer, [tokenizer.encode(prompts[i])], max_new_tokens=24)
            assert answers[i].choices[0].text == want[0].text, (i, names[i])
    finally:
        stop_server(server)


def hand_driven_engine(tiny_dir, para_files, **settings):
    """An engine of the tiny model and adapter "a", not started: a test drives it one admission or step at a time."""
    model, tokenizer = load(str(tiny_dir))
    bank = serve.Bank(model, {"a": para_files[0]})
    return serve.Engine(model, tokenizer, bank, **settings), tokenizer, bank


def finish(engine):
    while engine.busy():
        engine.admit()
        if engine.batch.rows:
            engine.step()


def text_of(request):
    events = [request.events.get_nowait() for _ in range(request.events.qsize())]
    assert events[-1][0] == "done"
    return "".join(v for kind, v in events if kind == "text")


def test_a_burst_of_arrivals_is_prefilled_in_groups_of_at_most_prefill_tokens_and_gets_generate_pys_text(
        tiny_dir, para_files, monkeypatch):
    """Five waiting requests, prompts of 1 to 7 tokens, prefill_tokens 15: the first admission takes the first three
    (padded to 5 tokens: 15; the fourth would make 4 x 7), the next the last two (2 x 7). Each text is generate.py's for its
    prompt alone; the base model's rows and the adapter's share the groups."""
    engine, tokenizer, bank = hand_driven_engine(tiny_dir, para_files, max_batch=8, max_len=40, prefill_tokens=15)
    forwards, Prefill = [], serve.Prefill
    monkeypatch.setattr(serve, "Prefill", lambda *args: (forwards.append(tuple(Prefill(*args).h.shape[:2])),
                                                         Prefill(*args))[1])
    words = ["w5 w6", "w9 w10 w11 w12 w13", "w20 w21 w22", "w30 w31 w32 w33 w34 w35 w36", "w40"]
    requests = [serve.Request(tokenizer.encode(w), generate.Options(max_new_tokens=6, eos_id=-1), name,
                              adapter=bank.rows[name] if name == "a" else serve.BASE)
                for w, name in zip(words, ["a", "base", "a", "a", "base"])]
    assert [len(r.prompt) for r in requests] == [2, 5, 3, 7, 1]
    for r in requests:
        engine.submit(r)
    engine.admit()
    assert len(engine.batch.rows) == 3 and len(engine.waiting) == 2
    engine.step()
    engine.admit()
    assert len(engine.batch.rows) == 5 and not engine.waiting
    finish(engine)
    assert forwards == [(3, 5), (2, 7)]
    adapted, _ = load(str(tiny_dir))
    adapters.load_adapter(adapted, [para_files[0]])
    base, _ = load(str(tiny_dir))
    for r in requests:
        model = adapted if r.model == "a" else base
        want = generate.generate(model, tokenizer, [r.prompt], max_new_tokens=6, eos_id=-1)[0].text
        assert text_of(r) == want


def test_a_prompt_longer_than_prefill_tokens_is_prefilled_alone_and_static_batches_take_all_that_fit(
        tiny_dir, para_files):
    engine, tokenizer, bank = hand_driven_engine(tiny_dir, para_files, max_batch=3, max_len=40, prefill_tokens=4)
    long, short = tokenizer.encode("w5 w6 w7 w8 w9 w10 w11"), tokenizer.encode("w5")
    options = generate.Options(max_new_tokens=4, eos_id=-1)
    for prompt in (long, short):
        engine.submit(serve.Request(prompt, options, "a", adapter=bank.rows["a"]))
    engine.admit()
    assert len(engine.batch.rows) == 1 and len(engine.waiting) == 1  # the head alone: 7 tokens > 4, never starved
    finish(engine)

    engine, tokenizer, bank = hand_driven_engine(tiny_dir, para_files, max_batch=3, max_len=40, prefill_tokens=4)
    engine.static = True
    for _ in range(5):
        engine.submit(serve.Request(long, options, "a", adapter=bank.rows["a"]))
    engine.admit()
    assert len(engine.batch.rows) == 3 and len(engine.waiting) == 2  # a static batch: every row it has
    engine.step()
    engine.admit()
    assert len(engine.batch.rows) == 3 and len(engine.waiting) == 2  # nothing joins a running static batch
    finish(engine)


def test_a_prefill_group_of_one_tenant_reads_its_bank_row_in_place_and_makes_the_vectors_of_the_adapter_alone(
        tiny_dir, para_files, monkeypatch):
    """Three prompts for tenant "a" in one group: the vector generator reads a's row of the bank as it is (an int, not
    a gather per row), and every layer's vectors have the bits of generate.prefill with adapter a alone on the same
    prompts. A group of a's and the base model's rows gathers each row's."""
    model, tokenizer = load(str(tiny_dir))
    bank = serve.Bank(model, {"a": para_files[0]})
    ids_seen, per_row = [], adapters.per_row
    monkeypatch.setattr(adapters, "per_row", lambda t, ids: (ids_seen.append(ids), per_row(t, ids))[1])
    prompts = [tokenizer.encode(w) for w in PROMPTS[:3]]
    options = generate.Options(max_new_tokens=2, eos_id=-1)
    n_layers = model.args.n_layers

    group = [serve.Request(p, options, "a", adapter=bank.rows["a"]) for p in prompts]
    prefill = serve.Prefill(model, group, tokenizer.pad_id, bank)
    prefill.run(n_layers)
    assert ids_seen == [bank.rows["a"][1]] * 3 * n_layers  # down, up, bias of a's row, read in place, every layer

    alone, _ = load(str(tiny_dir))
    adapters.load_adapter(alone, [para_files[0]])
    tokens, pad_len = generate.left_pad(prompts, tokenizer.pad_id, torch.device("cpu"))
    a = alone.args
    cache = generate.KVCache(a.n_layers, len(prompts), tokens.shape[1], a.n_kv_heads, a.head_dim, torch.device("cpu"),
                             generate.cache_dtype(alone), pad_len=pad_len)
    generate.prefill(alone, tokens, cache)
    for layer in range(n_layers):
        ours, theirs = prefill.cache.vectors[layer, 0], cache.vectors[layer]
        assert all(torch.equal(x, y) for x, y in zip(ours, theirs))
        assert not torch.equal(theirs[2], torch.ones_like(theirs[2]))  # a trained adapter's vectors, not the identity

    ids_seen.clear()
    group = [serve.Request(prompts[0], options, "a", adapter=bank.rows["a"]),
             serve.Request(prompts[1], options, "base", adapter=serve.BASE)]
    serve.Prefill(model, group, tokenizer.pad_id, bank).run(n_layers)
    assert len(ids_seen) == 3 * n_layers and all(torch.equal(ids, torch.tensor([bank.rows["a"][1], 0]))
                                                 for ids in ids_seen)


def test_a_prefill_in_pieces_of_layers_lets_the_running_rows_decode_in_between(tiny_dir, para_files):
    """--prefill_layers 1 on the 2-layer model: a prefill into an empty batch runs whole (no row waits for it); one
    while a request runs takes two iterations, and the running request gets a token between them; both texts are
    generate.py's."""
    engine, tokenizer, bank = hand_driven_engine(tiny_dir, para_files, max_batch=4, max_len=40, prefill_layers=1)
    options = generate.Options(max_new_tokens=8, eos_id=-1)
    first = serve.Request(tokenizer.encode("w5 w6 w7"), options, "a", adapter=bank.rows["a"])
    second = serve.Request(tokenizer.encode("w9 w10 w11 w12 w13 w14"), options, "base")
    engine.submit(first)
    engine.admit()
    assert not engine.pending and engine.batch.rows == [first] and len(first.tokens) == 1  # whole: nothing ran
    engine.submit(second)
    engine.admit()
    engine.step()
    assert engine.pending and engine.batch.rows == [first] and len(first.tokens) == 2  # decoded in between
    engine.admit()
    assert engine.batch.rows == [first, second]
    finish(engine)
    adapted, _ = load(str(tiny_dir))
    adapters.load_adapter(adapted, [para_files[0]])
    base, _ = load(str(tiny_dir))
    for r, model in ((first, adapted), (second, base)):
        assert text_of(r) == generate.generate(model, tokenizer, [r.prompt], max_new_tokens=8, eos_id=-1)[0].text


SPY = """import os, sys
class Spy:  # notes GOMP_SPINCOUNT when torch is first imported: libgomp reads it once, as torch loads
    seen = "torch not imported"
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and Spy.seen == "torch not imported":
            Spy.seen = os.environ.get("GOMP_SPINCOUNT")
sys.meta_path.insert(0, Spy())
import {module}
print(Spy.seen)
"""


@pytest.mark.parametrize("module", ["serve", "bench"])
def test_the_openmp_spin_count_is_set_before_torch_loads_and_a_users_own_is_kept(module):
    root = Path(__file__).resolve().parents[1]
    for given, expected in ((None, "1000000"), ("5", "5")):
        env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
        if given is not None:
            env["GOMP_SPINCOUNT"] = given
        out = subprocess.run([sys.executable, "-c", SPY.format(module=module)], cwd=root, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-1] == expected
