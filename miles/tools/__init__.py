"""Tools a model calls during a multi-turn rollout: the calculator, Python in a sandbox, and tool-call parsing.

A tool takes the arguments the model wrote and returns text for the tool
message; it never raises into the rollout: a bad call, an error, a time or
memory limit becomes a :class:`~miles.tools.toolbox.ToolResult` whose text says
what went wrong, and the conversation goes on (see docs/multi-turn.md).
"""
