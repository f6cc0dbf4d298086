"""The ``fastckpt`` command line (typer + rich).

Examples:
    fastckpt convert results/grpo/step_100/policy/weights ./hf-step100 --dtype bf16
    fastckpt inspect results/grpo/step_100/policy/weights --json
    fastckpt verify results/grpo/step_100/policy/weights ./hf-step100

``commands`` holds the commands, ``options`` their arguments and options, ``console`` what they
print.
"""

from fastckpt.cli.commands import app, main

__all__ = ["app", "main"]
