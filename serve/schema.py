"""The HTTP contract: OpenAI-style request bodies as our own pydantic models, and errors that name the field.

Bodies are parsed strictly (no "5" for 5, no NaN, no unknown keys), so a wrong type is an error rather than a
guess. Every error is `{"error": {"message", "type", "param", "code"}}` with `param` the dotted path of the field
(`messages.0.content`) and the message starting with it; `body` means the body as a whole.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from serve.config import Limits


class ApiError(Exception):
    """A request the server refuses: HTTP status, the field at fault (dotted path) and why."""

    def __init__(self, status: int, param: str, message: str, code: str = "invalid_request") -> None:
        super().__init__(f"{param}: {message}")
        self.status, self.param, self.message, self.code = status, param, message, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                429: "rate_limit_error"}.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": f"{self.param}: {self.message}", "type": kind, "param": self.param,
                          "code": self.code}}


def _text(value: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); tokenizers cannot encode them.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_text)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    model: Text
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    # The newer name the OpenAI SDK also sends; the two must not disagree.
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Text | list[Text] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    user: Text | None = None


class AgentTurn(_Body):
    role: Literal["system", "user", "assistant"]
    content: Text


class AgentStepRequest(_Body):
    model: Text
    # An environment with a ReAct prompt (sad_ray.envs.react.INSTRUCTIONS).
    env: Text
    # The episode so far: the first observation (user), then assistant and user turns alternating, ending with the
    # latest observation. A leading system turn is allowed only if it is the environment's own prompt.
    turns: list[AgentTurn] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Seed | None = None


# ------------------------------------------------------------------------------------------------------ parsing


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "body", "is nested too deeply", "invalid_json") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, "body", f"is not valid JSON ({_short(str(exc))})", "invalid_json") from None


# Union members and validator wrappers that pydantic puts in an error's location; they are not fields.
def _is_field(part: Any) -> bool:
    return isinstance(part, int) or (isinstance(part, str) and "[" not in part and part not in {
        "str", "int", "float", "bool", "list", "dict", "none", "function-after", "literal"})


def validation_error(exc: ValidationError) -> ApiError:
    """The first problem pydantic found, as an ApiError whose param is the field's dotted path."""
    # Of a union's alternatives, the one that got furthest says best what is wrong (`content.0.type`).
    err = max(exc.errors(include_url=False, include_input=False), key=lambda e: len(e["loc"]))
    loc = [str(p) for p in err["loc"] if _is_field(p)]
    if err["type"] == "extra_forbidden":  # the last part is the client's own key, whatever it looks like
        loc = [str(p) for p in err["loc"][:-1] if _is_field(p)] + [str(err["loc"][-1])]
    param = ".".join(loc) or "body"
    if err["type"] == "extra_forbidden":
        message = "is not a field this endpoint takes"
    elif err["type"] == "missing":
        message = "is required"
    else:
        message = err["msg"].removeprefix("Value error, ")
        message = message[0].lower() + message[1:] if message else "is invalid"
    return ApiError(400, param, _short(message), err["type"])


def parse_body(model: type[_Body], raw: bytes) -> Any:
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise ApiError(400, "body", f"must be a JSON object, not {type(data).__name__}", "invalid_type")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------------- limits


def stop_list(stop: str | list[str] | None, limits: Limits) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limits.max_stop:
        raise ApiError(400, "stop", f"has {len(stops)} entries, over the limit of {limits.max_stop}")
    for i, s in enumerate(stops):
        if not s:
            raise ApiError(400, f"stop.{i}" if not isinstance(stop, str) else "stop", "must not be empty")
        if len(s) > limits.max_stop_chars:
            raise ApiError(400, f"stop.{i}" if not isinstance(stop, str) else "stop",
                           f"is {len(s)} characters, over the limit of {limits.max_stop_chars}")
    return stops


def max_tokens_of(req: ChatCompletionRequest | AgentStepRequest, limits: Limits, default: int) -> int:
    asked = req.max_tokens
    param = "max_tokens"
    extra = getattr(req, "max_completion_tokens", None)
    if extra is not None:
        if asked is not None and asked != extra:
            raise ApiError(400, "max_completion_tokens", f"({extra}) disagrees with max_tokens ({asked})")
        asked, param = extra, "max_completion_tokens"
    if asked is None:
        return default
    if asked > limits.max_tokens:
        raise ApiError(400, param, f"is {asked}, over the limit of {limits.max_tokens}")
    return asked


def check_messages(messages: list[Any], limits: Limits, param: str = "messages") -> None:
    if len(messages) > limits.max_messages:
        raise ApiError(400, param, f"has {len(messages)} entries, over the limit of {limits.max_messages}")
