"""Every layout the ranks would refuse is refused at submit, naming the field (issue 16, item 5).

For each combination, the spec is (a) refused by ``validate`` with a 400 naming the field, and (b) run anyway,
unvalidated, on real ranks under torchrun, where it fails: the submit-time rule is the twin of a real refusal,
not an invented one. Cases whose ranks would train silently wrong instead of failing (a global batch that is
not a multiple of micro batch x DP), or that need assets of their own (an init checkpoint padded for another
TP), are covered by validate alone in tests/unit/test_train_spec.py.
"""

from __future__ import annotations

import pytest

from services.trainer.spec import validate
from services.trainer.torchrun import run_local
from services.trainer.wire import spec_from_dict
from shared.errors import InvalidArgument
from tests.fixtures.training import spec_doc

CASES = [  # (id, overrides of the tiny job: 4 layers, 4 heads, init_from converted at TP=2, seq 64), field
    ("tp-does-not-divide-heads", {"parallel": {"tensor_parallel": 3}}, "parallel.tensor_parallel"),
    (
        "pp-does-not-divide-layers",
        {"parallel": {"tensor_parallel": 1, "pipeline_parallel": 3}},
        "parallel.pipeline_parallel",
    ),
    (
        "num-layer-list-sum",
        {"parallel": {"tensor_parallel": 1, "pipeline_parallel": 2, "num_layer_list": [3, 2]}},
        "parallel.num_layer_list",
    ),
    (
        "vpp-chunks",
        {"parallel": {"tensor_parallel": 1, "pipeline_parallel": 2, "virtual_pipeline": 3}},
        "parallel.virtual_pipeline",
    ),
    (
        "sp-seq-length",
        {"parallel": {"tensor_parallel": 2, "sequence_parallel": True}, "data": {"seq_length": 63}},
        "data.seq_length",
    ),
]


@pytest.mark.parametrize("over, field", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_at_submit_and_by_the_ranks(train_assets, tmp_path, over, field):
    over = {k: dict(v) for k, v in over.items()}
    over.setdefault("training", {}).update(train_iters=3, global_batch_size=4)
    over["checkpoint"] = {"save_dir": str(tmp_path / "run"), "save_interval": 0}
    if "data" in over:
        over["data"] = {"paths": [{"prefix": train_assets["data"], "weight": 1.0}], **over["data"]}
    spec = spec_from_dict(spec_doc(train_assets, tmp_path / "run", **over))
    with pytest.raises(InvalidArgument) as e:
        validate(spec)
    assert e.value.field == field, e.value.message
    r = run_local(spec, spec.world_size, timeout_s=180)
    assert r.returncode != 0, f"the ranks accepted what submit refuses ({e.value.message}):\n{r.log[-2000:]}"
    assert r.returncode != 124, "the ranks hung instead of failing"
