"""tools/check_rules.py (make lint) finds a rule stated a second time."""

import ast

import pytest

from tools.check_rules import GATEWAY, ROOT, gateway_problems, limit_problems

pytestmark = pytest.mark.unit


def test_a_dialect_that_builds_its_own_sampling_or_finish_names_is_flagged():
    src = (
        "def f(t):\n"
        "    probe = pb.SamplingParams(greedy=True)\n"
        "    s = pb.SamplingParams(greedy=t < MIN_TEMPERATURE, temperature=t)\n"
        "    return {pb.FINISH_REASON_EOS: 'stop'}\n"
    )
    found = gateway_problems(GATEWAY / "new_dialect.py", ast.parse(src))
    assert len(found) == 3 and all("new_dialect.py" in p for p in found)
    assert any(":3: builds SamplingParams" in p for p in found)
    assert any("MIN_TEMPERATURE" in p for p in found) and any("FINISH_REASON_EOS" in p for p in found)


def test_a_second_definition_of_a_wire_limit_is_flagged():
    src = "MAX_STOP_SEQUENCES = 16\nlimit: int = 3\nINT32_MAX: int = 2**31 - 1\n"
    found = limit_problems(ROOT / "services" / "textgen" / "wire.py", ast.parse(src))
    assert [p.split(": ", 1)[1] for p in found] == [
        "defines MAX_STOP_SEQUENCES (shared/limits.py has it)",
        "defines INT32_MAX (shared/limits.py has it)",
    ]
