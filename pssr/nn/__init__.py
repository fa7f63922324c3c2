"""Networks and model files.

Owns the U-Net super-resolvers (:mod:`~pssr.nn.model`), the input normalisation that a model
carries (:mod:`~pssr.nn.normalization`), safetensors model files with their metadata and the
built-in registry (:mod:`~pssr.nn.modelfile`), bioimage.io packages (:mod:`~pssr.nn.package`,
:mod:`~pssr.nn.export`), the ONNX Runtime CPU backend (:mod:`~pssr.nn.onnx_backend`) and device
choice (:mod:`~pssr.nn.devices`).  May import :mod:`pssr.io`, :mod:`pssr.degrade`,
:mod:`pssr.errors` and :mod:`pssr.util`; never restoration, training or the CLI.
"""
