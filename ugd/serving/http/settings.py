"""The server's settings (``python -m ugd.serve`` flags), in one object the app reads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeSettings:
    model_name: str = "ugd"            # what responses call the model (the checkpoint folder's name)
    api_key: str | None = None         # --api_key / $UGD_API_KEY: every /v1 call needs it as a bearer token
    max_documents: int = 1000          # documents (or pairs) per call
    max_chars: int = 20000             # characters per text (query or document)
    max_body_bytes: int = 8 << 20      # bytes per request body
    max_batch_size: int = 64           # items (pairs, texts) per model forward
    max_wait_ms: float = 2.0           # how long the oldest request waits for others to join its batch
    max_queue: int = 256               # requests waiting for the model before 503
    max_new_tokens: int = 64           # reason length limit (a request may ask for less)
    retry_after_s: int = 1             # the Retry-After of a 503

    def check(self) -> "ServeSettings":
        for name in ("max_documents", "max_chars", "max_body_bytes", "max_batch_size", "max_queue", "retry_after_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name} must be an integer >= 1, got {v!r}")
        if self.max_wait_ms < 0:
            raise ValueError(f"--max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_new_tokens < 0:
            raise ValueError(f"--max_new_tokens must be >= 0, got {self.max_new_tokens}")
        return self


__all__ = ["ServeSettings"]
