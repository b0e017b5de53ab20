"""Rule files: loading, validation, the condition language, the compiled rule set."""

from .expressions import MISSING, compile_condition, register_function
from .loader import load_rules, load_texts
from .model import RuleSet

__all__ = ["MISSING", "RuleSet", "compile_condition", "load_rules", "load_texts",
           "register_function"]
