"""Request and response bodies of the HTTP API (pydantic models; they make the OpenAPI page at /docs).

Two families:
- the native API under `/v1/memories/...`, whose decoding fields are `GenerationOptions`'s
  names (`max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`, `repetition_penalty`,
  `stop_strings`, `seed`);
- the OpenAI-compatible `/v1/completions` and `/v1/chat/completions`, with OpenAI's names
  (`max_tokens`, `temperature` 0 = greedy, `stop`, ...), vLLM's extensions `top_k` and
  `repetition_penalty`, and longmem's `memory` (the memory's name; its token is the API key)
  and `append`.
Unknown fields are refused (422 naming the field), never silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---- memories ---------------------------------------------------------------------------
class CreateMemory(Strict):
    name: str = Field(description="1-64 letters, digits, '_' or '-', starting with a letter or digit")


class AppendText(Strict):
    text: str = Field(description="text to read into the memory (memorize)")


class Stats(BaseModel):
    name: str
    tokens_held: int = Field(description="retrievable tokens (complete chunks, at most the capacity)")
    tokens_written: int = Field(description="tokens appended since creation (older ones are evicted past capacity)")
    capacity: int
    created: float = Field(description="Unix time")
    last_write: float = Field(description="Unix time of the last acknowledged write")
    file_bytes: int


class Created(BaseModel):
    name: str
    token: str = Field(description="the memory's access token: send it as `Authorization: Bearer <token>`; it is "
                                   "shown only now (the server keeps its hash)")
    stats: Stats


class Appended(BaseModel):
    appended_tokens: int
    stats: Stats


# ---- native generation ----------------------------------------------------------------------
class Decoding(Strict):
    max_new_tokens: int = Field(32, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    stop_strings: list[str] | None = None
    seed: int | None = None
    stream: bool = Field(False, description="server-sent events: `token` events with text, then one `done` event")
    append: bool = Field(False, description="after generating, memorize the prompt and the completion into the memory")


class Complete(Decoding):
    prompt: str


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class Chat(Decoding):
    messages: list[Message] = Field(min_length=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    usage: Usage
    appended: Stats | None = Field(None, description="the memory after the append, when `append` was asked")


# ---- OpenAI-compatible --------------------------------------------------------------------
class OpenAIDecoding(Strict):
    model: str | None = Field(None, description="ignored if it names this server's model; the server has one")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, description="vLLM's extension")
    repetition_penalty: float = Field(1.0, gt=0, description="vLLM's extension")
    n: Literal[1] = Field(1, description="one choice per request")
    stream: bool = False
    stream_options: dict[Literal["include_usage"], bool] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = Field(None, description="accepted for compatibility; not used")
    memory: str | None = Field(None, description="the memory to generate with (its token is the API key); none: "
                                                 "an empty memory")
    append: bool = Field(False, description="memorize the prompt and the completion into `memory` afterwards")


class OpenAICompletion(OpenAIDecoding):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    echo: Literal[False] = False


class OpenAIChat(OpenAIDecoding):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
