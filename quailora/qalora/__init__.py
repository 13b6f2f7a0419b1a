"""QA-LoRA: group-wise INT-k linear layers, the pooled adapter on top of them, and the merge into zero points.

Import the submodules directly (``quailora.qalora.layer``, ``.adapter``, ``.merge``): ``pooling`` is
needed by the initializers and must not pull in peft.
"""
