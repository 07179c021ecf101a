"""The network: the model's math (``model``, ``lrn``) and where it runs (``placement``, ``parallelize``)."""
