"""Cheaper forward passes as model transforms: weight quantisation (int8, int4, BitMoD), CoreInfer
sparse MLPs, layer skipping / self-speculation, and SageAttention-style quantised attention."""
