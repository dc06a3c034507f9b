"""Streaming text is incremental (a bounded window per token) and exactly the whole decode."""

import random

import pytest

from llm.tokenizers import Tokenizer
from services.textgen.detokenizer import CONTEXT, IncrementalDetokenizer
from services.textgen.wire import StreamText

pytestmark = pytest.mark.unit
TEXTS = [
    "Once upon a time, in a land far away, there lived a small robot.",
    "Größe, naïve café — 東京タワー 🗼🚀 and emoji 👩‍👩‍👧 with zero-width joiners.",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n\n\nline after blanks",
]


@pytest.fixture(scope="module", params=["default", "tiny"])
def tok(request, default_model_dir, tiny_tokenizer):
    return Tokenizer.load(default_model_dir if request.param == "default" else tiny_tokenizer)


def test_pieces_join_to_the_whole_decode_and_each_decode_sees_a_bounded_window(tok):
    rng = random.Random(0)
    for text in TEXTS:
        ids = tok.encode(text)
        ids = ids + [rng.randrange(tok.vocab_size) for _ in range(40)]  # and arbitrary ids (odd bytes)
        seen = []

        def decode(window, seen=seen):
            seen.append(len(window))
            return tok.decode(window)

        detok = IncrementalDetokenizer(decode)
        out = "".join(detok.push(i) for i in ids)
        whole = tok.decode(ids)
        assert whole.startswith(out) and whole[len(out) :] in (
            "",
            "\ufffd",
            whole[len(out) :].strip("\ufffd"),
        )
        assert out == whole.rstrip("\ufffd") or out == whole
        # O(1) per token: no window grows with the sequence (it spans the context and unread tokens only)
        assert max(seen) <= CONTEXT + 8, max(seen)


def test_stream_text_holds_back_what_may_start_a_stop_string(tok):
    ids = tok.encode("The answer is 42. STOP and nothing else.")
    st = StreamText(tok, ["STOP"])
    pieces = [st.push(i) for i in ids]
    sent = "".join(pieces)
    whole = tok.decode(ids)
    assert whole.startswith(sent) and len(whole) - len(sent) <= len("STOP") - 1
    assert "STOP" in whole and ("STOP" not in sent or sent.index("STOP") + 4 <= len(sent))
    assert sent + st.finish(whole) == whole


def test_stop_watch_sees_a_stop_string_the_token_it_completes(tok):
    from services.textgen.detokenizer import StopWatch

    ids = tok.encode("one two three four five six seven")
    watch = StopWatch(tok.decode, ("four f", "zzz"))
    seen = [watch.push(i) for i in ids]
    first = next(k for k in range(len(ids)) if "four f" in tok.decode(ids[: k + 1]))
    assert seen[:first] == [None] * first and seen[first] == "four f"
    assert len(watch.tail) <= 2 * len("four f")  # bounded, whatever the length of the text


def test_stop_watch_finds_a_stop_inside_one_long_piece():
    from services.textgen.detokenizer import StopWatch

    pieces = {1: "ab", 2: "-" * 40 + "xyz" + "-" * 40, 3: "q"}
    watch = StopWatch(lambda ids: "".join(pieces[i] for i in ids), ("xyz", "bq"))
    assert [watch.push(i) for i in (1, 2, 3)] == [None, "xyz", None]  # seen the token it completes
    watch = StopWatch(lambda ids: "".join(pieces[i] for i in ids), ("-q",))
    assert [watch.push(i) for i in (1, 2, 3)] == [None, None, "-q"]  # across two pieces
