"""The OpenAI request bodies of /v1/completions and /v1/chat/completions, checked field by field and turned into
one engine request, and the OpenAI error object.

    job = completion_job(body, model_name, encode)          # -> Job, or raises APIError naming the field
    job = chat_job(body, model_name, encode_chat)
    APIError(400, "max_tokens must be ...", param="max_tokens").body()   # {"error": {message, type, param, code}}

Fields: model (must be the served one), max_tokens (chat also max_completion_tokens) is gen_length, temperature,
top_p, seed, stop (a string or up to 4), n (1 only), stream, stream_options.include_usage, user (ignored), and
the block-diffusion knobs as extra fields: threshold, steps, block_length, eos_early_stop, top_k. OpenAI fields
this engine does not implement are accepted only at their neutral values (frequency_penalty 0, echo false,
...); any other field is refused by name, so that a misspelt knob is never silently ignored. A null value is
the same as an absent field. Value ranges here are the API's; Engine.submit checks its arguments again, and
its ValueErrors become 400s too (see app.py).
"""
import dataclasses
import math
from typing import Any, Callable, Optional

MAX_STOP_STRINGS = 4
SEED_LIMIT = 2**64

EXTRA_FIELDS = ("threshold", "steps", "block_length", "eos_early_stop", "top_k")   # Engine.submit's own names


class APIError(Exception):
    """An error answered in the OpenAI format; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Job:
    """One checked request: the prompt's token ids and everything Engine.submit takes but gen_length."""
    prompt: list[int]
    prompt_field: str                  # "prompt" or "messages": the field a prompt error names
    max_tokens: Optional[int]          # None: as many as fit, up to the server's default
    max_tokens_field: str
    engine_args: dict
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _bad(field: str, expected: str, value) -> APIError:
    return APIError(400, f"{field} must be {expected}, got {value!r}", param=field)


def _int(body: dict, field: str, low: int, high: Optional[int] = None) -> Optional[int]:
    value = body.get(field)
    if value is None:
        return None
    expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high})"
    if not _is_int(value) or value < low or (high is not None and value >= high):
        raise _bad(field, expected, value)
    return value


def _number(body: dict, field: str, low: float, high: float, *, low_open: bool = False) -> Optional[float]:
    value = body.get(field)
    if value is None:
        return None
    expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
    if not _is_number(value) or value > high or value < low or (low_open and value == low):
        raise _bad(field, expected, value)
    return float(value)


def _bool(body: dict, field: str) -> Optional[bool]:
    value = body.get(field)
    if value is not None and not isinstance(value, bool):
        raise _bad(field, "true or false", value)
    return value


def _neutral(body: dict, field: str, allowed: tuple, what: str) -> None:
    value = body.get(field)
    if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
        raise APIError(400, f"{field} is not supported by this server ({what}), got {value!r}", param=field)


NEUTRAL = {   # field -> (values that change nothing, what the server does instead)
    "frequency_penalty": ((0, 0.0), "no penalties"),
    "presence_penalty": ((0, 0.0), "no penalties"),
    "logit_bias": (({},), "no logit bias"),
    "logprobs": ((False, 0), "no log-probabilities"),
    "top_logprobs": ((0,), "no log-probabilities"),
    "echo": ((False,), "the prompt is never echoed"),
    "best_of": ((1,), "one candidate per request"),
    "suffix": (("",), "no suffix"),
    "response_format": (({"type": "text"},), "text only"),
    "tools": (([],), "no tools"),
    "tool_choice": (("none",), "no tools"),
}
COMMON_FIELDS = {"model", "stream", "stream_options", "temperature", "top_p", "n", "seed", "stop", "user",
                 "max_tokens", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", *EXTRA_FIELDS}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                               "tool_choice"}


def _common(body: Any, fields: set, model_name: str) -> dict:
    """Checks what both endpoints share; returns the Job fields but the prompt's."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    for field in body:
        if field not in fields:
            raise APIError(400, f"Unrecognized request argument supplied: {field}", param=field)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "you must provide a model parameter (a string)", param="model")
    if model != model_name:
        raise APIError(404, f"The model `{model}` does not exist: this server serves `{model_name}`", param="model",
                       code="model_not_found")
    for field, (allowed, what) in NEUTRAL.items():
        if field in fields:
            _neutral(body, field, allowed, what)
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise APIError(400, f"n must be 1 (one choice per request), got {n!r}", param="n")
    stream = bool(_bool(body, "stream"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad("stream_options", 'an object {"include_usage": true|false}', options)
        include_usage = bool(_bool(options, "include_usage"))
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user", "a string", body["user"])
    args = {
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, low_open=True),
        "seed": _int(body, "seed", 0, SEED_LIMIT),
        "threshold": _number(body, "threshold", 0.0, 1.0),
        "steps": _int(body, "steps", 1),
        "block_length": _int(body, "block_length", 1),
        "top_k": _int(body, "top_k", 0),
        "eos_early_stop": _bool(body, "eos_early_stop"),
    }
    return dict(engine_args={k: v for k, v in args.items() if v is not None}, stop=_stop(body.get("stop")),
                stream=stream, include_usage=include_usage)


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise _bad("stop", f"a non-empty string or a list of 1 to {MAX_STOP_STRINGS} of them", value)
    return tuple(stops)


def _max_tokens(body: dict, fields: tuple[str, ...]) -> tuple[Optional[int], str]:
    for field in fields:
        if body.get(field) is not None:
            return _int(body, field, 1), field
    return None, fields[0]


def completion_job(body: Any, model_name: str, encode: Callable[[str], list[int]]) -> Job:
    """A /v1/completions body: `prompt` is a string, a list of token ids, or a list holding one of those."""
    common = _common(body, COMPLETION_FIELDS, model_name)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = encode(prompt)
    elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        ids = list(prompt)
    else:
        raise _bad("prompt", "a string or a list of token ids (one prompt per request)", prompt)
    max_tokens, field = _max_tokens(body, ("max_tokens",))
    return Job(ids, "prompt", max_tokens, field, **common)


def _content(i: int, content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content[{j}]", 'a text part {"type": "text", "text": "..."}', part)
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content", "a string or a list of text parts", content)


CHAT_ROLES = ("system", "developer", "user", "assistant")


def chat_job(body: Any, model_name: str, encode_chat: Callable[[list[dict]], list[int]]) -> Job:
    """A /v1/chat/completions body: `messages` (roles system, developer, user, assistant; text content) go
    through the checkpoint's chat format."""
    common = _common(body, CHAT_FIELDS, model_name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list of messages", messages)
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", 'an object {"role": ..., "content": ...}', m)
        unknown = set(m) - {"role", "content", "name"}
        if unknown:
            raise APIError(400, f"messages[{i}]: unsupported field {sorted(unknown)[0]!r}",
                           param=f"messages[{i}].{sorted(unknown)[0]}")
        if m.get("role") not in CHAT_ROLES:
            raise _bad(f"messages[{i}].role", f"one of {', '.join(CHAT_ROLES)}", m.get("role"))
        chat.append({"role": m["role"], "content": _content(i, m.get("content"))})
    max_tokens, field = _max_tokens(body, ("max_completion_tokens", "max_tokens"))
    return Job(encode_chat(chat), "messages", max_tokens, field, **common)
