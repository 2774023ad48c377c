"""Quick FP8 vs bf16 check on SmolLM2 (the numbers in docs/engines.md, "FP8 rollouts").

One chat prompt, 40 greedy tokens from the fp32 model; teacher-forced, the mean and max
|dlogp| of those tokens and the mean KL(fp32 || engine) per position, for the torch
engine with --quantize fp8 / fp8-channel in fp32 and bf16, and a plain bf16 engine.
Run: .venv/bin/python docs/diagnose-fp8/quick_check.py
"""

from typing import Any

import torch
from dvp_server.engines.torch.engine import TorchEngine
from dvp_server.model_store import load_tokenizer, resolve_model
from transformers import AutoModelForCausalLM

d = resolve_model("smollm2", None)
tok = load_tokenizer(d)
ids = tok.apply_chat_template(
    [{"role": "user", "content": "Write a short poem about the sea and the wind."}],
    add_generation_prompt=True,
    return_tensors="pt",
)
ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
ref: Any = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
with torch.no_grad():
    out = ref.generate(ids, max_new_tokens=40, do_sample=False)
    a = ref(out).logits.log_softmax(-1)
n = ids.shape[1]
pa = a[0, n - 1 : -1]
y = out[0, n:]


def report(label: str, engine: TorchEngine) -> None:
    """Teacher-forced on the fp32 model's tokens: |dlogp| of those tokens, KL, vocab mean."""
    with torch.no_grad():
        pb = engine.model(out).logits.float().log_softmax(-1)[0, n - 1 : -1]
    dl = (pa.gather(-1, y[:, None]) - pb.gather(-1, y[:, None])).abs()
    kl = (pa.exp() * (pa - pb)).sum(-1)
    print(
        label,
        "sampled |dlogp| mean",
        dl.mean().item(),
        "max",
        dl.max().item(),
        "KL mean",
        kl.mean().item(),
        "vocab mean",
        (pa - pb).abs().mean().item(),
    )


for q in ["fp8", "fp8-channel"]:
    for dt in ["float32", "bfloat16"]:
        report(f"{q} {dt}", TorchEngine(d, dtype=dt, quantize=q, threads=2))
report("bf16", TorchEngine(d, dtype="bfloat16", threads=2))
print(tok.decode(y))
