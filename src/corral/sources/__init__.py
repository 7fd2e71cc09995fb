"""Where model files come from besides a local path: Hugging Face (``hub``), Ollama's store
(``ollama_store``), and the fetch that makes them local and verified (``download``)."""
