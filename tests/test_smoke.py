from __future__ import annotations

import json

import pytest

from orproxy.app import App
from tests.conftest import AUTH, KEYS
from tests.fakeor import FakeOpenRouter
from tests.rawhttp import roundtrip

pytestmark = pytest.mark.anyio


async def test_forward_swaps_key(proxy: App, fake: FakeOpenRouter) -> None:
    body = b'{"model":"x","messages":[]}'
    req = (b"POST /api/v1/chat/completions?a=1 HTTP/1.1\r\nHost: localhost\r\n"
           b"Authorization: " + AUTH[1] + b"\r\nContent-Type: application/json\r\n"
           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    resp = await roundtrip(proxy.port, req, b"POST")
    assert resp.status == 200
    assert json.loads(resp.body)["usage"]["total_tokens"] == 7
    sent = fake.requests[-1]
    assert sent.target == b"/api/v1/chat/completions?a=1"
    assert sent.header(b"authorization") == b"Bearer " + KEYS[0].encode()
    assert sent.body == body
