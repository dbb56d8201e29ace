"""ResponseText: the released pieces of a response add up to its text however its tokens are split into blocks
(UTF-8 characters split over tokens, stop strings split over blocks); the response ends before the first stop
string, and its token count runs through the token that completes it."""
import random

import pytest

from llada_engine.serving.text import ResponseText


def decode(tokens: list[int]) -> str:
    """A byte-level tokenizer: one token per byte, as byte-level BPE splits characters."""
    return bytes(tokens).decode("utf-8", errors="replace")


def blocks(tokens: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(tokens):
        n = rng.randint(1, 5)
        out.append(tokens[i:i + n])
        i += n
    return out


def run(text: str, stop: list[str], rng: random.Random) -> tuple[ResponseText, list[str]]:
    response, pieces = ResponseText(decode, stop), []
    for block in blocks(list(text.encode()), rng):
        pieces.append(response.feed(block))
        if response.stopped:
            break
    else:
        pieces.append(response.finish())
    return response, pieces


TEXTS = ["To be, or not to be: that is the question.", "héllo wörld — ça va? 日本語のテキスト 🎭🎭", "ab" * 30]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_text_with_no_half_characters(text):
    rng = random.Random(0)
    for _ in range(50):
        response, pieces = run(text, [], rng)
        assert "".join(pieces) == response.text == text
        assert not any("\ufffd" in p for p in pieces) and not response.stopped
        assert response.completion_tokens == len(text.encode())


@pytest.mark.parametrize("text, stop, expected", [
    ("To be, or not to be: that is the question.", ["not"], "To be, or "),
    ("To be, or not to be: that is the question.", ["question", "be:"], "To be, or not to "),
    ("To be, or not to be: that is the question.", ["to be", "to"], "To be, or not "),       # the first complete
    ("To be, or not to be: that is the question.", ["not to be", "t to"], "To be, or no"),
    ("héllo wörld — ça va? 日本語", ["ça", "日本"], "héllo wörld — "),
    ("abababababc", ["abc"], "abababab"),                                                    # held prefixes
    ("abababababc", ["abd"], "abababababc"),                                                 # never completes
])
def test_the_response_ends_before_the_first_stop_string(text, stop, expected):
    rng = random.Random(1)
    for _ in range(50):
        response, pieces = run(text, stop, rng)
        assert "".join(pieces) == response.text == expected
        if expected == text:
            assert not response.stopped and response.completion_tokens == len(text.encode())
            continue
        assert response.stopped
        first = min((text.find(s) + len(s), text.find(s), s) for s in stop if s in text)[2]
        assert response.completion_tokens == len((expected + first).encode())
        with pytest.raises(RuntimeError, match="after its stop string"):
            response.feed([32])
