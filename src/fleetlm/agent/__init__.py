"""The agent loop: tools, typed steps, and agents (tool-calling and code) that run a task step by step.

`fleetlm.agent.tools` holds `Tool`, the `tool` decorator and the built-in sandboxed tools;
`fleetlm.agent.steps` the step dataclasses; `fleetlm.agent.loop` `ToolCallingAgent` and `CodeAgent`.
Every step is one request to the gateway (the OpenAI client), so routing, budgets and usage logs apply.
"""
