"""The served model's HTTP surface: OpenAI-compatible request schemas, validation, errors and responses."""
