"""`tta-bench state`: the state-size table and its compression study (`--compress`)."""

from __future__ import annotations

import zlib

import torch

from tta_bench import state_size


def test_xor_against_source_zeroes_unchanged_weights_and_restores_bit_for_bit() -> None:
    source = {"block.conv.weight": torch.randn(8, 4), "fc.bias": torch.randn(3)}
    moved = source["block.conv.weight"] + 1e-4 * torch.randn(8, 4)
    tensors = {
        "s.student.block.conv.weight": moved,
        "s.teacher.fc.bias": source["fc.bias"].clone(),
        "s.moments": torch.randn(3),  # no source weight of that name: kept as it is
        "s.other.fc.bias": torch.randn(5),  # a name match with another shape: kept
        "conv.weight": source["block.conv.weight"] + 1e-4,  # a name without the wrapper's prefix
    }
    out = state_size.xor_against_source(tensors, source)
    assert torch.equal(out["s.moments"], tensors["s.moments"])
    assert torch.equal(out["s.other.fc.bias"], tensors["s.other.fc.bias"])
    assert not out["s.teacher.fc.bias"].view(torch.int32).any()  # an unchanged copy: all zero bits
    assert not torch.equal(out["conv.weight"], tensors["conv.weight"])
    back = state_size.xor_against_source(out, source)
    for k, v in tensors.items():
        assert torch.equal(back[k].view(torch.int32), v.view(torch.int32)), k
    # A small update leaves the high bytes equal to the source's: the XOR compresses better than the weights.
    big = torch.randn(4096)
    near = {"w": big + 1e-5 * torch.randn(4096)}
    raw = zlib.compress(near["w"].numpy().tobytes(), 1)
    xored = zlib.compress(state_size.xor_against_source(near, {"w": big})["w"].numpy().tobytes(), 1)
    assert len(xored) < 0.8 * len(raw)


def test_the_table_on_corrupted_images_has_the_compression_columns(capsys) -> None:
    argv = [
        "--strategies",
        "norm,tent",
        "--steps",
        "2",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--batch-size",
        "16",
    ]
    rc = state_size.main([*argv, "--compress", "--corruption", "gaussian_noise"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "XOR vs source + zlib" in out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| tent")]
    assert len(rows) == 1
    state_bytes = int(rows[0][2].replace(",", ""))
    zlib_bytes = int(rows[0][6].split()[0].replace(",", ""))
    assert 0 < zlib_bytes <= state_bytes
