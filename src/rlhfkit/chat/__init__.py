"""Layer 9, applications: the LLM clients (`llm`: one `chat` interface over a local model or an
OpenAI-compatible endpoint) and offline sampling (`generate`).
"""
