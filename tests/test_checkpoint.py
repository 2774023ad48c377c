"""The checkpoint validator (``service/checkpoint.py``) on random tensors.

Every malformed file is also opened with the safetensors library (which the
engines' loaders use): the validator must refuse at least what it refuses, so
nothing the engines would choke on gets through, and must accept what it loads.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dvp_server.service.checkpoint import (
    CheckpointError,
    ModelManifest,
    check_checkpoint,
    read_header,
)
from safetensors import safe_open
from safetensors.torch import save_file

SEEDS = (0, 1, 2)


def random_model(seed: int) -> dict[str, torch.Tensor]:
    """A few float32 tensors of random names and shapes (empty dims, scalars included)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for i in range(int(torch.randint(4, 9, (1,), generator=g))):
        ndim = int(torch.randint(0, 4, (1,), generator=g))
        shape = [int(d) for d in torch.randint(1, 7, (ndim,), generator=g)]
        if i == 3:
            shape = [0, *shape]  # an empty tensor: zero bytes of data
        out[f"layers.{i}.w{seed}"] = torch.randn(shape, generator=g)
    return out


def model_dir(tmp: Path, tensors: dict[str, torch.Tensor], tied: bool = False) -> Path:
    d = tmp / "model"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"tie_word_embeddings": tied}))
    return d


def raw_file(
    path: Path, header: dict[str, Any], data: bytes, header_len: int | None = None
) -> Path:
    """A safetensors file written byte by byte (the header exactly as given)."""
    text = json.dumps(header).encode()
    n = len(text) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + text + data)
    return path


