"""Experiments: the paper's reproduction (``reproduce``) and the method registry it dispatches to."""
