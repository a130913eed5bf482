"""Instance server, global scheduler with routing policies, and the OpenAI-compatible protocol."""
