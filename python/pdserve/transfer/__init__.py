"""Layer-wise KV transfer between instances: transfer engine wrappers and communication domains."""
