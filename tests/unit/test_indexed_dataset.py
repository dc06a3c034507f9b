import numpy as np
import pytest

from llm.indexed_dataset import IndexedDatasetReader, IndexedDatasetWriter, data_path, index_path

# megatron-contract.md Appendix A: doc 0 = [5,6,7]; doc 1 = sentences [8,9] and [10]; uint16.
APPENDIX_IDX = bytes.fromhex(
    "4d4d49444944580000"
    "0100000000000000"
    "08"
    "0300000000000000"
    "0300000000000000"
    "030000000200000001000000"
    "0000000000000000"
    "0600000000000000"
    "0a00000000000000"
    "0000000000000000"
    "0100000000000000"
    "0300000000000000"
)
APPENDIX_BIN = bytes.fromhex("050006000700080009000a00")


def test_writer_reproduces_the_contract_test_vector(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "ds", np.uint16)
    w.add_document([np.array([5, 6, 7])])
    w.add_document([np.array([8, 9]), np.array([10])])
    w.finish()
    assert index_path(tmp_path / "ds").read_bytes() == APPENDIX_IDX and len(APPENDIX_IDX) == 94
    assert data_path(tmp_path / "ds").read_bytes() == APPENDIX_BIN
    r = IndexedDatasetReader(tmp_path / "ds")
    assert [x.tolist() for x in r.document(1)] == [[8, 9], [10]] and r.verify() == []


def test_flat_and_merged_datasets(tmp_path):
    a = IndexedDatasetWriter(tmp_path / "a", np.int32)
    a.add_flat(np.arange(10), [3, 7])
    a.finish()
    b = IndexedDatasetWriter(tmp_path / "b", np.int32)
    b.add_document([])  # an empty document repeats a boundary
    b.add_document([np.array([1, 2])])
    b.finish()
    m = IndexedDatasetWriter(tmp_path / "m", np.int32)
    m.append_dataset(tmp_path / "a")
    m.append_dataset(tmp_path / "b")
    m.finish()
    r = IndexedDatasetReader(tmp_path / "m")
    assert r.document_indices.tolist() == [0, 1, 2, 2, 3] and r[2].tolist() == [1, 2] and r.verify() == []


def test_verify_finds_inconsistencies(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "ds", np.uint16)
    w.add_flat(np.arange(100), [40, 60])
    w.finish()
    with open(data_path(tmp_path / "ds"), "r+b") as f:
        f.truncate(150)
    assert any("the index describes 200" in p for p in IndexedDatasetReader(tmp_path / "ds").verify())
    index_path(tmp_path / "ds").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="bad magic"):
        IndexedDatasetReader(tmp_path / "ds")


def test_abort_leaves_nothing_and_an_old_pair_is_replaced_whole(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "ds", np.int32)
    w.add_flat(np.arange(5), [5])
    w.abort()
    assert list(tmp_path.iterdir()) == []
    for n in (3, 4):
        w = IndexedDatasetWriter(tmp_path / "ds", np.int32)
        w.add_flat(np.arange(n), [n])
        w.finish()
    assert IndexedDatasetReader(tmp_path / "ds")[0].tolist() == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]
