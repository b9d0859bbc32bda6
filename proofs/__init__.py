"""Symbolic (sympy) proofs of the target distributions udrra derives; see proofs/README.md.

Each proof takes the claimed object as an argument (the true claim is the default) and returns simplified
residual(s) that are identically 0 exactly when the claim is right; ``proofs/test_proofs.py`` checks every
proof with its true claim and with perturbed claims that must be rejected.
"""
