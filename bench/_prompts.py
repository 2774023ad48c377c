"""The chat questions the benchmarks turn into prompts (one list for every bench)."""

from __future__ import annotations

QUESTIONS: list[str] = [
    "What is 7*8?",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "What is the capital of France?",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water in Celsius?",
    "List two prime numbers greater than ten.",
    "Who wrote Romeo and Juliet?",
    "What does CPU stand for?",
    "Describe a cat in five words.",
    "What is the square root of 144?",
    "Suggest a name for a pet goldfish.",
    "Why is the sky blue? Answer briefly, please, in plain words.",
]
