"""The list grammar: token layout, item catalogue and the constraint every draft and target choice obeys."""
from .catalogue import BOS, EOS, LIST, PAD, SEP, SPECIAL_TOKENS, Catalogue, TokenLayout
from .constraint import ConstraintState, ListConstraint

__all__ = ["BOS", "EOS", "LIST", "PAD", "SEP", "SPECIAL_TOKENS", "Catalogue", "TokenLayout", "ConstraintState",
           "ListConstraint"]
