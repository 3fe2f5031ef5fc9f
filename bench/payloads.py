"""Bytes on the wire: request bodies, the fake upstream's responses and SSE chunks.

Everything is deterministic so that clients can compare what they receive
through a proxy with what the upstream sent.
"""

from __future__ import annotations

import json
from typing import Any

MODEL = "openai/gpt-4o-mini"
CREATED = 1735689600
GEN_ID = "gen-1735689600-BenchBenchBenchBench01"

_PROMPT = (
    "Write a short haiku about reverse proxies, event loops and keep-alive "
    "connections, then explain it in one sentence."
)


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def chat_request_body(stream: bool) -> bytes:
    """A ~300 byte OpenAI-style chat request."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a concise, helpful assistant."},
            {"role": "user", "content": _PROMPT},
        ],
        "temperature": 0.7,
        "max_tokens": 256,
    }
    if stream:
        body["stream"] = True
    return _compact(body)


def _chat_response_body(target_size: int = 1024) -> bytes:
    def build(content: str) -> bytes:
        return _compact(
            {
                "id": GEN_ID,
                "provider": "OpenAI",
                "model": MODEL,
                "object": "chat.completion",
                "created": CREATED,
                "choices": [
                    {
                        "logprobs": None,
                        "finish_reason": "stop",
                        "native_finish_reason": "stop",
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": content,
                            "refusal": None,
                            "reasoning": None,
                        },
                    }
                ],
                "system_fingerprint": "fp_b3b1e8a2c4",
                "usage": {
                    "prompt_tokens": 42,
                    "completion_tokens": 150,
                    "total_tokens": 192,
                    "cost": 0.0000963,
                    "is_byok": False,
                    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                    "cost_details": {"upstream_inference_cost": None},
                    "completion_tokens_details": {"reasoning_tokens": 0, "image_tokens": 0},
                },
            }
        )

    words = [
        "Requests",
        "flow",
        "through",
        "the",
        "quiet",
        "loop,",
        "bytes",
        "in,",
        "bytes",
        "out.",
        "",
    ]
    content = ""
    i = 0
    while len(build(content)) < target_size:
        content += words[i % len(words)] + " "
        i += 1
    return build(content.strip())


def _models_body(target_size: int = 340_000) -> bytes:
    vendors = ["openai", "anthropic", "google", "meta-llama", "mistralai", "qwen", "deepseek"]
    params = [
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "frequency_penalty",
        "presence_penalty",
        "seed",
        "tools",
        "tool_choice",
        "response_format",
        "structured_outputs",
        "logit_bias",
        "logprobs",
        "top_logprobs",
    ]
    models: list[dict[str, Any]] = []
    out = b""
    i = 0
    while len(out) < target_size:
        vendor = vendors[i % len(vendors)]
        slug = f"{vendor}/bench-model-{i:04d}"
        models.append(
            {
                "id": slug,
                "canonical_slug": f"{slug}-20250101",
                "hugging_face_id": "",
                "name": f"{vendor.title()}: Bench Model {i}",
                "created": CREATED - i * 3600,
                "description": (
                    f"Bench Model {i} is a synthetic model entry used to exercise the "
                    "proxy with a realistically sized model list. It supports text "
                    "input and output, tool calling and structured outputs."
                ),
                "context_length": 8192 * (1 + i % 16),
                "architecture": {
                    "modality": "text->text",
                    "input_modalities": ["text"],
                    "output_modalities": ["text"],
                    "tokenizer": "Other",
                    "instruct_type": None,
                },
                "pricing": {
                    "prompt": f"{0.0000001 * (1 + i % 30):.7f}",
                    "completion": f"{0.0000004 * (1 + i % 30):.7f}",
                    "request": "0",
                    "image": "0",
                    "web_search": "0",
                    "internal_reasoning": "0",
                },
                "top_provider": {
                    "context_length": 8192 * (1 + i % 16),
                    "max_completion_tokens": 4096,
                    "is_moderated": i % 3 == 0,
                },
                "per_request_limits": None,
                "supported_parameters": params[: 6 + i % 9],
            }
        )
        i += 1
        if i % 16 == 0:
            out = _compact({"data": models})
    return _compact({"data": models})


CHAT_RESPONSE_BODY = _chat_response_body()
MODELS_BODY = _models_body()

# --- SSE chunks -------------------------------------------------------------
# A chunk is ``data: {json}\n\n``; the JSON carries a ``bench`` object with the
# chunk's sequence number and the upstream's send time (time.time_ns()).

_TOKENS = [b"The", b" loop", b" turns", b";", b" bytes", b" flow", b" through", b" quietly", b"."]

_CHUNK_HEAD = (
    b'data: {"id":"'
    + GEN_ID.encode()
    + b'","provider":"OpenAI","model":"'
    + MODEL.encode()
    + b'","object":"chat.completion.chunk","created":'
    + str(CREATED).encode()
    + b',"choices":[{"index":0,"delta":{"role":"assistant","content":"'
)
_CHUNK_MID = (
    b'"},"finish_reason":null,"native_finish_reason":null,"logprobs":null}],"bench":{"seq":'
)
_LAST_MID = (
    b'"},"finish_reason":"stop","native_finish_reason":"stop","logprobs":null}],"bench":{"seq":'
)
_SENT = b',"sent_ns":'
_CHUNK_TAIL = b"}}\n\n"
DONE_EVENT = b"data: [DONE]\n\n"


def _usage(n: int) -> bytes:
    return (
        b',"usage":{"prompt_tokens":42,"completion_tokens":'
        + str(n).encode()
        + b',"total_tokens":'
        + str(42 + n).encode()
        + b',"cost":0.0000420,"is_byok":false,"prompt_tokens_details":{"cached_tokens":0},'
        b'"completion_tokens_details":{"reasoning_tokens":0}}'
    )


def sse_event(seq: int, total: int, sent_ns: int) -> bytes:
    """The ``data: {json}\\n\\n`` event for chunk ``seq`` of ``total``; the last has usage."""
    token = _TOKENS[seq % len(_TOKENS)]
    if seq == total - 1:
        return b"".join(
            (
                _CHUNK_HEAD,
                token,
                _LAST_MID,
                str(seq).encode(),
                _SENT,
                str(sent_ns).encode(),
                b"}",
                _usage(total),
                b"}\n\n",
            )
        )
    return b"".join(
        (
            _CHUNK_HEAD,
            token,
            _CHUNK_MID,
            str(seq).encode(),
            _SENT,
            str(sent_ns).encode(),
            _CHUNK_TAIL,
        )
    )


def http_chunk(payload: bytes) -> bytes:
    """Frame ``payload`` as one chunk of a chunked transfer-encoded body."""
    return b"%x\r\n%b\r\n" % (len(payload), payload)


LAST_HTTP_CHUNK = b"0\r\n\r\n"
