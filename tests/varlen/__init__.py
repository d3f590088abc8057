"""Packed (varlen) calls: every backend per sequence, and the packed Triton path."""
