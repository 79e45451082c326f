"""The safetensors reader on its own (aimdo._safetensors, design.md §7): every corrupt
header entry and every bad sharded index is a CheckpointError naming the file and, where
there is one, the tensor. Files are written byte by byte here, so each case is exactly
the corruption it names. Needs no torch."""

from __future__ import annotations

import json
import struct

import aimdo
import pytest
from aimdo._safetensors import CheckpointError, read_checkpoint, read_header


def write(path, header: dict, data: bytes) -> str:
    """A safetensors file: the header as given (not checked), then `data`."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_a_whole_file_gives_each_tensors_place_dtype_and_shape(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "a": entry(), "b": entry("F16", (3,), (8, 14))}
    path = write(tmp_path / "m.safetensors", header, bytes(14))
    found = read_header(path)
    assert sorted(found) == ["a", "b"]
    start = 8 + len(json.dumps(header).encode())
    assert (found["a"].offset, found["a"].nbytes, found["a"].dtype) == (start, 8, "F32")
    assert (found["b"].offset, found["b"].nbytes, found["b"].shape) == (start + 8, 6, (3,))
    assert found["b"].path == path


@pytest.mark.parametrize(
    "bad, message",
    [
        ("not an object", "its header entry is not an object"),
        (entry(dtype="F128"), "dtype 'F128' is not one aimdo reads"),
        (entry(dtype=None), "dtype None is not one aimdo reads"),
        (entry(shape=(2, -1)), r"shape \[2, -1\] is not a list of non-negative ints"),
        ({**entry(), "shape": "2"}, "shape '2' is not a list"),
        ({**entry(), "shape": [True]}, r"shape \[True\] is not a list"),
        (entry(offsets=(8, 0)), r"data_offsets \[8, 0\] are not \[begin, end\]"),
        ({**entry(), "data_offsets": [0]}, r"data_offsets \[0\] are not"),
        ({**entry(), "data_offsets": [0, 8.0]}, r"data_offsets \[0, 8.0\] are not"),
        (entry(shape=(3,)), "8 bytes for 3 elements of F32"),
        (entry(offsets=(8, 16)), r"tensor t ends at byte \d+, past the file's end .*truncated"),
    ],
)
def test_a_corrupt_header_entry_names_the_file_and_the_tensor(tmp_path, bad, message):
    path = write(tmp_path / "m.safetensors", {"ok": entry(), "t": bad}, bytes(8))
    with pytest.raises(CheckpointError, match=message) as raised:
        read_header(path)
    text = str(raised.value)
    assert text.startswith(f"{path}: tensor t")
    assert isinstance(raised.value, aimdo.AimdoError) and isinstance(raised.value, ValueError)


def test_overlapping_tensors_are_named_both(tmp_path):
    header = {"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}
    path = write(tmp_path / "m.safetensors", header, bytes(12))
    with pytest.raises(CheckpointError, match=f"^{path}: tensors a and b overlap$"):
        read_header(path)


def test_a_header_that_is_not_an_object_or_not_utf8_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    raw = b"[1, 2]"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match=f"^{path}: its header is not a JSON object$"):
        read_header(str(path))
    raw = b'{"\xff": 1}'
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match=f"^{path}: its header is not JSON"):
        read_header(str(path))


def shards(tmp_path, weight_map: dict, files: dict) -> str:
    """Shard files (name -> {tensor: entry}) each with 16 data bytes, and the index."""
    for name, header in files.items():
        write(tmp_path / name, header, bytes(16))
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(index)


def test_a_sharded_checkpoint_is_read_through_its_index(tmp_path):
    index = shards(
        tmp_path,
        {"a": "1.safetensors", "b": "2.safetensors"},
        {"1.safetensors": {"a": entry()}, "2.safetensors": {"b": entry()}},
    )
    found = read_checkpoint(index)
    assert {n: t.path for n, t in found.items()} == {
        "a": str(tmp_path / "1.safetensors"),
        "b": str(tmp_path / "2.safetensors"),
    }
    assert read_checkpoint(tmp_path) == found  # the folder names its one index


def test_a_tensor_in_two_shards_is_refused_naming_both_files(tmp_path):
    second = entry(offsets=(8, 16))
    index = shards(
        tmp_path,
        {"a": "1.safetensors", "b": "2.safetensors"},
        {"1.safetensors": {"a": entry()}, "2.safetensors": {"a": entry(), "b": second}},
    )
    first, second = tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    with pytest.raises(CheckpointError, match=f"^{second}: tensor a is in {first} too$"):
        read_checkpoint(index)


def test_an_index_that_maps_a_tensor_to_a_shard_lacking_it_is_refused(tmp_path):
    index = shards(
        tmp_path,
        {"a": "1.safetensors", "b": "1.safetensors"},
        {"1.safetensors": {"a": entry()}, "2.safetensors": {"b": entry()}},
    )
    with pytest.raises(CheckpointError, match="maps tensor b to 1.safetensors, which lacks it"):
        read_checkpoint(index)


def test_a_shard_with_a_tensor_the_index_does_not_list_still_lists_it(tmp_path):
    # The index is a map to the files; what the files hold is what the checkpoint holds,
    # so the module's check (a tensor that is not a weight) sees the extra tensor.
    index = shards(
        tmp_path,
        {"a": "1.safetensors"},
        {"1.safetensors": {"a": entry(), "x": entry(offsets=(8, 16))}},
    )
    assert sorted(read_checkpoint(index)) == ["a", "x"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "not a readable JSON index"),
        ("[]", "has no weight_map of tensor names to files"),
        ('{"weight_map": {"a": 1}}', "has no weight_map of tensor names to files"),
    ],
)
def test_a_bad_index_is_refused_naming_it(tmp_path, text, message):
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(text)
    with pytest.raises(CheckpointError, match=f"^{index}: {message}"):
        read_checkpoint(index)


def test_a_shards_own_error_names_the_shard(tmp_path):
    index = shards(tmp_path, {"a": "1.safetensors"}, {"1.safetensors": {"a": entry(shape=(3,))}})
    with pytest.raises(CheckpointError, match=f"^{tmp_path / '1.safetensors'}: tensor a: 8 bytes"):
        read_checkpoint(index)
