"""Compatibility shims for running nerfstudio on CPU-only PyTorch builds."""
