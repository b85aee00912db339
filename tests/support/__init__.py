"""What tests share and are not tests: loopback servers (OpenAI wire, web, Label Studio), benchmark
files in official formats, a deterministic pixel embedder, and the repository's paths and CLI."""
