"""The OpenAI-compatible request and response bodies, as pydantic models: they validate requests and
declare the OpenAPI schema. Bounds are declared (the sampling ones are infer/sampling.py's, plus the API's
own upper limits), so a request out of range is a 400, never a 500."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from darkhorse.infer.sampling import BOUNDS

MAX_TOKENS = 1 << 20  # far above any context; the engine clamps to the model's
MAX_SEED = (1 << 63) - 1
# strict: JSON's true/false are not token ids (pydantic's lax mode would read them as 1/0)
TokenId = Annotated[StrictInt, Field(ge=0, le=1 << 31)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Stop = str | Annotated[list[str], Field(max_length=4)] | None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """What completions and chat completions share."""

    model: str | None = None
    max_tokens: Annotated[int, Field(**BOUNDS["max_new_tokens"], le=MAX_TOKENS)] | None = None
    temperature: Annotated[float, Field(**BOUNDS["temperature"], le=2)] | None = None
    top_p: Annotated[float, Field(**BOUNDS["top_p"])] | None = None
    top_k: Annotated[int, Field(**BOUNDS["top_k"], le=1 << 20)] | None = Field(
        None, description="vLLM's extension; 0: off"
    )
    repetition_penalty: Annotated[float, Field(**BOUNDS["repetition_penalty"], le=10)] | None = Field(
        None, description="vLLM's extension"
    )
    seed: Annotated[int, Field(**BOUNDS["seed"], le=MAX_SEED)] | None = None
    stop: Stop = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(Sampling):
    prompt: str | TokenIds | Annotated[list[str], Field(min_length=1)] | Annotated[list[TokenIds], Field(min_length=1)]
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None


class ChatTemplateOptions(BaseModel):
    enable_thinking: bool = True


class ChatCompletionRequest(Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    chat_template_kwargs: ChatTemplateOptions | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (`data: {json}`, then `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "darkhorse"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class TokenizerInfo(BaseModel):
    """What lm-eval's remote tokenizer (vLLM's endpoints) reads."""

    eos_token: str
    bos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None
    model_max_length: int


class TokenizeRequest(BaseModel):
    prompt: str
    add_special_tokens: bool | None = False


class Tokens(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(BaseModel):
    tokens: list[TokenId]


class Detokenized(BaseModel):
    prompt: str
