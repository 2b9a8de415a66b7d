"""Bodies of the OpenAI-compatible API (`/v1/completions`, `/v1/models`), in the shape of OpenAI's legacy
completions API as vLLM serves it. A token is a character here."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas import MAX_MODEL_NAME, MAX_SEED, MODEL_NAME_PATTERN, SESSION_ID_PATTERN, WHOLE_FLOATS, limited_by
from charrnn.sampling import REPETITION_WINDOW

RECENT = f"Over the last {REPETITION_WINDOW} characters (prompt and generated)."


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = Field(False, description="Send a last chunk with `usage` (and no choices).")


class CompletionRequest(BaseModel):
    """`POST /v1/completions`. Unknown fields are refused (400), so a misspelt option never goes unnoticed."""

    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())

    model: str = Field(pattern=MODEL_NAME_PATTERN, max_length=MAX_MODEL_NAME, description="A model of GET /v1/models.")
    prompt: str | list[str] = Field(
        "", description="The text to continue, or a list of texts (each gets `n` choices).",
        json_schema_extra=limited_by(maxLength="max_prime_chars", minItems=1, maxItems="max_n",
                                     items={"maxLength": "max_prime_chars"}))
    max_tokens: Annotated[int, Field(ge=0), WHOLE_FLOATS] | None = Field(
        16, description="Characters to generate (null: 16; 0: none, e.g. to score the prompt with `echo` and "
        "`logprobs`).",
        json_schema_extra=limited_by(maximum="max_chars"))
    temperature: float | None = Field(1.0, ge=0, allow_inf_nan=False,
                                      json_schema_extra=limited_by(maximum="max_temperature"))
    top_p: float | None = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    n: Annotated[int, Field(ge=1), WHOLE_FLOATS] | None = Field(
        1, description="Choices per prompt; the prompt is read once. With `session_id`, choice 0 continues that "
        "session and the others start new ones from the same point.", json_schema_extra=limited_by(maximum="max_n"))
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Annotated[str, Field(min_length=1)] | list[str] | None = Field(
        None, description="Generation ends at one of these strings, which is not part of the returned text.",
        json_schema_extra=limited_by(maxLength="max_stop_chars", maxItems="max_stop_strings",
                                     items={"minLength": 1, "maxLength": "max_stop_chars"}))
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), WHOLE_FLOATS] | None = Field(
        None, description="Same seed, same text (choice 0 equals POST /generate with the same seed).",
        json_schema_extra=limited_by(maximum=MAX_SEED))
    logprobs: Annotated[int, Field(ge=0, le=5), WHOLE_FLOATS] | None = Field(
        None, description="Per character: its log-probability and this many most likely alternatives.")
    echo: bool | None = Field(False, description="Return the prompt before the completion (and its "
                              "log-probabilities, with `logprobs`).")
    presence_penalty: float | None = Field(0.0, ge=-2, le=2, allow_inf_nan=False,
                                           description=RECENT)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2, allow_inf_nan=False,
                                            description=RECENT)
    logit_bias: dict[Annotated[str, Field(min_length=1, max_length=1)],
                     Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = Field(
        None, description="Keyed by character (not token id): the bias added to its logit; -100 bans it.")
    user: str | None = Field(None, max_length=256, description="Accepted and ignored.")
    best_of: Annotated[int, Field(ge=1, le=1), WHOLE_FLOATS] | None = Field(
        None, description="Only 1 (the default) is served.")
    suffix: None = Field(None, description="Not supported: only null.")
    # vLLM's extra sampling parameters
    top_k: Annotated[int, Field(ge=-1), WHOLE_FLOATS] | None = Field(
        None, description="-1, 0 or null: all characters.")
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100, allow_inf_nan=False,
                                             description=RECENT)
    # ours
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN,
                                   description="Continue this session (of this model; one prompt).")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="None for the first character of an echoed prompt.")
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["length", "stop"] | None
    session_id: str | None = Field(None, description="The session this choice continues in (POST /generate).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    """The answer of `POST /v1/completions`, and each chunk of its stream (`data: {...}`, then `data: [DONE]`)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "charrnn"


class ModelCards(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail
