"""regmirror's node engine: plan a node's registry-mirror configuration, then apply it safely.

Planning (``runtimes``, ``plans``, ``ownership``) is pure and deterministic; ``nodefiles`` reads, ``applying``
is the only writer, ``restarting`` talks to the runtime, ``engine`` ties them together for the CLI and the agent.
"""
