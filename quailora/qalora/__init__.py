"""QA-LoRA: the pooling operator, the pooled adapter on group-wise INT-k layers, its merge into zero points.

The base layer, its loading and its on-disk formats are the int quantizer's
(``quailora.quantizers.groupwise``); this package imports from there, never the reverse. Import the
submodules directly (``quailora.qalora.adapter``, ``.merge``): ``pooling`` is needed by the initializers
and must not pull in peft.
"""
