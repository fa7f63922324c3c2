"""Restoration, block by block: the engine behind ``pssr.restore`` and ``pssr predict``.

Owns block/halo geometry (:mod:`~pssr.blockwise.tiling`, no torch), the plan that travels to
workers (:mod:`~pssr.blockwise.plan`), the opened input (:mod:`~pssr.blockwise.inputs`), the
engine that reads, restores and writes one batch of blocks (:mod:`~pssr.blockwise.engine`), the
resumable work store (:mod:`~pssr.blockwise.store`), the local and dask runners
(:mod:`~pssr.blockwise.runners`, :mod:`~pssr.blockwise.distributed`), the pyramid, integrity
checks, ``pssr verify``, the fidelity map, and :func:`~pssr.blockwise.predict.restore` that wires
them.  May import :mod:`pssr.io`, :mod:`pssr.degrade`, :mod:`pssr.nn`, :mod:`pssr.errors` and
:mod:`pssr.util`; never training, quality or the CLI.
"""
