"""`megastack generate --input-file --output-file` against a real gateway + textgen: order, resume, bad
lines."""

from __future__ import annotations

import json

import pytest
import requests

from tests.fixtures.servers import start_gateway
from tools.cli.main import main

PROMPTS = [f"sample {i}: the cat sat on the" for i in range(23)]


@pytest.fixture(scope="module")
def gateway(textgen):
    gw = start_gateway((textgen.address,))
    yield gw.url
    gw.stop()


def run(gateway, *args) -> int:
    return main(["generate", "--url", gateway, "--no-progress", "-n", "6", "--greedy", *args])


def greedy(gateway, prompt: str) -> str:
    r = requests.post(
        f"{gateway}/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0}, timeout=60
    )
    return r.json()["choices"][0]["text"]


def test_jsonl_in_order_and_equal_to_one_at_a_time(gateway, tmp_path):
    inp = tmp_path / "in.jsonl"
    rows = [
        {"prompt": p} if i % 3 == 0 else {"instruction": p, "input": "x"} if i % 3 == 1 else p
        for i, p in enumerate(PROMPTS)
    ]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert run(gateway, "--input-file", str(inp), "--output-file", str(out), "--batch-size", "5") == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["index"] for x in lines] == list(range(len(PROMPTS)))
    assert lines[1]["prompt"] == PROMPTS[1] + "\nx"
    for x in lines[:4]:
        assert x["text"] == greedy(gateway, x["prompt"])


def test_interrupted_run_resumes_without_regenerating(gateway, tmp_path, monkeypatch):
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out.jsonl"
    import tools.cli.batch_generate as bg

    real = bg._call
    calls = []

    def dying(session, a, params, batch):
        calls.append([s.index for s in batch])
        if len(calls) == 3:
            raise bg.SampleError("the gateway went away (simulated)")
        return real(session, a, params, batch)

    monkeypatch.setattr(bg, "_call", dying)
    assert run(gateway, "--input-file", str(inp), "--output-file", str(out), "--batch-size", "4") == 1
    assert len(out.read_text().splitlines()) == 8
    with out.open("a") as f:
        f.write('{"index": 8, "prompt": "torn li')  # a crash in the middle of a line
    calls.clear()
    monkeypatch.setattr(bg, "_call", lambda *x: (calls.append([s.index for s in x[3]]), real(*x))[1])
    assert run(gateway, "--input-file", str(inp), "--output-file", str(out), "--batch-size", "4") == 0
    assert calls[0][0] == 8 and sum(len(c) for c in calls) == len(PROMPTS) - 8
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["index"] for x in lines] == list(range(len(PROMPTS))) and all("text" in x for x in lines)
    calls.clear()
    assert (
        run(gateway, "--input-file", str(inp), "--output-file", str(out)) == 0 and calls == []
    )  # all done already


def test_bad_lines_stop_before_anything_or_are_recorded(gateway, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "fine"}\n{not json\n{"prompt": 3}\n[1, 2]\n{"prompt": "also fine"}\n')
    out = tmp_path / "out.jsonl"
    assert run(gateway, "--input-file", str(inp), "--output-file", str(out)) == 2
    err = capsys.readouterr().err
    assert (
        f"{inp}:2: not JSON" in err
        and f"{inp}:3: no prompt" in err
        and f"{inp}:4: expected a string or an object" in err
    )
    assert not out.exists()
    assert run(gateway, "--input-file", str(inp), "--output-file", str(out), "--skip-bad") == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert ["error" in x for x in lines] == [False, True, True, True, False] and lines[4]["text"]


def test_a_prompt_the_server_refuses_costs_only_its_line(gateway, tmp_path):
    inp = tmp_path / "in.jsonl"
    long = "word " * 400  # longer than the tiny model's context
    inp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["ok one", long, "ok two"]))
    out = tmp_path / "out.jsonl"
    assert run(gateway, "--input-file", str(inp), "--output-file", str(out)) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert "text" in lines[0] and "error" in lines[1] and "text" in lines[2]
    # the same prompt cut to its last 20 tokens fits
    out2 = tmp_path / "out2.jsonl"
    assert run(gateway, "--input-file", str(inp), "--output-file", str(out2), "--max-input-tokens", "20") == 0
    assert all("text" in json.loads(x) for x in out2.read_text().splitlines())


def test_output_of_another_input_is_not_continued(gateway, tmp_path, capsys):
    a, b, out = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "out.jsonl"
    a.write_text("one\ntwo\n")
    b.write_text("three\nfour\n")
    assert run(gateway, "--input-file", str(a), "--output-file", str(out)) == 0
    assert run(gateway, "--input-file", str(b), "--output-file", str(out)) == 2
    assert "belongs to another input" in capsys.readouterr().err
