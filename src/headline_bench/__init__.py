"""headline-bench: how LLM inference techniques trade speed, memory and quality writing news headlines."""
