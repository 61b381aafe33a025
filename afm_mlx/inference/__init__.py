"""Generation: one loaded base with adapters swapped in (``Generator``) and the OpenAI-compatible
HTTP app the server runs."""
