"""`fleet demo`: the gateway on the real fleet, measured end to end with the OpenAI client."""
