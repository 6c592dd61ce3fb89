"""The hub's JSON protocol and its HS256 tokens: bytes in, commands or errors out."""

from __future__ import annotations

import base64

import orjson
import pytest

from edgeproxy.core.frames import parse_header
from edgeproxy.hub.protocol import (
    ERROR_CODES,
    PING,
    HubError,
    Pong,
    Position,
    Publication,
    Subscribe,
    Unsubscribe,
    encode_error,
    encode_pub,
    encode_subscribed,
    parse_client_message,
    text_frame,
    valid_channel,
)
from edgeproxy.hub.token import ANONYMOUS, NOTHING, Grants, sign_token, verify_token

SECRET = b"s" * 32


@pytest.mark.parametrize(
    ("raw", "command"),
    [
        (b'{"op":"subscribe","channel":"news"}', Subscribe("news")),
        (b'{"op":"subscribe","channel":"a.b:c","since":{"seq":41,"epoch":"e1"}}', Subscribe("a.b:c", Position(41, "e1"))),
        ('{"op":"subscribe","channel":"x","token":"t"}', Subscribe("x", None, "t")),
        (b'{"op":"unsubscribe","channel":"news"}', Unsubscribe("news")),
        (b'{"op":"pong"}', Pong()),
    ],
)
def test_client_messages_parse(raw, command) -> None:
    assert parse_client_message(raw, 1024) == command


@pytest.mark.parametrize(
    ("raw", "code", "channel"),
    [
        (b"{not json", "bad_json", None),
        (b"[1, 2]", "bad_json", None),
        (b'{"channel":"x"}', "bad_message", None),
        (b'{"op":"publish","channel":"x"}', "unknown_op", None),
        (b'{"op":"subscribe"}', "bad_message", None),
        (b'{"op":"subscribe","channel":""}', "bad_channel", ""),
        (b'{"op":"subscribe","channel":"a b"}', "bad_channel", "a b"),
        (b'{"op":"subscribe","channel":"a*"}', "bad_channel", "a*"),
        (b'{"op":"subscribe","channel":"c","since":5}', "bad_message", "c"),
        (b'{"op":"subscribe","channel":"c","since":{"seq":-1,"epoch":"e"}}', "bad_message", "c"),
        (b'{"op":"subscribe","channel":"c","since":{"seq":true,"epoch":"e"}}', "bad_message", "c"),
        (b'{"op":"subscribe","channel":"c","since":{"seq":1}}', "bad_message", "c"),
        (b'{"op":"subscribe","channel":"c","token":7}', "bad_message", "c"),
    ],
)
def test_bad_client_messages_name_the_problem(raw, code, channel) -> None:
    with pytest.raises(HubError) as info:
        parse_client_message(raw, 1024)
    assert info.value.code == code and info.value.channel == channel
    doc = orjson.loads(encode_error(info.value))
    assert doc["op"] == "error" and doc["code"] == code and doc["message"]
    assert code in ERROR_CODES


def test_oversize_message_is_refused_before_parsing_with_1009() -> None:
    with pytest.raises(HubError) as info:
        parse_client_message(b'{"op":"pong"}' + b" " * 100, 100)
    assert info.value.code == "message_too_big" and info.value.close_code == 1009


def test_channel_names() -> None:
    assert valid_channel("user.42:inbox/a@b=c-d_e")
    assert not valid_channel("x" * 256) and not valid_channel("é") and not valid_channel(3)


def test_pub_message_splices_data_and_frame_is_unmasked_text() -> None:
    message = encode_pub(Publication("c", 42, "e1", b'{"k":[1,2]}'))
    assert orjson.loads(message) == {"op": "pub", "channel": "c", "seq": 42, "epoch": "e1", "data": {"k": [1, 2]}}
    frame = text_frame(message)
    fin, _rsv, opcode, mask, length, header_len = parse_header(frame)
    assert (fin, opcode, mask, length) == (True, 1, None, len(message)) and frame[header_len:] == message
    assert orjson.loads(encode_subscribed("c", Position(3, "e"), False)) == {
        "op": "subscribed", "channel": "c", "seq": 3, "epoch": "e", "recovered": False}
    assert orjson.loads(PING) == {"op": "ping"}


# -- tokens -----------------------------------------------------------------------


def test_token_round_trip_and_patterns() -> None:
    token = sign_token({"sub": "u1", "exp": 2000, "channels": ["news", "user.42.*"]}, SECRET)
    grants = verify_token(token, SECRET, now=1000)
    assert grants.subject == "u1" and grants.expires == 2000
    assert grants.allows("news") and grants.allows("user.42.inbox") and grants.allows("user.42.")
    assert not grants.allows("newsx") and not grants.allows("user.43.inbox") and not grants.allows("xuser.42.a")
    assert ANONYMOUS.allows("anything") and not NOTHING.allows("anything")
    assert Grants(("a.*.b",)).allows("a.x.y.b") and not Grants(("a.*.b",)).allows("a.x.c")


def test_token_pattern_metacharacters_are_literal() -> None:
    grants = verify_token(sign_token({"channels": ["a.b"]}, SECRET), SECRET, now=0)
    assert grants.allows("a.b") and not grants.allows("aXb")


def _tamper(token: str, claims: dict) -> str:
    header, _, signature = token.split(".")
    body = base64.urlsafe_b64encode(orjson.dumps(claims)).rstrip(b"=").decode()
    return f"{header}.{body}.{signature}"


@pytest.mark.parametrize(
    ("make", "code", "words"),
    [
        (lambda: "abc", "bad_token", "three"),
        (lambda: "a.b.c!", "bad_token", "base64url"),
        (lambda: sign_token({"channels": ["*"]}, b"t" * 32), "bad_token", "signature"),
        (lambda: _tamper(sign_token({"channels": ["a"]}, SECRET), {"channels": ["*"]}), "bad_token", "signature"),
        (lambda: sign_token({"channels": ["*"], "exp": 999}, SECRET), "token_expired", "expired"),
        (lambda: sign_token({"channels": ["*"], "exp": 1000}, SECRET), "token_expired", "expired"),
        (lambda: sign_token({"channels": ["*"], "nbf": 1001}, SECRET), "token_expired", "nbf"),
        (lambda: sign_token({"channels": "news"}, SECRET), "bad_token", "channels"),
        (lambda: sign_token({"channels": ["a b"]}, SECRET), "bad_token", "channels"),
        (lambda: sign_token({"exp": "tomorrow"}, SECRET), "bad_token", "exp"),
        (lambda: sign_token([1], SECRET), "bad_token", "object"),
    ],
)
def test_bad_tokens(make, code, words) -> None:
    with pytest.raises(HubError) as info:
        verify_token(make(), SECRET, now=1000)
    assert info.value.code == code and words in str(info.value)


def test_alg_none_and_other_algs_are_refused() -> None:
    def token_with(header: dict) -> str:
        enc = lambda d: base64.urlsafe_b64encode(orjson.dumps(d)).rstrip(b"=").decode()  # noqa: E731
        return f"{enc(header)}.{enc({'channels': ['*']})}."

    for header in ({"alg": "none"}, {"alg": "HS512"}, {"alg": "RS256"}, {}):
        with pytest.raises(HubError, match="HS256"):
            verify_token(token_with(header), SECRET, now=0)
