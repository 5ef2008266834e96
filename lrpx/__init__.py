"""lrpx: Layer-wise Relevance Propagation as a pure autograd override, and faithfulness evaluation.

>>> lrp_model = lrpx.convert(model, lrpx.composites.epsilon_gamma_box(low=-3.0, high=3.0))
>>> relevance, output = lrpx.explain(lrp_model, x, target)
"""
from . import composites, eval, layers, rules  # noqa: A004 (lrpx.eval, the subpackage)
from .canonizers import TraceError, canonize, fold_batchnorm
from .composites import Composite
from .convert import UnsupportedModuleError, convert, rule_table
from .explain import Explanation, explain
from . import concepts, methods, targets
from .text import TokenExplanation, explain_generated, explain_tokens

__version__ = "0.1.0"
__all__ = ["convert", "explain", "Explanation", "Composite", "rule_table", "canonize", "fold_batchnorm",
           "explain_tokens", "explain_generated", "TokenExplanation", "composites", "concepts", "eval", "layers",
           "methods", "rules", "targets", "TraceError", "UnsupportedModuleError"]
