"""The OpenAI request bodies this server takes, checked field by field, and its error contract.

Every refusal is an `APIError`: an HTTP status and the body OpenAI's API returns,
    {"error": {"message": "...", "type": "invalid_request_error", "param": "<field or null>", "code": ...}}
raised before anything is queued, so a bad request costs the running batch nothing. Nothing is silently
dropped or clamped: an unknown field, an unsupported one set to a non-default value, a prompt that does not
fit in the context with its `max_tokens`, each is refused with a message naming the field and the limit.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from model.generate import SamplingParams

from . import chat
from .loader import ServedModel

__all__ = ["APIError", "GenerationRequest", "MAX_N", "MAX_STOP", "MISSING_MODEL", "parse_body", "parse_request", "unknown_model"]

MAX_N = 16  # choices per prompt
MAX_STOP = 4  # stop strings, as OpenAI
SEED_RANGE = (-(2 ** 63), 2 ** 64)  # what torch.Generator.manual_seed takes

COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options", "user"}
COMPLETION_ONLY = {"prompt", "echo", "logprobs", "best_of", "suffix", "presence_penalty", "frequency_penalty",
                   "logit_bias"}
CHAT_ONLY = {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "presence_penalty",
             "frequency_penalty", "logit_bias", "tools", "tool_choice", "response_format"}
# Accepted only at the value that means "not used" (anything else is refused, never ignored).
UNSUPPORTED_DEFAULTS = {"echo": (False,), "logprobs": (None, False), "best_of": (None, 1), "suffix": (None,),
                        "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
                        "logit_bias": (None, {}), "top_logprobs": (None, 0), "tools": (None, []),
                        "tool_choice": (None, "none"), "response_format": (None, {"type": "text"})}


MISSING_MODEL = "model is required: the name of one of the models of GET /v1/models"


def unknown_model(name: str, models) -> APIError:
    """The 404 for a model no one serves (the server's, and the router's when its replicas serve different
    models)."""
    return APIError(404, f"The model `{name}` does not exist; this server has: {', '.join(models)}",
                    param="model", code="model_not_found")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    """A checked request: its prompts (token ids), `n` choices of each, how every choice is sampled."""

    model: ServedModel
    prompts: list[list[int]]
    n: int
    max_tokens: int
    temperature: float
    top_p: float | None
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    chat: bool
    params: list[SamplingParams] = field(default_factory=list)  # one per choice: prompt-major, then n


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def parse_request(body: dict, models: dict[str, ServedModel], is_chat: bool) -> GenerationRequest:
    allowed = COMMON | (CHAT_ONLY if is_chat else COMPLETION_ONLY)
    for key in body:
        if key not in allowed:
            raise _bad(key, f"Unrecognized request argument supplied: {key}", "unknown_parameter")
    for key, defaults in UNSUPPORTED_DEFAULTS.items():
        if key in body and key in allowed and body[key] not in defaults:
            raise _bad(key, f"{key}={body[key]!r} is not supported by this server", "unsupported_parameter")

    name = body.get("model")
    if not isinstance(name, str):
        raise _bad("model", MISSING_MODEL, "missing_model")
    if name not in models:
        raise unknown_model(name, models)
    model = models[name]
    prompts = _chat_prompt(body, model) if is_chat else _completion_prompts(body, model)

    n = body.get("n", 1)
    if n is None:
        n = 1
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise _bad("n", f"n must be an integer in [1, {MAX_N}], got {n!r}")
    temperature = body.get("temperature", 1.0)
    temperature = 1.0 if temperature is None else temperature
    if not _is_number(temperature) or not 0 <= temperature <= 2:
        raise _bad("temperature", f"temperature must be a number in [0, 2], got {temperature!r}")
    top_p = body.get("top_p", 1.0)
    top_p = 1.0 if top_p is None else top_p
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise _bad("top_p", f"top_p must be a number in (0, 1], got {top_p!r}")
    stop = _stop(body.get("stop"))
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not SEED_RANGE[0] <= seed < SEED_RANGE[1]):
        raise _bad("seed", f"seed must be an integer in [-2^63, 2^64), got {seed!r}")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream", f"stream must be true or false, got {stream!r}")
    include_usage = _stream_options(body.get("stream_options"), stream)
    max_tokens = _max_tokens(body, model, prompts, is_chat)

    req = GenerationRequest(model, prompts, n, max_tokens, float(temperature), None if top_p >= 1 else float(top_p),
                            stop, seed, stream, include_usage, is_chat)
    # Choice j of a request with a seed draws from seed + j, so n choices differ and each is
    # reproducible; without a seed every choice gets a fresh random one (rows never share a stream).
    base = seed if seed is not None else random.SystemRandom().randrange(2 ** 63)
    eos = () if model.eos_id is None else (model.eos_id,)
    req.params = [SamplingParams(temperature=req.temperature, top_p=req.top_p, max_new_tokens=max_tokens,
                                 seed=(base + j) % 2 ** 64, eos_ids=eos)
                  for _ in prompts for j in range(n)]
    return req


def _encode(model: ServedModel, text: str) -> list[int]:
    return model.tokenizer.encode(text, add_special_tokens=False).ids


def _completion_prompts(body: dict, model: ServedModel) -> list[list[int]]:
    """prompt: a string, a list of strings, a list of token ids, or a list of such lists."""
    p = body.get("prompt")
    if p is None:
        raise _bad("prompt", "prompt is required", "missing_prompt")
    if isinstance(p, str):
        items = [p]
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) or (isinstance(x, list) and all(_is_int(t) for t in x))
                                           for x in p):
        items = p
    else:
        raise _bad("prompt", "prompt must be a non-empty string, list of strings, list of token ids or list of "
                             "token-id lists")
    vocab = model.tokenizer.get_vocab_size()
    prompts = []
    for i, item in enumerate(items):
        ids = _encode(model, item) if isinstance(item, str) else list(item)
        if not ids:
            raise _bad("prompt", f"prompt {i} is empty (no tokens)", "empty_prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise _bad("prompt", f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        prompts.append(ids)
    return prompts


def _chat_prompt(body: dict, model: ServedModel) -> list[list[int]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "messages must be a non-empty list of {role, content}", "empty_messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in chat.ROLES:
            raise _bad(f"messages.[{i}].role", f"messages[{i}] needs a role among {', '.join(chat.ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # the content-parts form: only text parts
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise _bad(f"messages.[{i}].content", f"messages[{i}].content: only text parts are supported")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise _bad(f"messages.[{i}].content", f"messages[{i}].content must be a string")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise _bad(f"messages.[{i}]", f"messages[{i}] has fields this server does not support: {sorted(extra)}")
        turns.append((m["role"], content))
    ids = _encode(model, chat.render(model.style, turns))
    if not ids:
        raise _bad("messages", "the messages encode to no tokens", "empty_messages")
    return [ids]


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise _bad("stop", f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings, "
                           f"got {stop!r}")
    return list(stops)


def _stream_options(options, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise _bad("stream_options", "stream_options is only allowed with stream: true")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _bad("stream_options", f"stream_options takes only include_usage, got {options!r}")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise _bad("stream_options", f"stream_options.include_usage must be true or false, got {include!r}")
    return include


def _max_tokens(body: dict, model: ServedModel, prompts: list[list[int]], is_chat: bool) -> int:
    """max_tokens (chat: or max_completion_tokens); default 16 for completions (as OpenAI), the rest of
    the context for chat. prompt + max_tokens must fit in the context: never truncated."""
    key = "max_completion_tokens" if is_chat and body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(key)
    longest = max(len(p) for p in prompts)
    room = model.context - longest
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {model.context} tokens. However, your "
                            f"{'messages' if is_chat else 'prompt'} has {longest} tokens, leaving no room for a "
                            "completion. Please shorten it.",
                       param="messages" if is_chat else "prompt", code="context_length_exceeded")
    if value is None:
        return room if is_chat else min(16, room)
    if not _is_int(value) or value < 1:
        raise _bad(key, f"{key} must be an integer >= 1, got {value!r}")
    if longest + value > model.context:
        raise APIError(400, f"This model's maximum context length is {model.context} tokens. However, you requested "
                            f"{longest + value} tokens ({longest} in the {'messages' if is_chat else 'prompt'}, "
                            f"{value} in the completion). Please reduce the prompt or max_tokens.",
                       param=key, code="context_length_exceeded")
    return value
