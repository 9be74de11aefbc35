"""`fleet demo`: the gateway on the embedded fleet, measured end to end with the OpenAI client."""
