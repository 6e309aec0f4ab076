"""Environments for multi-turn episodes with tools (docs/environments.md)."""

from opsd_lightning.environments.base import ArithToolsEnvironment, Environment, MathEnvironment
from opsd_lightning.environments.calculator import Calculator
from opsd_lightning.environments.tools import Tool, ToolBox, ToolCall

__all__ = [
    "ArithToolsEnvironment",
    "Calculator",
    "Environment",
    "MathEnvironment",
    "Tool",
    "ToolBox",
    "ToolCall",
]
