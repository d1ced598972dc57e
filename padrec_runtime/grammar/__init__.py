"""The list grammar: token layouts, item catalogue and the constraint every draft and target choice obeys."""
from .catalogue import Catalogue
from .constraint import ConstraintState, ListConstraint
from .layout import BOS, EOS, LAYOUT_KINDS, LIST, PAD, SEP, SPECIAL_TOKENS, TokenLayout

__all__ = ["BOS", "EOS", "LIST", "PAD", "SEP", "SPECIAL_TOKENS", "LAYOUT_KINDS", "Catalogue", "TokenLayout",
           "ConstraintState", "ListConstraint"]
