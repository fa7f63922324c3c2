"""Training: from images to a model file.

Owns patch sampling of synthetic and real pairs (:mod:`~pssr.training.data`), batches drawn
ahead in processes (:mod:`~pssr.training.loader`), losses, the step loop, checkpoints and
resume, supervised training (:func:`pssr.training.train.train`), NoGAN
(:mod:`~pssr.training.nogan`) and the fine-tuning set-up shared by the CLI and the napari plugin
(:mod:`~pssr.training.finetune`).  May import :mod:`pssr.io`, :mod:`pssr.degrade`,
:mod:`pssr.nn`, :mod:`pssr.quality`, :mod:`pssr.errors` and :mod:`pssr.util`; never the
restoration engine's internals or the CLI.
"""
