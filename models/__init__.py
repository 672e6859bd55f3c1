"""The one encoder architecture in PyTorch, Keras 3 (TensorFlow) and Flax.

Light modules (no framework import): ``spec`` (architecture as data, FLOPs), ``canonical``
(parameter names/layout, numpy init, validation), ``losses`` / ``optim`` (definitions),
``api`` (``TrainConfig``, ``make_trainer``, ``local_train``, ``shared_names``), ``checkpoint``,
``threads``, ``parity``, ``cli``.  Framework modules: ``torch_model``, ``keras_model``,
``flax_model`` (each imports its framework).
"""
