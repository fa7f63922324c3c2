"""Measuring quality: metrics, baselines and model evaluation.

Paper-style PSNR / SSIM / NRMSE and the bilinear / bicubic baselines
(:mod:`~pssr.quality.metrics`), and :func:`~pssr.quality.evaluate.evaluate_model` (degrade,
restore, score against bilinear).  ``metrics`` imports only numpy/scipy/scikit-image;
``evaluate`` may import :mod:`pssr.degrade`, :mod:`pssr.nn` and :mod:`pssr.blockwise`.  Never
training or the CLI.
"""
