"""Test helper: a scripted backend that answers one fixed text and keeps every request it was sent."""

from __future__ import annotations

from fleetlm.serve.backends import Choice, Delta, Generation


class RecordingBackend:
    name = "m"

    def __init__(self, answer: str, prompt_tokens: int, completion_tokens: int):
        self.answer, self.usage = answer, (prompt_tokens, completion_tokens)
        self.requests: list = []

    async def chat(self, req):
        self.requests.append(req)
        return Generation([Choice(0, self.answer, "stop")], prompt_tokens=self.usage[0],
                          completion_tokens=self.usage[1])

    async def stream_chat(self, req):
        self.requests.append(req)
        for word in self.answer.split(" "):
            yield Delta(0, word + " ")
        yield Delta(0, None, "stop")
        yield Delta(usage=self.usage)

    async def aclose(self):
        pass
