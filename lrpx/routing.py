"""Which operations of traced forward code move relevance without a rule: indexing,
reshaping, joining, padding, max pooling, comparisons. :func:`unrouted` lists the others that
are left on values computed from the input after the rewrite, so that ``convert`` can refuse
them instead of passing their plain gradient as relevance."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .precision import relevance_to
from .rewrite import CASTS, RESHAPES, tags

__all__ = ["ROUTING_FUNCTIONS", "ROUTING_METHODS", "unrouted"]

#: what forward code may do to values from the input outside of layers: move, reshape,
#: select and join them (their gradient routes relevance unchanged)
_ROUTING_METHODS = RESHAPES | CASTS | {"size", "dim", "chunk", "split", "unbind", "roll", "flip", "narrow",
                                       "select", "repeat", "tile", "clone", "unflatten", "movedim", "swapaxes",
                                       "view_as", "reshape_as", "squeeze_", "unsqueeze_", "append", "extend",
                                       "insert", "unfold", "topk", "broadcast_to",
                                       "masked_scatter"}
_ROUTING_FUNCTIONS = {operator.getitem, getattr, torch.cat, torch.concat, torch.stack, torch.flatten, torch.reshape,
                      torch.permute, torch.transpose, torch.roll, torch.chunk, torch.split, torch.unbind,
                      torch.narrow, torch.flip, torch.squeeze, torch.unsqueeze, torch.movedim, torch._assert,
                      torch.swapaxes, torch.unflatten, torch.tile, torch.repeat_interleave, torch.broadcast_to,
                      # image features placed at a prompt's image tokens (vision-language models)
                      torch.masked_scatter,
                      # the winner of max pooling takes the relevance; dropout is the identity in eval
                      F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                      F.adaptive_max_pool3d, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
                      # comparisons give masks, through which no relevance flows
                      operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
                      torch.fx._symbolic_trace._assert_is_none,
                      # padding: the padded positions are constants, the rest moves
                      F.pad, F.unfold,
                      # the k largest values (a router's choice of experts) take their relevance
                      torch.topk,
                      # the end of a precision round trip passes its relevance to its start
                      relevance_to}
#: functions whose first argument a parameter may pass through and still only move
ROUTING_FUNCTIONS = frozenset(_ROUTING_FUNCTIONS)
ROUTING_METHODS = frozenset(_ROUTING_METHODS)


def unrouted(graph: fx.Graph, sizes: frozenset | set = frozenset()) -> list[str]:
    """The operations of a traced forward that change values from the input outside of a
    layer (what is left after :func:`rewrite_functional`), by name; list operations and what
    the arguments named in ``sizes`` (sizes the callers pass, as to a position encoding)
    determine aside."""
    kinds = tags(graph, sizes)
    bad = []
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method") or kinds[node] != "input":
            continue
        if (node.op == "call_method" and node.target in _ROUTING_METHODS) or \
                (node.op == "call_function" and node.target in _ROUTING_FUNCTIONS):
            continue
        if node.op == "call_function" and node.target in (operator.add, operator.iadd) and \
                any(isinstance(a, (list, tuple)) for a in node.args):
            continue  # joining lists of tensors
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        bad.append(f"{target}")
    return bad
