"""jaxgen: JAX-native LLM generation serving."""
