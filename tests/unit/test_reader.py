"""The reader's raw path: a whole stored tensor read straight into its target, no torch.load."""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

import cairn.checkpoint.reader as reader_module
from cairn.checkpoint.local import LocalStore
from cairn.checkpoint.reader import FileSlice
from cairn.checkpoint.torchzip import raw_tensor_bytes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # DCP warns that no process group exists


def record(tmp_path, tensor) -> FileSlice:
    """``tensor`` torch.saved at an offset inside a file, as a DCP data file holds it."""
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    path = tmp_path / "data.distcp"
    path.write_bytes(b"x" * 123 + buffer.getvalue() + b"y" * 7)
    fd = os.open(path, os.O_RDONLY)
    return FileSlice(fd, 123, len(buffer.getvalue()), path)


@pytest.mark.parametrize("tensor", [
    torch.randn(5, 7),
    torch.randn(3, 4).to(torch.bfloat16),
    torch.tensor(3.0),                      # 0-d (an optimizer step count)
    torch.arange(10, dtype=torch.int64),
    torch.tensor([True, False, True]),
    torch.empty(0, 4),
])
def test_plain_tensors_are_located(tmp_path, tensor):
    stored = record(tmp_path, tensor)
    try:
        dtype, shape, start, length = raw_tensor_bytes(stored)
        assert dtype == tensor.dtype and shape == tuple(tensor.shape) and length == tensor.numel() * tensor.element_size()
        target = torch.full_like(tensor, 0) if tensor.numel() else torch.empty_like(tensor)
        if length:
            reader_module._read_into(stored, target, start, length)
        assert torch.equal(target, tensor)
    finally:
        os.close(stored._fd)


def test_the_buffered_path_of_device_targets(tmp_path, monkeypatch):
    # what a GPU target takes: pieces through a reused host buffer (exercised here on the host)
    monkeypatch.setattr(reader_module, "_READ_INTO_CHUNK", 1000)
    monkeypatch.setattr(reader_module, "_bounce", reader_module.threading.local())
    tensor = torch.randn(33, 65)  # 8580 bytes: nine pieces, the last one short
    stored = record(tmp_path, tensor)
    try:
        dtype, shape, start, length = raw_tensor_bytes(stored)
        target = torch.zeros_like(tensor)
        reader_module._read_into(stored, target, start, length, direct=False)
        assert torch.equal(target, tensor)
    finally:
        os.close(stored._fd)


@pytest.mark.parametrize("tensor", [
    torch.randn(4, 6).t(),                  # non-contiguous: its storage is not in its order
    torch.randn(10)[2:6],                   # a view into a larger storage
    torch.randn(4, 4)[:, :2],
])
def test_anything_else_is_left_to_torch_load(tmp_path, tensor):
    stored = record(tmp_path, tensor)
    try:
        assert raw_tensor_bytes(stored) is None
    finally:
        os.close(stored._fd)


def test_non_tensor_records_are_left_to_torch_load(tmp_path):
    for value in ({"a": torch.ones(2)}, [torch.ones(2), torch.ones(2)], 3.5):
        stored = record(tmp_path, value)
        try:
            assert raw_tensor_bytes(stored) is None
        finally:
            os.close(stored._fd)


def test_loads_take_the_raw_path_and_fall_back_where_they_must(tmp_path, monkeypatch):
    storage = LocalStore(tmp_path / "checkpoint")
    saved = {"w": torch.randn(8, 16), "b": torch.randn(16).to(torch.bfloat16), "t": torch.randn(6, 4).t(),
             "step": torch.tensor(7.0), "meta": {"position": 3}}
    dcp.save(saved, storage_writer=storage.writer(1, {"kind": "full"}), no_dist=True)
    calls = {"raw": 0, "fallback": 0}
    raw = reader_module._place_raw

    def counting(planner, items, stored):
        done = raw(planner, items, stored)
        calls["raw" if done else "fallback"] += 1
        return done

    monkeypatch.setattr(reader_module, "_place_raw", counting)
    template = {"w": torch.zeros(8, 16), "b": torch.zeros(16, dtype=torch.bfloat16), "t": torch.zeros(4, 6),
                "step": torch.tensor(0.0), "meta": {"position": 0}}
    storage.load(template, storage.step_dir(1), verify=True, no_dist=True)
    for key in ("w", "b", "t", "step"):
        assert torch.equal(template[key], saved[key]), key
    assert template["meta"] == {"position": 3}
    assert calls["raw"] >= 3  # w, b, step; t is stored transposed and goes through torch.load
    # a target of another dtype is converted by the torch.load path
    other = {"w": torch.zeros(8, 16, dtype=torch.float64), "b": torch.zeros(16, dtype=torch.bfloat16),
             "t": torch.zeros(4, 6), "step": torch.tensor(0.0), "meta": {"position": 0}}
    storage.load(other, storage.step_dir(1), verify=False, no_dist=True)
    assert torch.equal(other["w"], saved["w"].double())
