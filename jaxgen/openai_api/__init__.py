"""The OpenAI API: request and response schemas (`schemas`), requests mapped to what the engine
runs (`requests`) and engine outputs mapped back to OpenAI's bodies and chunks (`responses`).
Shared by the HTTP app (jaxgen.server.http_app) and batch jobs; no transport."""