def split(path: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's header object and data bytes."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def loads_in_safetensors(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                f.get_tensor(k)
    except Exception:
        return False
    return True


def refused(path: Path, manifest: ModelManifest) -> str:
    with pytest.raises(CheckpointError) as err:
        check_checkpoint([path], manifest)
    return str(err.value)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_good_checkpoint_passes_in_any_float_dtype_and_split(tmp_path: Path, seed: int) -> None:
    tensors = random_model(seed)
    manifest = ModelManifest.from_model_dir(model_dir(tmp_path, tensors))
    assert manifest.tensors == {k: ("F32", tuple(v.shape)) for k, v in tensors.items()}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        path = tmp_path / f"{dtype}.safetensors"
        save_file({k: v.to(dtype) for k, v in tensors.items()}, str(path))
        assert check_checkpoint([path], manifest) == len(tensors)
    names = sorted(tensors)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({k: tensors[k] for k in names[:2]}, str(a))
    save_file({k: tensors[k] for k in names[2:]}, str(b))
    assert check_checkpoint([a, b], manifest) == len(tensors)
    with pytest.raises(CheckpointError, match=r"is also in a\.safetensors"):
        check_checkpoint([a, a], manifest)


@pytest.mark.parametrize("seed", SEEDS)
def test_wrong_tensors_are_named(tmp_path: Path, seed: int) -> None:
    tensors = random_model(seed)
    manifest = ModelManifest.from_model_dir(model_dir(tmp_path, tensors))
    name = sorted(tensors)[-1]
    t = tensors[name]
    cases: dict[str, tuple[dict[str, torch.Tensor], str]] = {
        "shape": (
            {**tensors, name: torch.zeros(t.numel() + 1)},
            f"{name!r} has shape [{t.numel() + 1}], the model's is {list(t.shape)}",
        ),
        "dtype": ({**tensors, name: t.to(torch.int32)}, f"{name!r} has dtype I32"),
        "fp8": ({**tensors, name: t.to(torch.float8_e4m3fn)}, f"{name!r} has dtype F8_E4M3"),
        "unknown": ({**tensors, "extra.w": torch.ones(2)}, "'extra.w' is not a tensor of"),
        "missing": (
            {k: v for k, v in tensors.items() if k != name},
            f"{name!r} is missing; updates are whole models",
        ),
    }
    for case, (bad, text) in cases.items():
        path = tmp_path / f"{case}.safetensors"
        save_file(bad, str(path))
        message = refused(path, manifest)
        assert text in message, (case, message)
        assert case == "missing" or message.startswith(f"{case}.safetensors: "), message


@pytest.mark.parametrize("seed", SEEDS)
def test_non_finite_values_are_found_in_every_float_dtype(tmp_path: Path, seed: int) -> None:
    tensors = random_model(seed)
    manifest = ModelManifest.from_model_dir(model_dir(tmp_path, tensors))
    name = next(k for k, v in sorted(tensors.items()) if v.numel() > 1)
    rng = np.random.default_rng(seed)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for value in (math.nan, math.inf, -math.inf):
            bad = {k: v.to(dtype).clone() for k, v in tensors.items()}
            flat = bad[name].reshape(-1)
            flat[int(rng.integers(flat.numel()))] = value
            path = tmp_path / "nan.safetensors"
            save_file(bad, str(path))
            assert f"{name!r} holds NaN or infinite values" in refused(path, manifest)
        big = {k: v.to(dtype) * 1e3 for k, v in tensors.items()}  # large but finite
        save_file(big, str(path))
        assert check_checkpoint([path], manifest) == len(tensors)


def _mutations(header: dict[str, Any], data: bytes, rng: np.random.Generator) -> dict[str, Any]:
    """Named ways to break a file's byte layout: (header, data, header_len or None)."""
    spans = {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}
    names = sorted((k for k, (b, e) in spans.items() if e > b), key=lambda k: spans[k])
    first, last = names[0], names[-1]
    cut = int(rng.integers(1, max(2, len(data))))

    def moved(name: str, delta: tuple[int, int]) -> dict[str, Any]:
        h = json.loads(json.dumps(header))
        h[name]["data_offsets"] = [
            o + d for o, d in zip(h[name]["data_offsets"], delta, strict=True)
        ]
        return h

    overlap = json.loads(json.dumps(header))
    overlap[last]["data_offsets"] = list(overlap[first]["data_offsets"])
    overlap[last]["shape"] = list(overlap[first]["shape"])
    return {
        "truncated": (header, data[: len(data) - cut], None, "truncated: tensor"),
        "trailing bytes": (header, data + b"\0" * 8, None, "8 bytes at the end"),
        "span longer than shape": (moved(last, (0, 4)), data + b"\0" * 4, None, "span"),
        "span shorter than shape": (moved(last, (0, -4)), data, None, "span"),
        "shifted": (moved(last, (4, 4)), data + b"\0" * 4, None, "belong to no tensor"),
        "overlap": (overlap, data, None, "overlaps tensor"),
        "negative": (moved(first, (-1, 0)), data, None, "is not [begin, end]"),
        "header size past the file": (header, data, 10**9, "header size"),
        "header size too short": (header, data, 5, "not JSON"),
        "bad dtype": (
            {**header, first: {**header[first], "dtype": "Q8"}},
            data,
            None,
            "unknown dtype",
        ),
        "bool in shape": (
            {**header, first: {**header[first], "shape": [True]}},
            data,
            None,
            "shape",
        ),
        "no shape": (
            {**header, first: {"dtype": "F32", "data_offsets": [0, 0]}},
            data,
            None,
            "needs",
        ),
        "metadata": ({**header, "__metadata__": {"a": 1}}, data, None, "__metadata__"),
    }


@pytest.mark.parametrize("seed", SEEDS)
def test_byte_layout_errors_are_refused_like_safetensors_does(tmp_path: Path, seed: int) -> None:
    """Each broken layout is refused with its own message, and safetensors refuses it too."""
    tensors = random_model(seed)
    manifest = ModelManifest.from_model_dir(model_dir(tmp_path, tensors))
    good = tmp_path / "good.safetensors"
    save_file(tensors, str(good), metadata={"format": "pt"})
    header, data = split(good)
    assert loads_in_safetensors(raw_file(tmp_path / "same.safetensors", header, data))
    assert check_checkpoint([tmp_path / "same.safetensors"], manifest) == len(tensors)
    rng = np.random.default_rng(seed)
    for case, (h, d, n, text) in _mutations(header, data, rng).items():
        path = raw_file(tmp_path / "bad.safetensors", h, d, n)
        message = refused(path, manifest)
        assert text in message, (case, message)
        assert not loads_in_safetensors(path), f"{case}: safetensors loads what we refuse"


def test_duplicate_names_and_junk(tmp_path: Path) -> None:
    tensors = random_model(0)
    manifest = ModelManifest.from_model_dir(model_dir(tmp_path, tensors))
    good = tmp_path / "good.safetensors"
    save_file(tensors, str(good))
    header, data = split(good)
    name = sorted(tensors)[0]
    text = json.dumps(header).replace(
        "{", "{" + json.dumps(name) + ": " + json.dumps(header[name]) + ", ", 1
    )
    dup = tmp_path / "dup.safetensors"
    dup.write_bytes(struct.pack("<Q", len(text)) + text.encode() + data)
    assert f"names {name!r} twice" in refused(dup, manifest)
    junk = tmp_path / "junk.safetensors"
    for blob in (b"", b"\x00" * 7, b"\x02" + b"\x00" * 7 + b"[]"):
        junk.write_bytes(blob)
        assert "not a safetensors file" in refused(junk, manifest)


def test_tied_embeddings_leave_the_head_out(tmp_path: Path) -> None:
    emb = torch.randn(10, 4)
    served = {"model.embed_tokens.weight": emb, "model.norm.weight": torch.ones(4)}
    manifest = ModelManifest.from_model_dir(model_dir(tmp_path, served, tied=True))
    assert manifest.tied_head and "lm_head.weight" not in manifest.tensors
    path = tmp_path / "u.safetensors"
    save_file(served, str(path))
    assert check_checkpoint([path], manifest) == 2
    save_file({**served, "lm_head.weight": emb.clone()}, str(path))
    assert "ties it to the input embedding: leave it out" in refused(path, manifest)


def test_read_header_reports_absolute_ranges(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.bfloat16)}, str(path))
    entries = read_header(path)
    size = path.stat().st_size
    spans = sorted((e.begin, e.end) for e in entries.values())
    assert spans[-1][1] == size and spans[0][1] == spans[1][0]
    assert {k: (e.dtype, e.shape) for k, e in entries.items()} == {
        "a": ("F32", (3,)),
        "b": ("BF16", (2, 2)),
    }
