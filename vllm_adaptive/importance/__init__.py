"""ADORE's importance machinery: the GRU controller (``controller.py``,
trained by ``train.py``), the scorers behind one interface (``scorers/``),
the worker-side scoring of a step (``worker.py``) and the KV connector that
carries scores to the scheduler and copies back down (``channel.py``)."""
