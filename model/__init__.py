"""The hand-written Phi-3 family (mini-4k, mini-128k / 3.5-mini with LongRoPE, medium with GQA).

Lands with the model issue; the package exists now so the layout is stable.
"""
