"""Degradation ("crappification"): how a low-resolution acquisition is simulated.

Owns the seeded crappifiers, the physical presets, the noise model of a low-resolution pixel and
noise fitting (:mod:`pssr.degrade.crappify`).  Pure numpy/scipy: may import :mod:`pssr.errors`
and :mod:`pssr.util`; never torch, networks, restoration or training.
"""
