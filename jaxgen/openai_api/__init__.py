"""The OpenAI API's request and response schemas (`schemas`) and their mapping to and from the
engine (`mapping`): shared by the HTTP app (jaxgen.server.http_app) and batch jobs; no transport."""
