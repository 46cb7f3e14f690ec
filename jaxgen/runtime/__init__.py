"""Device side: jitted prefill / decode steps over the paged KV cache, and sampling."""
