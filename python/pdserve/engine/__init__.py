"""The inference engine: Llama-family model, paged KV cache, batch scheduler, sampler, model runner."""
