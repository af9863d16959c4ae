"""serve/'s pieces without a server: text deltas with multi-byte characters and stop strings, the chat
templates, request checking (fast; the HTTP behaviour is in tests/test_serve.py)."""

from __future__ import annotations

import time

import pytest

from serve.chat import render
from serve.text import ChoiceText


class ByteTokenizer:
    """Token i is byte i, decoded as a byte-level BPE decodes: invalid UTF-8 becomes U+FFFD."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def _run(text: bytes, stop=(), finish_at=None):
    c = ChoiceText(ByteTokenizer(), stop)
    deltas = []
    for i, b in enumerate(text):
        last = i == len(text) - 1
        deltas.append(c.add(b, "length" if last else None))
        if c.finish_reason:
            break
    return c, deltas


def test_a_multibyte_character_is_sent_once_complete():
    c, deltas = _run("a€b".encode())  # € is 3 bytes
    assert deltas == ["a", "", "", "€", "b"] and c.text == "a€b" and c.finish_reason == "length"


def test_a_stop_string_cuts_the_text_and_its_prefix_is_held_back():
    c, deltas = _run(b"hello END world", stop=["END", "xyz"])
    assert c.text == "hello " and c.finish_reason == "stop" and "".join(deltas) == "hello "
    assert deltas[:6] == ["h", "e", "l", "l", "o", " "] and deltas[6:] == ["", "", ""]  # "E", "EN" held back
    c, deltas = _run(b"ENTER", stop=["END"])  # a prefix that turns out not to be the stop string
    assert c.text == "ENTER" and "".join(deltas) == "ENTER" and c.finish_reason == "length"


def test_eos_from_the_engine_finishes_with_stop():
    c = ChoiceText(ByteTokenizer())
    assert c.add(ord("x"), None) == "x"
    assert c.add(ord("y"), "eos") == "y" and c.finish_reason == "stop"
    with pytest.raises(RuntimeError):
        c.add(ord("z"), None)


def _whole_decoding_reference(tokenizer, ids, stop, last="length"):
    """What a choice's text must be, from decoding the whole completion after every token (the slow way):
    (text, finish reason, tokens taken). The choice ends at the first token whose decoding contains a stop
    string, cut where that begins, or at the last token, which the engine ended with `last` ("length", or
    "eos": an <|endoftext|>, reported as "stop")."""
    for t in range(1, len(ids) + 1):
        full = tokenizer.decode(ids[:t])
        hits = [i for i in (full.find(s) for s in stop) if i >= 0]
        if hits:
            return full[:min(hits)], "stop", t
    return tokenizer.decode(ids), "length" if last == "length" else "stop", len(ids)


def _metaspace_tokenizer():
    """A SentencePiece-style decoder: "\u2581" is a space, and a text's first token loses its leading one
    (so a suffix of the tokens does not decode to a suffix of the text on its own)."""
    from tokenizers import Tokenizer, decoders, models

    pieces = ["\u2581a", "b", "\u2581cd", "\u2581", "e\u2581", "\u00e9", "\u2581\u20ac", "<s>"]
    tok = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<s>"))
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(["<s>"])  # skipped when decoding, as <|endoftext|> is
    return tok, len(pieces)


def _byte_level_bpe():
    """A byte-level BPE as the project trains them, on text with multi-byte characters."""
    from tests.trainutil import byte_bpe_tokenizer

    tok = byte_bpe_tokenizer("caf\u00e9 na\u00efve \u20ac5 \u65e5\u672c\u8a9e \U0001f600 END end def f(x):\n    return x")
    return tok, tok.get_vocab_size()


@pytest.mark.parametrize("kind", ["bytes", "byte-level BPE", "metaspace"])
def test_incremental_text_equals_the_whole_decoding_token_by_token(kind):
    """Random completions (random ids: split and invalid UTF-8, special tokens, first-token spaces), some ended
    by the engine on an end-of-text token, and random stop strings: the streamed deltas, the final text, the
    finish reason and the token the choice ends on are those of decoding the whole completion after every
    token."""
    import random

    rng = random.Random(0)
    if kind == "bytes":
        tok, vocab = ByteTokenizer(), 256
    elif kind == "byte-level BPE":
        tok, vocab = _byte_level_bpe()
    else:
        tok, vocab = _metaspace_tokenizer()
    stopped = 0
    for trial in range(300):
        n = rng.randint(1, 60)
        if kind == "bytes":  # mostly valid text with multi-byte characters, sometimes raw bytes
            text = "".join(rng.choice("ab \u00e9\u20ac\U0001f600END") for _ in range(n)).encode()
            ids = list(text) if trial % 4 else [rng.randrange(256) for _ in range(n)]
        else:
            ids = [rng.randrange(vocab) for _ in range(n)]
        last = "eos" if trial % 5 == 0 and kind != "bytes" else "length"
        if last == "eos":  # the engine ends the row on its end-of-text token, which decodes to nothing
            ids.append(vocab - 1 if kind == "metaspace" else tok.token_to_id("<|endoftext|>"))
        whole = tok.decode(ids)
        stop = [whole[i:i + rng.randint(1, 4)] for i in sorted(rng.sample(range(len(whole)), min(2, len(whole))))]
        stop = [s for s in stop if s.strip()] if trial % 3 else []
        want_text, want_reason, want_tokens = _whole_decoding_reference(tok, ids, stop, last)
        c = ChoiceText(tok, stop)
        deltas = []
        for t, token in enumerate(ids):
            deltas.append(c.add(token, last if t == len(ids) - 1 else None))
            if c.finish_reason:
                break
        assert (c.text, "".join(deltas), c.finish_reason, len(c.ids)) == (want_text, want_text, want_reason,
                                                                           want_tokens), (kind, trial, ids, stop)
        stopped += want_reason == "stop"
    assert stopped > 50  # the stop strings were found, not only the lengths reached


def test_a_token_of_a_long_completion_decodes_only_a_window():
    """The cost per token does not grow with the completion: the tokenizer sees a few tokens a call."""
    seen = []

    class Counting(ByteTokenizer):
        def decode(self, ids):
            seen.append(len(ids))
            return super().decode(ids)

    c = ChoiceText(Counting(), stop=["\n\n"])
    for b in ("x\u00e9\u20ac " * 1000).encode():
        c.add(b, None)
    assert len(c.ids) == 7000 and max(seen) <= 8, max(seen)


def test_chat_templates():
    msgs = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "2+2?")]
    assert render("gpt2", msgs) == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: 2+2?\n\nAssistant:"
    assert render("llama", msgs) == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. [INST] 2+2? [/INST]"
    with pytest.raises(ValueError, match="no chat template"):
        render("rwkv", msgs)


def test_request_checks_without_a_server():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from serve.loader import ServedModel
    from serve.protocol import APIError, parse_request

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    m = {"m": ServedModel("m", "model", None, tok, "gpt2", 8, None)}
    req = parse_request({"model": "m", "prompt": "a b a", "n": 2, "seed": 5, "temperature": 0.5, "top_p": 1},
                        m, is_chat=False)
    assert req.prompts == [[0, 1, 0]] and req.max_tokens == 5  # default 16, capped by the room left in 8
    assert [p.seed for p in req.params] == [5, 6] and req.top_p is None and req.params[0].temperature == 0.5
    chat = parse_request({"model": "m", "messages": [{"role": "user", "content": "a"}]}, m, is_chat=True)
    assert chat.max_tokens == 8 - len(chat.prompts[0])  # chat: the rest of the context
    for body, param in [({"model": "m", "prompt": "a b a", "max_tokens": 6}, "max_tokens"),  # 3 + 6 > 8
                        ({"model": "m", "prompt": "a a a a a a a a"}, "prompt"),
                        ({"model": "m", "prompt": "a", "stream": "yes"}, "stream"),
                        ({"model": "m", "prompt": "a", "max_tokens": True}, "max_tokens"),
                        ({"model": "m", "prompt": "a", "n": 17}, "n")]:
        with pytest.raises(APIError) as e:
            parse_request(body, m, is_chat=False)
        assert e.value.status == 400 and e.value.param == param, body


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the traceback is printed, as meant
def test_a_crash_of_the_decoding_loop_fails_its_rows_instead_of_leaving_them_waiting():
    import threading

    from model import GPT, GPTConfig
    from model.generate import SamplingParams
    from serve.metrics import Metrics
    from serve.scheduler import Row, Scheduler

    model = GPT(GPTConfig(vocab_size=32, n_layer=1, n_head=2, d_model=16, max_seq_len=16, kernels="torch")).eval()
    scheduler = Scheduler({"model": model}, 2, Metrics())
    got, done = [], threading.Event()

    def boom(key):
        raise KeyError("a bug")

    scheduler._step = boom
    scheduler.submit([Row("model", [1, 2], SamplingParams(max_new_tokens=3), None,
                          lambda item: (got.append(item), done.set()))])
    scheduler.start()
    assert done.wait(10)
    assert isinstance(got[0], RuntimeError) and "a bug" in str(got[0])
    scheduler._thread.join(10)
    assert not scheduler.alive
    with pytest.raises(RuntimeError, match="decoding loop has stopped"):
        scheduler.submit([])


@pytest.mark.parametrize("stuck", ["decode", "prefill"])
def test_fail_all_answers_every_row_while_the_loop_is_stuck_in_an_engine_call(stuck):
    """serve.tp's lost rank: the scheduler thread can wait in a collective that never returns, so the rows
    are failed from another thread (rows running, waiting, and those inside the stuck prefill, which are in
    neither queue); later requests are refused; once the call returns, the loop frees the slots."""
    import threading

    from model import GPT, GPTConfig
    from model.generate import DecodeEngine, SamplingParams
    from serve.metrics import Metrics
    from serve.scheduler import Row, Scheduler

    entered, release = threading.Event(), threading.Event()

    class StuckEngine(DecodeEngine):
        def decode(self, slots):
            if stuck == "decode":
                entered.set()
                assert release.wait(30)
            return super().decode(slots)

        def prefill(self, *args, **kwargs):
            if stuck == "prefill":
                entered.set()
                assert release.wait(30)
            return super().prefill(*args, **kwargs)

    model = GPT(GPTConfig(vocab_size=32, n_layer=1, n_head=2, d_model=16, max_seq_len=32, kernels="torch")).eval()
    engine = StuckEngine(model, max_slots=2)
    scheduler = Scheduler({}, 2, Metrics(), engines={"model": engine}, prefill_chunk=None)
    got: dict[int, list] = {0: [], 1: [], 2: []}
    rows = [Row("model", [1, 2, 3], SamplingParams(max_new_tokens=8), None, got[i].append) for i in range(3)]
    scheduler.submit(rows)  # 2 slots: two rows run, the third waits
    scheduler.start()
    try:
        assert entered.wait(10)
        assert len(scheduler._waiting["model"]) == 1
        assert len(engine.running_slots()) == (2 if stuck == "decode" else 0)  # a prefill takes slots after
        scheduler.fail_all(RuntimeError("a rank is gone"))
        for i in range(3):  # answered while the engine call still waits
            assert got[i] and isinstance(got[i][-1], RuntimeError) and "a rank is gone" in str(got[i][-1]), got[i]
        assert sum(isinstance(x, RuntimeError) for x in got[2]) == 1 and len(got[2]) == 1  # it never ran
        with pytest.raises(RuntimeError, match="cannot run any more: a rank is gone"):
            scheduler.submit([Row("model", [1], SamplingParams(max_new_tokens=2), None, print)])
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while engine.running_slots() or scheduler._busy():
        assert time.monotonic() < deadline, (engine.running_slots(), scheduler.snapshot)
        time.sleep(0.01)
    assert sorted(engine.free_slots()) == [0, 1]
    scheduler.stop()


def test_a_busy_port_is_one_line_and_exit_2_before_the_run_loads(tmp_path):
    """--port taken by another socket: `error: cannot listen on ...`, exit 2, no traceback, and before the
    run is read (the run directory here does not even exist); --port 0 is not an error (any free port)."""
    import socket
    import subprocess
    import sys

    from serve.cli import listening_socket, parse_args

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    port = held.getsockname()[1]
    try:
        r = subprocess.run([sys.executable, "-m", "serve", str(tmp_path / "no-such-run"), "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    finally:
        held.close()
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in r.stderr
    args = parse_args([str(tmp_path), "--port", "0"])
    sock = listening_socket(args)
    try:
        assert args.port == sock.getsockname()[1] > 0
    finally:
        sock.close()


def test_the_http_stack_is_h11_and_uvloop_and_uvloops_absence_is_said(monkeypatch, capsys):
    """uvicorn gets uvloop when it imports (requirements.txt pins it), else asyncio's loop, with one line on
    stderr naming what is missing and how to get it; the parser is h11 either way (see serve.cli.http_stack)."""
    import importlib

    from serve.cli import http_stack, http_stack_note

    assert http_stack() == {"http": "h11", "loop": "uvloop"}
    http_stack_note(http_stack())
    assert capsys.readouterr().err == ""
    real = importlib.import_module

    def fake(name, *a):
        if name == "uvloop":
            raise ImportError("no module named 'uvloop'")
        return real(name, *a)

    monkeypatch.setattr(importlib, "import_module", fake)
    assert http_stack() == {"http": "h11", "loop": "asyncio"}
    http_stack_note(http_stack())
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "uvloop cannot be imported" in err and "`pip install uvloop`" in err
