"""The `lorakit demo` jobs: ``llm`` (SmolLM2-135M-Instruct, the default) and ``minilm``."""
